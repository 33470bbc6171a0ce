"""Speculation in the serving scheduler: several requests drafting and verifying in one step,
each with its own accepted length. Greedy output is the plain scheduler's, token for token;
seeded sampled output is what `Engine.generate` gives the request alone with the same
speculation; stops, budgets, cancellation and KV blocks behave as without."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workers.engine.engine import Engine, Sequence
from workers.engine.sampling import SamplingParams
from workers.engine.scheduler import Scheduler
from workers.engine.skip_calibration import load_skip_set
from workers.engine.speculation import Speculation
from drive import drain

REPEATING = [5, 17, 99, 4, 23, 5, 17, 99, 4, 23, 5, 17, 99]  # lookup finds something to propose
PROMPTS = {"rep": REPEATING, "short": [1, 2, 3], "long": list(range(10, 40)), "rep2": [7, 8, 9, 7, 8, 9, 7, 8]}
SPECS = [Speculation(3), Speculation(2, "early-exit"), Speculation(3, "skip", skip=(0,)), Speculation(None),
         Speculation(None, "auto", skip=(1,))]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=1024, block_size=4)


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 24, "temperature": 0, "ignore_eos": True, **kw})


def served(engine, requests: dict[str, tuple[list[int], SamplingParams]], speculation=None, max_num_seqs=16,
           before_step=lambda sched, i: None) -> tuple[dict, Scheduler, list]:
    """Every request through one Scheduler, driven as the ComputeWorker drives it: ({id: [(token,
    text, finish, logprob, top)]}, the scheduler, the steps launched). Every KV block is back at
    the end."""
    sched = Scheduler(engine, max_num_seqs=max_num_seqs, max_batch_tokens=64, speculation=speculation)
    events: dict[str, list] = {}
    commit = sched.commit

    def recording(step, picked):
        out = commit(step, picked)
        for rid, e in out:
            events.setdefault(rid, []).append((e.token_id, e.text, e.finish_reason, e.logprob, e.top_logprobs))
        return out

    sched.commit = recording
    for rid, (prompt, p) in requests.items():
        sched.submit(rid, prompt, p)
    _, steps, _ = drain(sched, lambda i: before_step(sched, i))
    assert engine.blocks.blocks_in_use == 0
    return events, sched, steps


def same_events(got: dict, want: dict) -> None:
    """Each request's events equal: token, text and finish exactly, logprobs to 1e-5."""
    assert {rid: [e[:3] for e in events] for rid, events in got.items()} == {
        rid: [e[:3] for e in events] for rid, events in want.items()}
    for rid, events in got.items():
        for (*_, logprob, top), (*_, want_logprob, want_top) in zip(events, want[rid]):
            assert (logprob is None) == (want_logprob is None), rid
            if logprob is not None:
                assert logprob == pytest.approx(want_logprob, abs=1e-5)
                assert [t for t, _ in top] == [t for t, _ in want_top]
                assert [v for _, v in top] == pytest.approx([v for _, v in want_top], abs=1e-5)


def alone(engine, prompt, p, speculation=None):
    return [(e.token_id, e.text, e.finish_reason, e.logprob, e.top_logprobs)
            for e in engine.generate(prompt, p, speculation)]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_a_speculating_batch_gives_the_plain_batchs_greedy_tokens(engine, spec):
    """Mixed requests (lengths, a stop string, a budget that ends inside a pass, one with logprobs
    and one with a penalty, which decodes plainly beside the passes): the plain scheduler's
    events, event for event, logprobs included (to float32 rounding: a step of more than 12
    rows takes the CPU's GEMM, not one GEMV a row)."""
    requests = {"logprobs": (REPEATING[:8], params(max_tokens=20, logprobs=2))}
    requests |= {rid: (prompt, params(max_tokens=40)) for rid, prompt in PROMPTS.items()}
    requests["budget"] = (REPEATING, params(max_tokens=7))
    requests["penalty"] = (REPEATING[:9], params(max_tokens=20, repetition_penalty=1.2))
    plain, _, _ = served(engine, requests)
    stop = plain["rep"][5][1]  # a piece of text the greedy run writes, as a stop string
    if stop:
        requests["stop"] = (REPEATING, params(max_tokens=40, stop=(stop,)))
        plain, _, _ = served(engine, requests)
    got, sched, steps = served(engine, requests, spec)
    same_events(got, plain)
    stats = sched.spec_stats
    assert stats.passes > 0 and stats.accepted <= stats.drafted
    # several requests verified in one pass
    assert any(len(step.passes) > 1 for step in steps), (stats, [len(s.passes) for s in steps])
    assert not any("penalty" in [r.id for r in step.passes] for step in steps)
    assert spec.k is None or any("logprobs" in [r.id for r in step.passes] for step in steps)


