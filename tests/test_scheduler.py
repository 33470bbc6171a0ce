"""Continuous batching on a tiny synthetic model: batched output equals one-request output,
chunked prefill keeps decodes moving, admission control, cancellation, preemption."""

from __future__ import annotations

import pytest

from workers.engine.engine import ContextLengthError, Engine
from workers.engine.sampling import SamplingParams
from workers.engine.scheduler import QueueFull, Scheduler
from drive import drain

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model("qwen2"), max_context=64, kv_cache_tokens=256, block_size=4)


def solo(engine, prompt, params):
    return [e.token_id for e in engine.generate(prompt, params)]


def run(scheduler, max_steps=200):
    """Step until idle; returns ({id: [token ids]}, {id: finish_reason}, per-step event ids)."""
    tokens, finish, steps = {}, {}, []
    for _ in range(max_steps):
        if not scheduler.has_work:
            return tokens, finish, steps
        events = scheduler.step()
        steps.append([rid for rid, _ in events])
        for rid, e in events:
            tokens.setdefault(rid, []).append(e.token_id)
            if e.finish_reason:
                finish[rid] = e.finish_reason
    raise AssertionError("scheduler did not drain")


def check_batched_equals_solo(sched, engine, prompts, params):
    """Submit every prompt and run to the end: each request's tokens are those it gets alone,
    and every KV block is freed. Returns the finish reasons."""
    for rid, prompt in prompts.items():
        sched.submit(rid, prompt, params)
    tokens, finish, _ = run(sched)
    for rid, prompt in prompts.items():
        assert tokens[rid] == solo(engine, prompt, params), rid
    assert engine.blocks.blocks_in_use == 0
    return finish


PROMPTS = {"a": [1, 2, 3], "b": list(range(10, 40)), "c": [7] * 9, "d": list(range(100, 117))}


def test_batched_equals_solo_with_chunked_prefill(engine):
    sched = Scheduler(engine, max_num_seqs=4, max_batch_tokens=8)
    finish = check_batched_equals_solo(sched, engine, PROMPTS, GREEDY)
    assert finish == dict.fromkeys(PROMPTS, "length")


