"""Constrained decoding and logit bias in the engine, without a server: the mask and bias
against their definition, grammars on a tiny Qwen2 model (the real Qwen vocabulary, random
weights: whatever it would say, the grammar decides the shape), the device route of
Engine.sample (the NumPy twin standing in), the scheduler's fast path refused, tool-call
parsing and grammars."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from kernels.ops import LogitBias, constrain_logits, unpack_bitmask
from workers.engine.engine import Engine
from workers.engine.grammar import JSON_OPTIONS, GrammarSpec
from workers.engine.sampling import Sampler, SamplingParams
from workers.engine.scheduler import Scheduler
from workers.engine.speculation import Speculation
from workers.model.tool_calls import ToolCallParser, tool_call_grammar

from finite_schema import SCHEMA


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model("qwen2"), max_context=128, kv_cache_tokens=512, block_size=4)


def text_of(engine, prompt, params):
    events = list(engine.generate(prompt, params))
    return "".join(e.text for e in events), events[-1].finish_reason, [e.token_id for e in events]


def test_constrain_logits_is_the_definition():
    rng = np.random.default_rng()
    B, V = 3, 1000
    logits = rng.standard_normal((B, V)).astype(np.float32)
    allowed = rng.random((B, V)) < 0.3
    words = np.zeros((B, (V + 31) // 32), np.uint32)
    for b, t in zip(*np.nonzero(allowed)):
        words[b, t // 32] |= np.uint32(1) << np.uint32(t % 32)
    bitmask = words.view(np.int32)
    assert np.array_equal(unpack_bitmask(bitmask, V), allowed)
    bias = LogitBias(np.array([0, 2, 2], np.int32), np.array([5, 5, 999], np.int32),
                     np.array([-100, 3.5, 100], np.float32))
    got = constrain_logits(logits, bitmask, bias)
    want = logits.copy()
    for r, t, v in zip(bias.rows, bias.ids, bias.values):
        want[r, t] += v
    want[~allowed] = -np.inf
    assert np.array_equal(got, want)
    assert np.array_equal(constrain_logits(logits, None, None), logits)


def test_sampler_bias_removes_and_forces_tokens():
    logits = np.random.default_rng(1).standard_normal(500).astype(np.float32)
    top, second = np.argsort(-logits)[:2]
    params = SamplingParams(temperature=0.0, logit_bias={int(top): -100})
    assert Sampler(params).sample(logits) == second
    assert Sampler(SamplingParams(temperature=0.0, logit_bias={7: 100})).sample(logits) == 7
    draws = {Sampler(SamplingParams(temperature=1.0, seed=s, logit_bias={int(top): -100})).sample(logits)
             for s in range(50)}
    assert int(top) not in draws


@pytest.mark.parametrize("bias, what", [
    ({"x": 1}, "integer token ids"), ({-1: 1}, "negative"), ({5: 101}, "must be in"), ({5: float("nan")}, "must be in"),
    ({5: "a"}, "integer token ids"), ({i: 1 for i in range(1025)}, "at most 1024")])
def test_logit_bias_validation_names_the_field(bias, what):
    with pytest.raises(ValueError, match=f"logit_bias.*{what}"):
        SamplingParams(logit_bias=bias)


def test_logit_bias_id_past_the_vocabulary_is_refused(engine):
    with pytest.raises(ValueError, match="logit_bias.*out of range"):
        list(engine.generate([1, 2, 3], SamplingParams(logit_bias={engine.config.vocab_size: 1})))


@pytest.mark.parametrize("kind, source, what", [
    ("yaml", "", "unknown grammar kind"), ("json_schema", "{", "not valid JSON"),
    ("json_schema", json.dumps({"type": "string", "format": "no-such-format"}), "no-such-format"),
    ("gbnf", 'root ::= missing | "no"', "missing")])
def test_grammars_the_engine_cannot_enforce_are_refused_naming_why(kind, source, what):
    with pytest.raises(ValueError, match=what):
        GrammarSpec(kind, source)


def test_json_schema_output_parses_and_validates(engine):
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    for params in (SamplingParams(temperature=0.0, max_tokens=100, grammar=spec),
                   SamplingParams(temperature=1.0, seed=3, max_tokens=100, grammar=spec)):
        text, finish, _ = text_of(engine, [1, 2, 3], params)
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_gbnf_and_json_object(engine):
    answer = GrammarSpec("gbnf", 'root ::= "yes" | "no" | "maybe"')
    for seed in range(3):
        text, finish, _ = text_of(engine, [5, 6], SamplingParams(temperature=1.5, seed=seed, max_tokens=20,
                                                                grammar=answer))
        assert finish == "stop" and text in ("yes", "no", "maybe")
    text, finish, _ = text_of(engine, [5, 6], SamplingParams(temperature=0.0, max_tokens=8,
                                                            grammar=GrammarSpec("json_object")))
    assert text.startswith("{")  # a random model's object rarely closes in 8 tokens: cut by length
    assert finish == "length" or isinstance(json.loads(text), dict)


def test_grammars_on_an_spm_vocabulary(tiny_model):
    """Llama's SPM vocabulary (pieces with ▁ for spaces, <0xNN> byte tokens) as llguidance sees it."""
    spm = Engine(tiny_model("llama"), max_context=128, kv_cache_tokens=256, block_size=4)
    for seed in range(3):
        text, finish, _ = text_of(spm, [1, 5], SamplingParams(temperature=1.5, seed=seed, max_tokens=20,
                                                             grammar=GrammarSpec("gbnf", 'root ::= "yes sir" | "no é"')))
        assert finish == "stop" and text in ("yes sir", "no é")
    text, finish, _ = text_of(spm, [1, 5], SamplingParams(temperature=1.0, seed=1, max_tokens=100,
                                                         grammar=GrammarSpec("json_schema", json.dumps(SCHEMA))))
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_device_route_masks_rows_and_skips_the_raw_argmax(engine, monkeypatch):
    """With sampling on the device (the NumPy twins standing in), constrained rows go through
    ops.constrain then ops.sample, never the raw argmax shortcut, and match the host Sampler."""
    monkeypatch.setattr(engine.ops, "device_sampling", True, raising=False)
    calls = []
    twin_constrain, twin_argmax = engine.ops.constrain, engine.ops.argmax
    monkeypatch.setattr(engine.ops, "constrain", lambda *a: calls.append("constrain") or twin_constrain(*a),
                        raising=False)
    monkeypatch.setattr(engine.ops, "argmax", lambda rows: calls.append("argmax") or twin_argmax(rows), raising=False)
    fill = engine.grammar_tokenizer.fill_masks
    monkeypatch.setattr(engine.grammar_tokenizer, "fill_masks", lambda cs: calls.append("masks") or fill(cs))
    V = engine.config.vocab_size
    logits = np.random.default_rng(2).standard_normal((3, V)).astype(np.float32)
    spec = GrammarSpec("gbnf", 'root ::= "yes" | "no"')
    top = int(np.argmax(logits[2]))

    def samplers():
        return [Sampler(SamplingParams(temperature=0.0), None),
                Sampler(SamplingParams(temperature=0.0, grammar=spec), engine.constraint(spec)),
                Sampler(SamplingParams(temperature=0.0, logit_bias={top: -100}), None)]

    picked = [p[0] for p in engine.sample(logits, samplers())]
    assert calls == ["masks", "constrain"]  # the masks before anything reads the logits: they overlap the forward
    host = samplers()
    assert picked == [s.sample(row) for s, row in zip(host, logits)]
    assert picked[0] == int(np.argmax(logits[0])) and picked[2] != top
    assert engine.tokenizer.decode([picked[1]]) in ("y", "ye", "yes", "n", "no")


