"""The `ntr` command line contract, on a tiny synthetic model (the real one: test_llamacpp_parity.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cluster.cli import main
from workers.model import store as model_store
from workers.model.gguf_file import GGUFFile
from workers.model.synthetic import rewrite_model


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json(capsys, tiny_model):
    model = str(tiny_model("qwen2"))
    code, out, _ = run(capsys, "generate", "--model", model, "--prompt", "hello world", "--preset", "greedy",
                       "--max-tokens", "5", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) >= {"text", "prompt_ids", "token_ids", "prefill_tok_s", "decode_tok_s"}
    assert result["prompt_ids"] == [14990, 1879]  # qwen2 vocab: "hello", " world"
    assert 1 <= len(result["token_ids"]) <= 5 and result["decode_tok_s"] >= 0


def test_generate_streams_text(capsys, tiny_model):
    code, out, err = run(capsys, "generate", "--model", str(tiny_model("qwen2")), "--prompt", "x",
                         "--temperature", "0.9", "--seed", "3", "--max-tokens", "4")
    assert code == 0 and "tok/s" in err
    code2, out2, _ = run(capsys, "generate", "--model", str(tiny_model("qwen2")), "--prompt", "x",
                         "--temperature", "0.9", "--seed", "3", "--max-tokens", "4")
    assert out2 == out  # same seed, same text


def test_generate_with_a_json_schema_or_a_grammar_file(capsys, tiny_model, tmp_path):
    import jsonschema

    model = str(tiny_model("qwen2"))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high"]}},
              "required": ["ok", "level"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "g.gbnf").write_text('root ::= "yes" | "no"\n')
    code, out, _ = run(capsys, "generate", "--model", model, "--prompt", "x", "--temperature", "1.0", "--seed", "1",
                       "--max-tokens", "40", "--json-schema", str(tmp_path / "s.json"), "--json")
    result = json.loads(out)
    assert code == 0 and result["finish_reason"] == "stop"
    jsonschema.validate(json.loads(result["text"]), schema)
    code, out, _ = run(capsys, "generate", "--model", model, "--prompt", "x", "--preset", "greedy",
                       "--grammar", str(tmp_path / "g.gbnf"), "--json")
    assert code == 0 and json.loads(out)["text"] in ("yes", "no")
    (tmp_path / "bad.json").write_text(json.dumps({"type": "string", "format": "no-such-format"}))
    code, _, err = run(capsys, "generate", "--model", model, "--prompt", "x", "--json-schema", str(tmp_path / "bad.json"))
    assert code == 2 and "no-such-format" in err
    code, _, err = run(capsys, "generate", "--model", model, "--prompt", "x", "--grammar", str(tmp_path / "g.gbnf"),
                       "--speculate", "2")
    assert code == 2 and "speculative decoding" in err


def test_calibrate_skip_then_a_skip_draft_gives_the_plain_greedy_tokens(capsys, tiny_model, tmp_path):
    model = str(tiny_model("qwen2"))
    text = tmp_path / "calibration.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nThe sum of two numbers is their total.\n")
    out_file = tmp_path / "skip.json"
    code, out, _ = run(capsys, "calibrate-skip", "--model", model, "--text", str(text), "--fraction", "0.5",
                       "--out", str(out_file))
    assert code == 0 and len(json.loads(out)["skip"]) == 1 == len(json.loads(out_file.read_text())["order"])
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["def add(a, b):", "The sum of two numbers"]))
    code, out, _ = run(capsys, "calibrate-skip", "--model", model, "--prompts", str(prompts), "--generate", "6",
                       "--fraction", "0.5", "--out", str(tmp_path / "own.json"))
    written = json.loads((tmp_path / "own.json").read_text())
    assert code == 0 and len(written["skip"]) == 1 and written["generate"] == 6 and written["tokens"] > 12
    base = ["generate", "--model", model, "--prompt", "hello world hello world", "--preset", "greedy",
            "--max-tokens", "12", "--json"]
    plain = json.loads(run(capsys, *base)[1])["token_ids"]
    for extra in (["--speculate", "3", "--drafter", "skip", "--skip-set", str(out_file)],
                  ["--speculate", "auto", "--drafter", "auto", "--skip-set", str(out_file)]):
        code, out, _ = run(capsys, *base, *extra)
        assert code == 0 and json.loads(out)["token_ids"] == plain


def test_tokenize(capsys, tiny_model, tmp_path):
    model = str(tiny_model("qwen2"))
    code, out, _ = run(capsys, "tokenize", "--model", model, "--text", "hello world", "--json")
    assert code == 0 and json.loads(out) == [14990, 1879]
    texts = tmp_path / "t.json"
    texts.write_text(json.dumps(["hello world", "", "<|im_start|>"]))
    code, out, _ = run(capsys, "tokenize", "--model", model, "--texts-json", str(texts), "--json")
    ids = json.loads(out)
    assert ids[:2] == [[14990, 1879], []]
    assert len(ids[2]) > 1  # special-token text in user input is not parsed as the control token


def test_score(capsys, tiny_model):
    code, out, _ = run(capsys, "score", "--model", str(tiny_model("qwen2")), "--ids", "1,2,3", "--top", "4", "--json")
    positions = json.loads(out)["positions"]
    assert code == 0 and len(positions) == 3
    for p in positions:
        logits = [v for _, v in p["top"]]
        assert len(logits) == 4 and logits == sorted(logits, reverse=True) and p["lse"] >= logits[0]


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--temperature", "-1"], "invalid sampling parameter temperature=-1.0"),
    (["generate", "--prompt", "x", "--top-p", "2"], "invalid sampling parameter top_p=2.0"),
    (["generate", "--prompt", "x", "--max-tokens", "0"], "invalid sampling parameter max_tokens=0"),
    (["generate", "--prompt", "x", "--preset", "wild"], "unknown sampling preset"),
    (["generate", "--prompt", "x", "--max-tokens", str(10**12)], "max_tokens=1000000000000 does not fit"),
    (["generate", "--prompt", "x", "--stop", "x" * 1000], "invalid sampling parameter stop="),
    (["generate", "--prompt", "x", "--top-k", "-5"], "invalid sampling parameter top_k=-5"),
    (["generate", "--prompt", "x", "--speculate", "lots"], "speculate must be off, auto or a number"),
    (["generate", "--prompt", "x", "--speculate", "40"], "speculate must be in [1, 16]"),
    (["generate", "--prompt", "x", "--speculate", "3", "--drafter", "skip"], "needs a skip set"),
    (["score", "--ids", "1,2", "--top", "-1"], "top=-1 must be in [1, "),
    (["score", "--ids", "1,2", "--top", str(10**6)], "top=1000000 must be in [1, "),
])
def test_bad_arguments(capsys, tiny_model, argv, message):
    code, _, err = run(capsys, *argv, "--model", str(tiny_model("qwen2")))
    assert code == 2 and message in err


def test_prompt_past_context(capsys, tiny_model):
    code, _, err = run(capsys, "generate", "--model", str(tiny_model("qwen2")), "--prompt", "word " * 600)
    assert code == 2 and "context window is 512" in err
    # the default --max-tokens is cut to the room the prompt leaves, not refused
    code, out, _ = run(capsys, "generate", "--model", str(tiny_model("qwen2")), "--prompt", "word " * 450,
                       "--preset", "greedy", "--json")
    assert code == 0 and len(json.loads(out)["token_ids"]) <= 512 - len(json.loads(out)["prompt_ids"])


def test_unknown_and_missing_models(capsys, tmp_path, monkeypatch):
    code, _, err = run(capsys, "generate", "--model", "no-such-model", "--prompt", "x")
    assert code == 2 and "no model file or registered model named 'no-such-model'" in err
    monkeypatch.setenv("NTR_HOME", str(tmp_path))
    code, _, err = run(capsys, "generate", "--prompt", "x")
    assert code == 2 and f"ntr models pull {model_store.DEFAULT_MODEL}" in err
    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and "not installed" in out
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    code, _, err = run(capsys, "score", "--model", str(bad), "--ids", "1")
    assert code == 2 and str(bad) in err


@pytest.mark.parametrize("key, value, message", [
    ("tokenizer.ggml.tokens", [1, 2, 3], "tokenizer.ggml.tokens is not an array of strings"),
    ("tokenizer.ggml.merges", 5, "tokenizer.ggml.merges is not an array of strings"),
    ("qwen2.block_count", float("inf"), "metadata qwen2.block_count = inf is not an integer"),
])
def test_malformed_model_metadata_is_one_error_line(capsys, tiny_model, tmp_path, key, value, message):
    src = GGUFFile(tiny_model("qwen2"))
    bad = rewrite_model(tmp_path / "bad.gguf", {**src.metadata, key: value}, dict(src.tensors))
    code, _, err = run(capsys, "generate", "--model", str(bad), "--prompt", "x", "--max-tokens", "1")
    assert (code, err) == (2, f"ntr: error: {bad}: {message}\n")


def test_console_script_entry_point(tiny_model):
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "tokenize", "--model", str(tiny_model("qwen2")),
                          "--text", "hello world", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout) == [14990, 1879]


@pytest.mark.parametrize("address", [None, "127.0.0.1:6380"])
def test_serve_starts_its_own_ray_on_loopback_where_ray_allows(monkeypatch, address):
    """ntr serve without a cluster address starts its own Ray with the dashboard on loopback (Ray's
    other ports listen on every interface, guarded by the token Ray 2.60 turns on for a new local
    cluster: docs/deploy.md); with an address it joins that cluster as it is. Either way SIGTERM
    and SIGINT then stop it as Ctrl-C does, set after ray.init, which sets its own SIGTERM exit
    (the served tests' teardown checks the stop itself: serving_cluster.served_app)."""
    import signal

    import ray
    from ray.serve.scripts import cli as serve_cli

    from cluster.cli import _interrupt

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(signal, "signal", lambda signum, handler: calls.append(("signal", signum, handler)))
    monkeypatch.setattr(serve_cli, "main", lambda argv, standalone_mode: calls.append(("serve", argv)))
    argv = ["serve", "--config", "configs/dev-cpu.yaml"] + (["--address", address] if address else [])
    assert main(argv) == 0
    init = {"namespace": "serve", "dashboard_host": "127.0.0.1"} if address is None else {"address": address,
                                                                                           "namespace": "serve"}
    assert calls == [("init", init), ("signal", signal.SIGTERM, _interrupt), ("signal", signal.SIGINT, _interrupt),
                     ("serve", ["run", "configs/dev-cpu.yaml"])]
    with pytest.raises(KeyboardInterrupt):
        _interrupt(signal.SIGTERM, None)
