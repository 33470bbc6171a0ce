"""The prompt's logprobs (SamplingParams.prompt_logprobs, an echo's logprobs in the API): the
serving scheduler scores a prompt's tokens from the passes that prefill it, in its usual
chunks, the output head taking the engine's logit rows at a time. The reference is one pass
over the whole prompt with every row's logits, log-softmaxed in float64 here."""

from __future__ import annotations

import numpy as np
import pytest

from workers.engine.engine import Engine, GeneratedToken, PromptLogprobs, Sequence
from workers.engine.sampling import SamplingParams
from workers.engine.scheduler import Scheduler
from drive import forward

PROMPT = [(7 * i + 3) % 200 + 5 for i in range(30)]
TOP = 3
DECODING = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SCORED = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=TOP)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("qwen2")


def reference(engine: Engine, prompt: list[int]) -> np.ndarray:
    """log_softmax of every row of one pass over the whole prompt, float64."""
    seq = Sequence(list(prompt))
    try:
        logits = forward(engine, [(seq, len(prompt))], all_logits=True).astype(np.float64)
    finally:
        engine.release(seq)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def run(sched: Scheduler, submits: dict[int, list[tuple]], max_steps: int = 300) -> dict[str, list]:
    """Step until idle, submitting (id, prompt, params) before the steps `submits` names;
    returns each request's events in order."""
    events: dict[str, list] = {}
    for i in range(max_steps):
        for rid, prompt, params in submits.get(i, []):
            sched.submit(rid, prompt, params)
        if not sched.has_work and i > max(submits):
            return events
        for rid, event in sched.step():
            events.setdefault(rid, []).append(event)
    raise AssertionError("scheduler did not drain")


def check_scores(events: list, prompt: list[int], want: np.ndarray, tol: float = 1e-4) -> None:
    """One PromptLogprobs event, first, with every prompt token's logprob and top TOP as the
    reference gives them."""
    assert isinstance(events[0], PromptLogprobs) and all(isinstance(e, GeneratedToken) for e in events[1:])
    entries = events[0].entries
    assert [t for t, _, _ in entries] == prompt
    assert entries[0][1:] == (None, None)  # the first token has nothing before it
    for i, (token, lp, top) in enumerate(entries[1:], start=1):
        row = want[i - 1]
        assert lp == pytest.approx(row[token], abs=tol), i
        ranked = np.sort(row)[::-1]
        assert [v for _, v in top] == pytest.approx(list(ranked[:TOP]), abs=tol), i
        assert all(row[t] == pytest.approx(v, abs=tol) for t, v in top), i


def head_rows(engine: Engine, monkeypatch) -> list[int]:
    """The rows each output-head product of engine's model takes, recorded."""
    counted, head = [], engine.model.head

    def counting(rows):
        counted.append(len(rows))
        return head(rows)

    monkeypatch.setattr(engine.model, "head", counting)
    return counted


@pytest.mark.parametrize("backend", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_prompt_logprobs_are_a_whole_prompt_passs_and_the_head_takes_a_few_rows_at_a_time(request, model,
                                                                                            monkeypatch, backend):
    """A 30-token prompt scored beside a request decoding, in chunks of the step's 16 tokens, and
    6 logit rows the engine plans for: the output head takes at most 6 rows at a time. The
    scores equal one pass's over the whole prompt (on the GPU, its products' fp16 inputs apart)
    and come as one event before its first token, whose tokens are those it gets unscored."""
    if backend == "cupy":
        request.getfixturevalue("cuda_device")
    engine = Engine(model, backend=backend, max_context=64, kv_cache_tokens=256, block_size=4, max_logit_rows=6)
    want = reference(engine, PROMPT)
    plain = [e.token_id for e in engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4,
                                                                         ignore_eos=True))]
    counted = head_rows(engine, monkeypatch)
    sched = Scheduler(engine, max_num_seqs=2, max_batch_tokens=16)
    events = run(sched, {0: [("decoding", [1, 2, 3], DECODING)], 1: [("scored", PROMPT, SCORED)]})
    check_scores(events["scored"], PROMPT, want, 1e-4 if backend == "numpy" else 2e-2)
    assert [e.token_id for e in events["scored"][1:]] == plain
    assert all(isinstance(e, GeneratedToken) for e in events["decoding"]) and len(events["decoding"]) == 12
    assert max(counted) == 6 and sum(n for n in counted if n == 6) >= 24  # 29 rows in slices of 6 at most
    assert engine.blocks.blocks_in_use == 0


def test_a_preempted_prompt_is_scored_once(model, monkeypatch):
    """The scored request is preempted with part of its prompt scored (a request admitted
    before it grows into the cache) and recomputed: its prompt's tokens still come once, in one
    event, as the reference gives them."""
    engine = Engine(model, max_context=64, kv_cache_tokens=36, block_size=4, max_logit_rows=8)
    want = reference(engine, PROMPT)
    sched = Scheduler(engine, max_num_seqs=2, max_batch_tokens=16)
    preempted, preempt = [], sched._preempt
    monkeypatch.setattr(sched, "_preempt", lambda r: (preempted.append((r.id, len(r.prompt_scores))), preempt(r)))
    growing = SamplingParams(temperature=0.0, max_tokens=33, ignore_eos=True)  # all 9 blocks at its end
    events = run(sched, {0: [("growing", [1, 2, 3], growing)], 1: [("scored", PROMPT, SCORED)]})
    assert any(rid == "scored" and 1 < scored < len(PROMPT) for rid, scored in preempted)  # mid-prompt
    check_scores(events["scored"], PROMPT, want)
    assert engine.blocks.blocks_in_use == 0


def test_a_one_token_prompt_has_its_event_too(model):
    engine = Engine(model, max_context=64, kv_cache_tokens=256, block_size=4)
    sched = Scheduler(engine, max_num_seqs=2, max_batch_tokens=16)
    events = run(sched, {0: [("one", [42], SCORED)]})
    assert events["one"][0] == PromptLogprobs([(42, None, None)]) and len(events["one"]) == 5


def test_prompt_logprobs_are_refused_where_they_are_not_computed(model):
    with pytest.raises(ValueError, match=r"prompt_logprobs=21: must be an integer in \[0, 20\]"):
        SamplingParams(prompt_logprobs=21)
    one = Engine(model, max_context=64, kv_cache_tokens=256)
    with pytest.raises(ValueError, match="prompt_logprobs: the prompt's logprobs are computed by the serving"):
        next(one.generate(PROMPT, SCORED))
    staged = Engine(model, max_context=64, kv_cache_tokens=256, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="prompt_logprobs: the prompt's logprobs .* through pipeline stages"):
        Scheduler(staged, max_num_seqs=2, max_batch_tokens=16).submit("x", PROMPT, SCORED)