def test_long_prompt_does_not_stall_decodes(engine):
    sched = Scheduler(engine, max_num_seqs=4, max_batch_tokens=6)
    sched.submit("short", [1, 2], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    sched.step()  # "short" is prefilled and decoding
    sched.submit("long", list(range(50)), GREEDY)
    steps = [[rid for rid, _ in sched.step()] for _ in range(6)]
    # 50 prompt tokens at <= 5 a step take 10 steps; "short" gets a token in every one of them.
    assert all(s == ["short"] for s in steps)
    run(sched)
    assert engine.blocks.blocks_in_use == 0


def test_seeded_sampling_and_stop_strings_match_solo(engine):
    sampled = SamplingParams(temperature=1.0, top_k=20, seed=5, max_tokens=8, ignore_eos=True, logprobs=2)
    sched = Scheduler(engine, max_num_seqs=2, max_batch_tokens=16)
    sched.submit("x", [4, 5, 6], sampled)
    sched.submit("y", [4, 5, 6], sampled)
    tokens, _, _ = run(sched)
    assert tokens["x"] == tokens["y"] == solo(engine, [4, 5, 6], sampled)


def test_admission_control_and_context_check(engine):
    sched = Scheduler(engine, max_num_seqs=1, max_batch_tokens=4, max_queue=2)
    sched.submit("1", [1], GREEDY)
    sched.submit("2", [1], GREEDY)
    with pytest.raises(QueueFull, match="retry later"):
        sched.submit("3", [1], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        sched.submit("1", [1], GREEDY)
    sched.step()  # "1" leaves the queue for the batch, so one more fits
    with pytest.raises(ContextLengthError, match="context window is 64"):
        sched.submit("too-long", list(range(64)), GREEDY)
    sched.submit("3", [1], GREEDY)
    _, finish, _ = run(sched)
    assert set(finish) == {"1", "2", "3"}


def test_cancel_frees_blocks_at_once_and_mid_step(engine):
    sched = Scheduler(engine, max_num_seqs=4, max_batch_tokens=64)
    sched.submit("gone", list(range(30)), GREEDY)
    sched.submit("stays", [1, 2, 3], GREEDY)
    sched.submit("queued", [1], GREEDY)
    sched.step()
    before = engine.blocks.blocks_in_use
    assert sched.cancel("gone") and not sched.cancel("gone")
    assert engine.blocks.blocks_in_use == before - 8  # its 30 cached tokens in blocks of 4
    step = sched.plan()
    assert sched.cancel("stays")  # mid-step: freed when the step commits
    events = sched.commit(step, sched.run(step))
    assert [rid for rid, _ in events] == ["queued"]
    assert sched.cancel("queued")
    assert engine.blocks.blocks_in_use == 0 and not sched.has_work


def run_ahead(scheduler, before_step=lambda i: None):
    """Step until idle as the ComputeWorker does (a greedy step is followed by the next, fed
    on the device, before it is committed). Returns ({id: [token ids]}, steps run ahead)."""
    tokens, steps, _ = drain(scheduler, before_step)
    return tokens, sum(step.fed for step in steps)


def test_greedy_steps_run_ahead_and_output_is_unchanged(engine, monkeypatch):
    """With sampling on the device (the NumPy twin standing in), greedy decode steps are
    started before the previous step's ids are read (plan_ahead, fed on the device); each
    request still gets the tokens it gets alone: one stopped by a stop id (the token computed
    after it dropped), one admitted while the others run ahead, and every block comes back.
    A request wanting logprobs keeps its batch from running ahead."""
    monkeypatch.setattr(engine.ops, "device_sampling", True, raising=False)
    sched = Scheduler(engine, max_num_seqs=4, max_batch_tokens=64)
    params = GREEDY.with_(max_tokens=12)
    alone = {rid: solo(engine, p, params) for rid, p in PROMPTS.items()}
    sched.submit("a", PROMPTS["a"], params)
    stop = alone["b"][3]
    sched.submit("b", PROMPTS["b"], params.with_(stop_ids=[stop]))
    tokens, fed = run_ahead(sched, before_step=lambda i: i == 6 and sched.submit("d", PROMPTS["d"], params))
    assert tokens["a"] == alone["a"] and tokens["d"] == alone["d"]
    assert tokens["b"] == alone["b"][:alone["b"].index(stop) + 1]  # through the stop id's first occurrence
    assert fed >= 8
    assert engine.blocks.blocks_in_use == 0 and not sched.has_work

    sched.submit("a", PROMPTS["a"], params)
    sched.submit("c", PROMPTS["c"], params.with_(logprobs=1))
    tokens, fed = run_ahead(sched)
    assert tokens == {"a": alone["a"], "c": alone["c"]} and fed == 0
    assert engine.blocks.blocks_in_use == 0


def test_cancel_while_steps_run_ahead(engine, monkeypatch):
    """A request cancelled while two of its steps are in flight keeps its blocks until the
    last of them commits; the other request decodes on."""
    monkeypatch.setattr(engine.ops, "device_sampling", True, raising=False)
    sched = Scheduler(engine, max_num_seqs=4, max_batch_tokens=64)
    sched.submit("gone", [1, 2, 3], GREEDY.with_(max_tokens=20))
    sched.submit("stays", [4, 5], GREEDY.with_(max_tokens=20))
    first = sched.plan()
    sched.commit(first, sched.run(first))  # both prefilled, each with a token to decode
    step = sched.plan()
    pending = sched.launch(step)
    ahead = sched.plan_ahead(step)
    assert ahead is not None and ahead.fed
    later = sched.launch(ahead)
    held = engine.blocks.blocks_in_use
    assert sched.cancel("gone")
    assert engine.blocks.blocks_in_use == held
    assert [rid for rid, _ in sched.commit(step, pending())] == ["stays"]
    assert engine.blocks.blocks_in_use == held
    assert [rid for rid, _ in sched.commit(ahead, later())] == ["stays"]
    assert engine.blocks.blocks_in_use < held
    tokens, _ = run_ahead(sched)
    assert len(tokens["stays"]) == 20 - 3
    assert engine.blocks.blocks_in_use == 0


def test_preemption_recomputes_and_output_is_unchanged(tiny_model):
    # 64 cache tokens: three 20-token prompts growing by 12 each cannot all stay resident.
    small = Engine(tiny_model("qwen2"), max_context=64, kv_cache_tokens=64, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = {str(i): list(range(20 * i, 20 * i + 20)) for i in range(3)}
    sched = Scheduler(small, max_num_seqs=3, max_batch_tokens=64)
    check_batched_equals_solo(sched, small, prompts, params)


def test_failed_forward_drops_the_step(engine, monkeypatch):
    sched = Scheduler(engine)
    sched.submit("r", [1, 2], GREEDY)

    def broken(work, **_):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "start_forward", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        sched.step()
    assert not sched.has_work and engine.blocks.blocks_in_use == 0


def test_prompt_lookup_drafts():
    from workers.engine.speculation import lookup_proposal

    assert lookup_proposal([5, 6, 7, 8, 9, 5, 6, 7], k=2) == [8, 9]
    assert lookup_proposal([1, 2, 3, 1, 2, 4, 4, 2], k=3) == [4, 4, 2]  # the latest match of "2" wins
    assert lookup_proposal([1, 2, 3], k=2) == []


def test_one_sampling_call_per_step_routes_rows(engine, monkeypatch):
    """Engine.sample: rows without penalties go to the backend in one call (the device path;
    here the NumPy twin stands in for it): its argmax when all are greedy, else its sampler; the
    rest to the host Sampler, rows without a sampler are skipped; the rows that ask for
    logprobs get them in one more call; both paths record the token for later penalties."""
    import numpy as np

    from workers.engine.sampling import Sampler, log_softmax

    calls = []
    monkeypatch.setattr(engine.ops, "device_sampling", True, raising=False)
    twin, twin_argmax = engine.ops.sample, engine.ops.argmax
    monkeypatch.setattr(engine.ops, "sample", lambda rows, *a: calls.append(("sample", len(rows))) or twin(rows, *a),
                        raising=False)
    monkeypatch.setattr(engine.ops, "argmax", lambda rows: calls.append(("argmax", len(rows))) or twin_argmax(rows),
                        raising=False)
    twin_logprobs = engine.ops.token_logprobs
    monkeypatch.setattr(engine.ops, "token_logprobs", lambda rows, *a: calls.append(("token_logprobs", len(rows)))
                        or twin_logprobs(rows, *a), raising=False)
    logits = np.random.default_rng(0).normal(size=(4, 300)).astype(np.float32)
    samplers = [Sampler(GREEDY), None, Sampler(GREEDY.with_(logprobs=2)),
                Sampler(GREEDY.with_(repetition_penalty=1.3))]
    picked = engine.sample(logits, samplers)
    want = logits.argmax(axis=1)
    assert calls == [("argmax", 2), ("token_logprobs", 1)]  # rows 0 and 2 are eligible for the device, and greedy
    assert picked[0] == (int(want[0]), None, None) and picked[1] is None
    token, logprob, top = picked[2]
    assert token == want[2] and logprob == pytest.approx(float(log_softmax(logits[2])[want[2]]), abs=1e-6)
    assert [t for t, _ in top] == list(np.argsort(-logits[2])[:2])
    assert picked[3][0] == want[3]
    assert samplers[0].history[int(want[0])] == 1 and samplers[3].history[int(want[3])] == 1

    seeded = GREEDY.with_(temperature=0.9, seed=7)
    draws = [engine.sample(logits[:1], [Sampler(seeded)])[0][0] for _ in range(2)]
    assert draws[0] == draws[1]  # the per-request seed decides the device draw too
    calls.clear()
    mixed = engine.sample(logits[:2], [Sampler(GREEDY), Sampler(seeded)])
    assert calls == [("sample", 2)] and mixed[0][0] == want[0]
