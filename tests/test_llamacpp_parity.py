"""Numerical parity with llama.cpp on real models: the default model (Qwen2.5-Coder 0.5B) and
Gemma 3 270M.

Each reference (tests/data/llamacpp_reference*.json) was produced by
tools/make_llamacpp_reference.py with llama-cpp-python (--prompt-set qwen / gemma3): prompt
tokenization, a 32-token greedy continuation, and for every position of prompt + continuation
the top-k logits and the log-sum-exp of a batched teacher-forced evaluation. Gemma's set has
prompts longer than its 512-token sliding window, chat turns in llama.cpp's built-in template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workers.engine.engine import Engine, Sequence
from workers.engine.sampling import SamplingParams, log_softmax
from workers.model import store as model_store
from drive import forward

DATA = Path(__file__).parent / "data"
# reference file -> the registered model it was made from
REFERENCES = {
    "qwen": (json.loads((DATA / "llamacpp_reference.json").read_text()), model_store.DEFAULT_MODEL),
    "gemma3": (json.loads((DATA / "llamacpp_reference_gemma3.json").read_text()), "gemma3-270m"),
}
pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module", params=list(REFERENCES))
def model(request):
    """(name, reference, engine) of each reference's model, pulled once per run."""
    reference, name = REFERENCES[request.param]
    if name == model_store.DEFAULT_MODEL:
        engine = request.getfixturevalue("real_engine")
    else:
        engine = Engine(model_store.pull(name), backend="numpy")
    return request.param, reference, engine


@pytest.mark.parametrize("which", list(REFERENCES))
def test_reference_is_for_its_model(which):
    reference, name = REFERENCES[which]
    assert reference["model"]["sha256"] == model_store.REGISTRY[name].sha256
    prompts = reference["prompts"]
    assert len(prompts) >= 8 and any(p["kind"] == "chat" for p in prompts)


def test_gemma3_reference_outgrows_the_window():
    """Prompts past Gemma 3's 512-token sliding window, chat ones among them, >= 500 positions."""
    prompts = REFERENCES["gemma3"][0]["prompts"]
    assert sum(len(p["prompt_ids"]) > 512 for p in prompts) >= 2
    assert sum(p["kind"] == "chat" for p in prompts) >= 2
    assert sum(len(p["positions"]) for p in prompts) >= 500


def test_prompt_tokens_match(model):
    _, reference, engine = model
    for prompt in reference["prompts"]:
        if prompt["kind"] == "chat":
            ids = engine.chat_prompt_ids(prompt["chat_messages"])
        else:
            ids = engine.prompt_ids(prompt["text"])
        assert ids == prompt["prompt_ids"], prompt["name"]


def test_stop_tokens_match(model):
    _, reference, engine = model
    assert sorted(engine.tokenizer.stop_ids) == reference["model"]["eog_ids"]


@pytest.fixture(scope="module")
def teacher_forced(model):
    """Our logits for every reference sequence, one batched forward each."""
    _, reference, engine = model
    out = {}
    for p in reference["prompts"]:
        ids = p["prompt_ids"] + p["greedy_ids"]
        seq = Sequence(ids)
        try:
            out[p["name"]] = forward(engine, [(seq, len(ids))], all_logits=True)
        finally:
            engine.release(seq)
    return out


def test_teacher_forced_logits_match(model, teacher_forced):
    which, reference, _ = model
    agree = positions = 0
    next_diffs, top1_diffs = [], []
    for p in reference["prompts"]:
        ids = p["prompt_ids"] + p["greedy_ids"]
        for pos, (ref, ours) in enumerate(zip(p["positions"], teacher_forced[p["name"]])):
            ours_lp = log_softmax(ours)
            ref_top = dict((int(t), v) for t, v in ref["top"])
            ref_best = int(ref["top"][0][0])
            positions += 1
            agree += int(np.argmax(ours)) == ref_best
            top1_diffs.append(abs(ours_lp[ref_best] - (ref_top[ref_best] - ref["lse"])))
            nxt = ids[pos + 1] if pos + 1 < len(ids) else None
            if nxt in ref_top:  # the sequence's actual next token, when llama.cpp's top-40 holds it
                next_diffs.append(abs(ours_lp[nxt] - (ref_top[nxt] - ref["lse"])))
    top1 = agree / positions
    mean_next, mean_top1 = float(np.mean(next_diffs)), float(np.mean(top1_diffs))
    print(f"{which}: top-1 agreement {agree}/{positions} = {top1:.4f}; mean |dlogprob| of next token {mean_next:.4f} "
          f"over {len(next_diffs)} positions, of llama.cpp's top-1 {mean_top1:.4f}")
    assert top1 >= 0.95
    assert mean_next <= 0.10 and mean_top1 <= 0.10
    assert len(next_diffs) >= 0.8 * positions


def test_greedy_generation_matches(model, request):
    """16 greedy tokens equal to llama.cpp's on all prompts but one. Each mismatch is reported
    with where it leaves llama.cpp's continuation and llama.cpp's top-2 logit gap there."""
    which, reference, engine = model
    if which == "gemma3":  # measured 2026-12-03 (docs/benchmarks.md): not met, open
        request.applymarker(pytest.mark.xfail(strict=True, reason="Gemma 3 270M: 6 of 9 greedy continuations leave "
                                              "llama.cpp's (3 against its float32-KV reference); llama.cpp's own "
                                              "float16 and float32 KV caches disagree on 7 of 9, its portable and "
                                              "native builds on 4 of 9"))
    mismatched = []
    for p in reference["prompts"]:
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        got = [e.token_id for e in engine.generate(p["prompt_ids"], params)]
        want = p["greedy_ids"][:16]
        if got != want:
            j = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
            top = p["positions"][len(p["prompt_ids"]) - 1 + j]["top"]
            mismatched.append((p["name"], f"token {j}", f"ours {got[j]}, llama.cpp {want[j]}",
                               f"llama.cpp's top-2 gap {top[0][1] - top[1][1]:.4f}"))
    print(f"{which}: greedy mismatches {mismatched}")
    assert len(mismatched) <= 1, mismatched


def test_cli_greedy_text(model, capsys):
    """`ntr generate --model NAME`, the name as registered (both sets have python_fib)."""
    from cluster.cli import main

    which, reference, _ = model
    p = next(p for p in reference["prompts"] if p["name"] == "python_fib")
    assert main(["generate", "--model", REFERENCES[which][1], "--prompt", p["text"], "--temperature", "0",
                 "--max-tokens", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_ids"] == p["prompt_ids"]
    assert result["token_ids"] == p["greedy_ids"][: len(result["token_ids"])]
    assert len(result["token_ids"]) == 16 or result["finish_reason"] == "stop"