def test_each_request_gets_what_it_gets_alone_with_the_same_speculation(engine):
    """Greedy and seeded sampled requests (temperature 0.8, each its own seed): each request's
    events through the scheduler are those `Engine.generate` gives it alone, so the drafts,
    the acceptance rule and the policy's choices are the single-request path's."""
    spec = Speculation(None, "auto", skip=(0,))
    requests = {"greedy": (REPEATING, params(max_tokens=30)),
                "hot": (REPEATING, params(max_tokens=30, temperature=0.8, seed=11)),
                "warm": (PROMPTS["rep2"], params(max_tokens=30, temperature=0.5, top_k=20, seed=3, logprobs=1)),
                "long": (PROMPTS["long"], params(max_tokens=30, temperature=0.8, seed=5))}
    got, sched, _ = served(engine, requests, spec)
    same_events(got, {rid: alone(engine, prompt, p, spec) for rid, (prompt, p) in requests.items()})
    assert sched.spec_stats.passes > 0


def test_a_steps_verifying_rows_stay_within_the_engines_logit_rows(tiny_model, monkeypatch):
    """With 3 requests drafting 6 tokens each and an engine keeping 8 rows of logits, no pass
    holds more than 8 rows: the later requests' k is cut to the rows left (and a request left
    none decodes plainly)."""
    engine = Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=1024, block_size=4, max_logit_rows=8)
    rows, start = [], engine.start_forward

    def counting(work, *args, **kwargs):
        if kwargs.get("decode_rows"):
            rows.append(sum(n for _, n in work))
        return start(work, *args, **kwargs)

    monkeypatch.setattr(engine, "start_forward", counting)
    requests = {rid: (REPEATING, params(max_tokens=20)) for rid in "abc"}
    got, _, steps = served(engine, requests, Speculation(6), max_num_seqs=8)
    monkeypatch.undo()
    assert got == served(engine, requests, max_num_seqs=8)[0]
    assert rows and max(rows) <= 8
    assert any(sum(c.k for c in step.passes.values()) + len(step.requests) == 8 for step in steps)


def test_a_pass_leaves_the_later_decodes_of_its_step_their_blocks(engine):
    """Two requests decoding at position 8 (blocks of 4: each needs a third block) with 2
    blocks free: a's pass of 5 rows would take both and preempt b, so a decodes plainly and
    both are in the step; once the blocks come back, both draft."""
    sched = Scheduler(engine, max_num_seqs=8, max_batch_tokens=64, speculation=Speculation(4))
    for rid in "ab":
        sched.submit(rid, REPEATING[:8], params(max_tokens=20))
    sched.step()  # both prompts, and their first tokens
    hog = Sequence([0])
    engine.blocks.reserve(hog, (engine.blocks.free_blocks - 2) * engine.blocks.block_size)
    step = sched.plan()
    assert [r.id for r in step.requests] == ["a", "b"] and not step.passes
    sched.commit(step, sched.run(step))
    engine.release(hog)
    step = sched.plan()
    assert [r.id for r in step.passes] == ["a", "b"]
    sched.commit(step, sched.run(step))
    while sched.has_work:
        sched.step()
    assert engine.blocks.blocks_in_use == 0


def test_cancelling_a_request_while_its_pass_is_in_flight_frees_its_blocks(engine):
    """Cancelled between a pass's launch and its commit: its tokens of that pass are dropped,
    its blocks go back at the commit, the other request is unaffected."""
    requests = {"a": (REPEATING, params(max_tokens=30)), "b": (PROMPTS["rep2"], params(max_tokens=30))}
    plain, _, _ = served(engine, requests)

    def cancel_b(sched, i):
        if i == 4:
            sched.cancel("b")

    got, _, steps = served(engine, requests, Speculation(3), before_step=cancel_b)
    assert got["a"] == plain["a"]
    assert 0 < len(got["b"]) < len(plain["b"]) and got["b"] == plain["b"][:len(got["b"])]


def test_the_policys_plain_runs_run_ahead_in_the_scheduler(engine, monkeypatch):
    """With sampling on the device (the NumPy twin standing in), under auto with a drafter that
    rarely pays (early exit through a quarter of a random model's layers), the policy's plain
    steps are greedy steps fed on the device (run ahead), and the tokens are the plain
    scheduler's."""
    monkeypatch.setattr(engine.ops, "device_sampling", True, raising=False)
    requests = {rid: (prompt, params(max_tokens=60)) for rid, prompt in PROMPTS.items()}
    plain, _, _ = served(engine, requests)
    got, sched, steps = served(engine, requests, Speculation(None, "early-exit"))
    assert got == plain
    assert sched.spec_stats.plain_steps > 0 and any(step.fed for step in steps)


def test_the_policy_weighs_each_pass_by_its_steps_decodes(engine, monkeypatch):
    """A pass that pays only alone (rate above 1 at batch 1, below it in a batch): while three
    requests decode together their policies are asked with batch 3, then 2, then 1 as they
    finish, and only the last one alone speculates on every step."""
    from workers.engine.draft_policy import DraftPolicy

    asked = []
    monkeypatch.setattr(DraftPolicy, "rate", lambda self, d, k, batch=1, tree=False: asked.append(batch) or (
        2.0 if batch == 1 else 0.5))
    requests = {"a": (PROMPTS["rep"], params(max_tokens=40)), "b": (PROMPTS["short"], params(max_tokens=20)),
                "c": (PROMPTS["rep2"], params(max_tokens=10))}
    plain, _, _ = served(engine, requests)
    got, sched, steps = served(engine, requests, Speculation(None, "lookup"))
    assert got == plain
    assert {1, 2, 3} <= set(asked) <= {1, 2, 3}
    together = [s for s in steps if len(s.requests) == 3 and all(n == 1 for _, n in s.work)]
    assert together and not any(s.passes for s in together[:8])  # plain until the first probe
    assert steps[-1].passes and len(steps[-1].requests) == 1