def test_scheduler_runs_constrained_rows_beside_plain_ones_off_the_fast_path(engine, monkeypatch):
    monkeypatch.setattr(engine.ops, "device_sampling", True, raising=False)
    plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=100, grammar=GrammarSpec("json_schema", json.dumps(SCHEMA)))
    sched = Scheduler(engine, max_num_seqs=4, max_batch_tokens=64)
    assert not sched._greedy(sched.submit("c", [1, 2, 3], constrained))
    sched.submit("p", [9, 8, 7], plain)
    out: dict[str, list] = {}
    while sched.has_work:
        step = sched.plan()
        assert not step.greedy
        for rid, event in sched.commit(step, sched.run(step)):
            out.setdefault(rid, []).append(event)
    jsonschema.validate(json.loads("".join(e.text for e in out["c"])), SCHEMA)
    assert out["c"][-1].finish_reason == "stop"
    assert [e.token_id for e in out["p"]] == text_of(engine, [9, 8, 7], plain)[2]
    assert text_of(engine, [1, 2, 3], constrained)[2] == [e.token_id for e in out["c"]]


def test_speculation_is_refused_with_a_constraint(engine):
    with pytest.raises(ValueError, match="speculative decoding"):
        next(engine.generate([1, 2], SamplingParams(temperature=0.0, logit_bias={3: 1.0}), Speculation(k=2)))
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, grammar=GrammarSpec("json_object"))


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}}}