@pytest.mark.parametrize("arch, kv_type", [("llama", "q4"), ("gemma3", None)], ids=["rotate-kv-q4", "sliding"])
def test_passes_over_a_quantized_or_sliding_cache_give_the_plain_batchs_tokens(tiny_model, arch, kv_type):
    """Over a RotateKV q4 cache (past its recent window: the ring slot each sequence's rows
    share survives rejected tails) and over Gemma 3's sliding pool (blocks behind the window
    given back, then trimmed tails): the plain scheduler's greedy events."""
    engine = Engine(tiny_model(arch), max_context=256, kv_cache_tokens=1024, block_size=4, kv_type=kv_type)
    prompts = [np.random.default_rng(i).integers(3, 200, n).tolist() + REPEATING for i, n in enumerate((150, 40, 90))]
    requests = {str(i): (p, params(max_tokens=40)) for i, p in enumerate(prompts)}
    plain, _, _ = served(engine, requests)
    got, sched, steps = served(engine, requests, Speculation(4))
    assert got == plain
    assert sched.spec_stats.accepted > 0 and any(len(step.passes) > 1 for step in steps)


@pytest.mark.gpu
def test_gpu_a_speculating_batch_gives_the_plain_batchs_greedy_tokens(tiny_model, cuda_device):
    """On the GPU: the passes' drafts as chains of several sequences through the graphs, the
    pass as decode rows beside plain rows, the plain runs of auto run ahead; the plain
    scheduler's events."""
    gpu = Engine(tiny_model("llama"), backend="cupy", max_context=256, kv_cache_tokens=1024, block_size=16)
    requests = {rid: (prompt, params(max_tokens=40)) for rid, prompt in PROMPTS.items()}
    plain, _, _ = served(gpu, requests)
    for spec in [Speculation(3), Speculation(2, "early-exit"), Speculation(None, "auto", skip=(1,))]:
        got, sched, steps = served(gpu, requests, spec)
        assert got == plain, spec
        assert sched.spec_stats.passes > 0, spec
        assert spec.k is None or any(len(step.passes) > 1 for step in steps), spec


SKIP_SET = Path(__file__).resolve().parents[1] / "tools" / "data" / "skip_qwen2.5-coder-0.5b.json"


@pytest.mark.real_model
def test_a_speculating_batch_on_the_real_model_gives_the_plain_batchs_greedy_tokens(real_model_path):
    """The default model on the CPU, a batch of a code prompt, a prose prompt and a chat prompt
    with their own budgets, through the scheduler plainly and with every drafter: the same
    events. 12 rows of logits a step at most: each row's products are then one GEMV a row
    (numpy_backend.GEMV_ROWS), bit for bit a plain decode row's."""
    e = Engine(real_model_path, max_context=1024, max_logit_rows=12)
    prompts = {"code": e.prompt_ids('def fizzbuzz(n):\n    """Return "Fizz", "Buzz", "FizzBuzz" or str(n)."""\n'),
               "prose": e.prompt_ids("The history of the printing press begins"),
               "chat": e.chat_prompt_ids([{"role": "user",
                                           "content": "Write a Python function that reverses a list."}])}
    requests = {rid: (ids, params(max_tokens=n)) for (rid, ids), n in zip(prompts.items(), (24, 16, 20))}
    plain, _, _ = served(e, requests, max_num_seqs=12)
    for spec in [Speculation(4), Speculation(3, "early-exit", depth=6),
                 Speculation(3, "skip", skip=load_skip_set(SKIP_SET, 24, 6)),
                 Speculation(None, "auto", skip=load_skip_set(SKIP_SET, 24))]:
        got, sched, _ = served(e, requests, spec, max_num_seqs=12)
        assert got == plain, spec
        assert sched.spec_stats.passes > 0, spec


def test_a_finished_greedy_request_leaves_the_engine_what_it_measured(engine):
    """The scheduler keeps each finished greedy request's policy in the engine's DraftMemory (a
    sampled one's not: its seed must reproduce its choices), for the next greedy request."""
    from workers.engine.draft_policy import DraftMemory

    engine.draft_memory = DraftMemory()
    spec = Speculation(None, "auto", skip=(1,))
    served(engine, {"s": (REPEATING, params(temperature=0.9, seed=2, max_tokens=30))}, spec)
    assert not engine.draft_memory.counts
    _, sched, _ = served(engine, {"g": (REPEATING, params(max_tokens=40))}, spec)
    assert sched.spec_stats.passes > 0 and engine.draft_memory.counts