def calls_of(pieces: list[dict]) -> list[dict]:
    """Tool-call pieces put together as a client does: {"name", "arguments"} per index."""
    calls: dict[int, dict] = {}
    for piece in pieces:
        call = calls.setdefault(piece["index"], {"name": "", "arguments": ""})
        call["name"] += piece.get("name", "")
        call["arguments"] += piece["arguments"]
    return [calls[i] for i in sorted(calls)]


def test_tool_call_grammar_forces_a_valid_call(engine):
    spec = GrammarSpec("lark", tool_call_grammar([WEATHER], parallel=False, json_options=JSON_OPTIONS))
    text, finish, _ = text_of(engine, [1, 2], SamplingParams(temperature=0.0, max_tokens=60, grammar=spec))
    assert finish == "stop", text
    parser = ToolCallParser()
    content, pieces = parser.feed(text)
    assert content.strip() == "" and parser.finish() == ""
    (call,) = calls_of(pieces)
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])


def test_tool_call_parser_streams_content_and_argument_pieces():
    text = ('Let me check.<tool_call>\n{"name": "f", "arguments": {"a": {"b": [1, 2]}, "c": "}"}}\n</tool_call>'
            '\n<tool_call>\nnot json\n</tool_call> and <tool_call>{"arguments": {}, "name": "g"}</tool_call> bye <to')
    whole = ToolCallParser()
    content, pieces = whole.feed(text)
    content += whole.finish()
    assert content == "Let me check.\n<tool_call>\nnot json\n</tool_call> and  bye <to"
    assert calls_of(pieces) == [{"name": "f", "arguments": '{"a": {"b": [1, 2]}, "c": "}"}'},
                                {"name": "g", "arguments": "{}"}]
    for cut in (1, 2, 3, 7):  # the same text in pieces of every size: the same content and calls
        parser, streamed, got = ToolCallParser(), [], []
        for i in range(0, len(text), cut):
            c, p = parser.feed(text[i:i + cut])
            streamed.append(c)
            got += p
        streamed.append(parser.finish())
        assert "".join(streamed) == content and calls_of(got) == calls_of(pieces), cut
        assert sum(1 for p in got if "name" in p) == 2  # each call starts once
    assert [p for p in ToolCallParser().feed('<tool_call>\n{"name": "f", "arguments": {"a": 1')[1]] == [
        {"index": 0, "name": "f", "arguments": '{"a": 1'}]  # arguments stream before the block closes


def test_a_template_without_tools_is_refused():
    from workers.model.chat_template import render_chat
    from workers.model.tool_calls import check_tool_format

    plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(ValueError, match="no tool support"):
        check_tool_format(plain, render_chat(plain, [{"role": "user", "content": "x"}], tools=[WEATHER]), [WEATHER])
    other = "{% for t in tools %}{{ t.function.name }}{% endfor %}[TOOL_CALLS]"
    with pytest.raises(ValueError, match="other than <tool_call>"):
        check_tool_format(other, render_chat(other, [{"role": "user", "content": "x"}], tools=[WEATHER]), [WEATHER])


def test_bench_constrained_decodes_every_mode(engine):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_constrained.py"
    spec = importlib.util.spec_from_file_location("bench_constrained", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for mode in ("plain", "forward+sample", "constrained"):
        assert bench.decode_rate(engine, batch=2, steps=3, mode=mode) > 0
    assert engine.blocks.blocks_in_use == 0
