"""Self-speculative greedy decoding: the same tokens as plain greedy decoding, several a pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workers.engine import draft_policy
from workers.engine.draft_policy import (PROBE_FIRST, PROBE_MAX, VERIFY_COST, DraftMemory, DraftPolicy,
                                         expected_tokens)
from workers.engine.engine import Engine, Sequence
from workers.engine.sampling import SamplingParams
from workers.engine.skip_calibration import calibrate, load_skip_set, own_continuations, read_prompts, score, write
from workers.engine.speculation import Speculation, accept_sampled, lookup_proposal
from workers.model.gguf_file import GGUFFile
from workers.model.synthetic import rewrite_model
from drive import forward

REPEATING = [5, 17, 99, 4, 23, 5, 17, 99, 4, 23, 5, 17, 99]  # lookup finds something to propose


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=512)


def run(engine, prompt, speculation=None, **params):
    params = SamplingParams(**{"max_tokens": 24, "temperature": 0, "ignore_eos": True, **params})
    events = list(engine.generate(prompt, params, speculation))
    return [(e.token_id, e.text, e.finish_reason) for e in events]


SPECS = [Speculation(1), Speculation(4), Speculation(3, "early-exit"), Speculation(5, "early-exit", depth=1),
         Speculation(3, "skip", skip=(0,)), Speculation(2, "auto", skip=(1,)), Speculation(None),
         Speculation(None, "auto", skip=(0,))]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_speculative_greedy_gives_the_plain_greedy_tokens(engine, spec):
    engine.draft_memory = DraftMemory()  # each case from the priors
    plain = run(engine, REPEATING, max_tokens=40)
    assert run(engine, REPEATING, spec, max_tokens=40) == plain
    stats = engine.last_speculation
    assert stats.passes > 0 and stats.accepted <= stats.drafted  # auto probes within 40 tokens at least
    assert engine.blocks.free_blocks == engine.blocks.num_blocks  # rejected tails and the request gave their blocks back


def test_the_policys_plain_runs_decode_ahead_of_the_host_and_change_no_token(engine, monkeypatch):
    """Under --speculate auto, each run of plain steps the policy has decided goes through
    greedy_decode for exactly its length (each step started on the device before the host
    reads the last one's id), as plain decoding's steps do where the backend samples on the
    device (here pretended: the NumPy backend's greedy_decode is the same computation). The
    tokens, the passes and the plain steps are those of the step-by-step run."""
    spec = Speculation(None, "lookup")
    prompt = [7, 3, 11, 2, 19, 5, 13, 8]  # little for lookup to find: mostly plain steps
    engine.draft_memory = DraftMemory()  # both runs from the priors, so they choose alike
    by_step = run(engine, prompt, spec, max_tokens=60)
    stats = engine.last_speculation
    assert by_step == run(engine, prompt, max_tokens=60)
    runs = []
    greedy_decode = engine.greedy_decode

    def recorded(seqs, steps=None):
        runs.append(steps)
        return greedy_decode(seqs, steps)

    monkeypatch.setattr(engine, "decodes_ahead", lambda params: True)
    monkeypatch.setattr(engine, "greedy_decode", recorded)
    engine.draft_memory = DraftMemory()
    assert run(engine, prompt, spec, max_tokens=60) == by_step
    ahead = engine.last_speculation
    assert (ahead.passes, ahead.plain_steps) == (stats.passes, stats.plain_steps) and stats.plain_steps > 10
    assert runs and all(n >= 1 for n in runs) and max(runs) > 1
    # every plain step but those the request's end cut short came from a run
    assert sum(runs) - ahead.plain_steps in range(0, max(runs))
    assert engine.blocks.free_blocks == engine.blocks.num_blocks


@pytest.mark.gpu
def test_gpu_the_policys_plain_runs_decode_ahead(tiny_model, cuda_device, monkeypatch):
    """On the GPU the same runs go through greedy_decode without pretending, and the tokens
    are the plain greedy ones."""
    gpu = Engine(tiny_model("llama"), backend="cupy", max_context=256, kv_cache_tokens=512)
    prompt = [7, 3, 11, 2, 19, 5, 13, 8]
    plain = run(gpu, prompt, max_tokens=60)
    runs = []
    greedy_decode = gpu.greedy_decode
    monkeypatch.setattr(gpu, "greedy_decode", lambda seqs, steps=None: runs.append(steps) or greedy_decode(seqs, steps))
    assert run(gpu, prompt, Speculation(None, "lookup"), max_tokens=60) == plain
    assert gpu.last_speculation.plain_steps > 10 and max(runs) > 1


def test_plain_steps_ahead_counts_the_nones_next_returns():
    policy = DraftPolicy(Speculation(None, "lookup"), {"lookup": None}, {"lookup": 0.0}, verify_cost={1: 3.0})
    for _ in range(3):  # runs of 8, 16, 32 plain steps, each then a probe
        assert policy.next() is None
        n = policy.plain_steps_ahead()
        assert [policy.next() for _ in range(n)] == [None] * n and policy.next() is not None
    policy.update("lookup", 4, 4)
    assert policy.plain_steps_ahead() == 0  # a pass now pays


@pytest.mark.parametrize("spec", [Speculation(4), Speculation(3, "early-exit"), Speculation(3, "skip", skip=(0,))],
                         ids=repr)
def test_speculation_over_a_rotate_kv_cache_gives_its_plain_greedy_tokens(tiny_model, spec):
    """Over a q4 cache, past the recent window (a 150-token prompt): a verify pass reads each
    position's keys as a decode step at that position does (the window per query), and the
    ring survives rejected tails, so the tokens are plain greedy decoding's over the same cache."""
    q4 = Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=512, kv_type="q4")
    prompt = np.random.default_rng(5).integers(3, 200, 150).tolist() + REPEATING
    plain = run(q4, prompt, max_tokens=40)
    assert run(q4, prompt, spec, max_tokens=40) == plain
    assert q4.last_speculation.passes > 0
    exact = Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=512)
    lse = [np.asarray([r["lse"] for r in e.score(prompt)]) for e in (q4, exact)]
    assert np.abs(lse[0] - lse[1])[100:].max() > 1e-5  # the cache is quantized past the window


def test_a_drafter_that_is_the_model_has_every_proposal_accepted(engine):
    """Early exit after every layer drafts what the model computes: k + 1 tokens a pass (the
    last pass is cut by max_tokens)."""
    spec = Speculation(3, "early-exit", depth=engine.config.n_layers)
    plain = run(engine, REPEATING, max_tokens=17)
    assert run(engine, REPEATING, spec, max_tokens=17) == plain
    s = engine.last_speculation
    assert s.accepted == s.drafted and s.passes == 4  # 1 token from the prefill, then 4 + 4 + 4 + 4


def test_each_pass_starts_before_the_last_ones_tokens_are_handed_out(engine, monkeypatch):
    """generate starts the next verifying pass as soon as one is settled and hands out that
    one's tokens while it runs (on a GPU their host work overlaps the pass); it starts none
    past the budget or after a stop id, so every pass started is one settled."""
    spec = Speculation(3, "early-exit", depth=engine.config.n_layers)  # 4 tokens every pass
    started = []
    start_forward = engine.start_forward

    def counted(work, *args, **kwargs):
        started.append(kwargs.get("decode_rows", False))
        return start_forward(work, *args, **kwargs)

    monkeypatch.setattr(engine, "start_forward", counted)
    params = SamplingParams(max_tokens=17, temperature=0, ignore_eos=True)
    seen = [sum(started) for _ in engine.generate(REPEATING, params, spec)]
    # the prefill's token, then each pass's 4 handed out with the next pass started (none after the 4th)
    assert seen == [0] + [2] * 4 + [3] * 4 + [4] * 8
    assert engine.last_speculation.passes == 4
    stop = run(engine, REPEATING, max_tokens=17)[6][0]
    started.clear()
    fast = run(engine, REPEATING, spec, max_tokens=17, stop_ids=(stop,))
    assert sum(started) == engine.last_speculation.passes == 2  # the stop is among the 2nd pass's tokens
    assert fast == run(engine, REPEATING, max_tokens=17, stop_ids=(stop,))


def test_a_consumer_that_stops_mid_pass_gets_every_block_back(engine):
    """Closing generate while a pass started ahead is in flight (its tokens not yet handed
    out) releases the request's blocks, and the engine serves the next request as before."""
    spec = Speculation(3, "early-exit", depth=engine.config.n_layers)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    events = engine.generate(REPEATING, params, spec)
    first = [next(events).token_id for _ in range(3)]  # the prefill's token and two of the first pass's 4
    events.close()
    assert engine.blocks.free_blocks == engine.blocks.num_blocks
    plain = run(engine, REPEATING)
    assert [t for t, _, _ in plain[:3]] == first
    assert run(engine, REPEATING, spec) == plain


def test_max_tokens_and_stops_end_a_speculative_run_where_plain_decoding_ends(engine):
    spec = Speculation(5, "early-exit", depth=engine.config.n_layers)
    for params in ({"max_tokens": 7}, {"max_tokens": 1}, {"stop_ids": (run(engine, REPEATING)[5][0],)}):
        plain, fast = run(engine, REPEATING, **params), run(engine, REPEATING, spec, **params)
        assert fast == plain and len(fast) <= 24
    assert engine.blocks.free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 3}], ids=["greedy", "sampled"])
def test_a_speculative_run_gives_each_token_the_logprobs_plain_decoding_gives_it(engine, sampling):
    """A kept token's logprob and top logprobs come from its row of the pass: the raw
    distribution at its position, as plain decoding's step computes it (to float32 rounding)."""
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=3, **{"temperature": 0, **sampling})
    spec = Speculation(4, "early-exit", depth=engine.config.n_layers)  # every proposal kept: long runs
    fast = list(engine.generate(REPEATING, params, spec))
    assert engine.last_speculation.passes < 12
    tokens = [e.token_id for e in fast]
    if params.greedy:
        events = list(engine.generate(REPEATING, params))
        assert [e.token_id for e in events] == tokens
        plain = [(e.logprob, e.top_logprobs) for e in events]
    else:  # the same tokens fed to the model in one pass, each scored from the row before it
        seq = Sequence(REPEATING + tokens)
        rows = forward(engine, [(seq, len(seq.token_ids))], all_logits=True)[len(REPEATING) - 1:-1]
        engine.release(seq)
        lp = rows.astype(np.float64) - np.logaddexp.reduce(rows.astype(np.float64), axis=-1)[:, None]
        plain = [(row[t], [(int(i), row[i]) for i in np.argsort(-row, kind="stable")[:3]])
                 for row, t in zip(lp, tokens)]
    for f, (logprob, top) in zip(fast, plain):
        assert f.logprob == pytest.approx(logprob, abs=1e-4)
        assert [t for t, _ in f.top_logprobs] == [t for t, _ in top]
        assert [v for _, v in f.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-4)


def test_a_pass_holds_no_more_rows_than_the_engines_logits(tiny_model, monkeypatch):
    """k = 8 on an engine that keeps 4 rows of logits a step: each pass drafts 3, the tokens
    are plain decoding's."""
    small = Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=512, max_logit_rows=4)
    rows, start = [], small.start_forward
    monkeypatch.setattr(small, "start_forward", lambda work, *a, **kw: rows.append(sum(n for _, n in work))
                        or start(work, *a, **kw))
    fast = run(small, REPEATING, Speculation(8))
    monkeypatch.undo()
    assert fast == run(small, REPEATING) and max(rows[1:]) == 4


def test_penalized_requests_decode_plainly(engine):
    run(engine, REPEATING, Speculation(4), temperature=0.8, seed=1, repetition_penalty=1.3)
    assert engine.last_speculation.passes == 0


@pytest.mark.parametrize("spec", [Speculation(4), Speculation(3, "early-exit", depth=1),
                                  Speculation(3, "skip", skip=(0,)), Speculation(None, "auto", skip=(1,))], ids=repr)
def test_sampled_speculation_is_reproducible_by_seed_and_ends_where_asked(engine, spec):
    a = run(engine, REPEATING, spec, temperature=0.9, top_k=20, seed=7, max_tokens=30)
    choices = engine.last_speculation.choices
    assert engine.last_speculation.passes > 0
    run(engine, REPEATING, spec, max_tokens=30)  # a greedy request between: the engine's DraftMemory changes
    assert run(engine, REPEATING, spec, temperature=0.9, top_k=20, seed=7, max_tokens=30) == a
    assert engine.last_speculation.choices == choices  # the adaptive choices too
    assert len(a) == 30 and a[-1][2] == "length"
    assert engine.blocks.free_blocks == engine.blocks.num_blocks


# Chi-square critical values at p = 0.001 (df: categories - 1).
CHI2_999 = {24: 51.18}


def chi_square(counts: np.ndarray, expected: np.ndarray) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def two_tokens(rule, p1, p2, q1, q2, draws, seed):
    """The first two tokens of a pass over 5-token distributions: proposals drawn from the
    drafter's q (independent positions), kept or replaced by `rule`; the second token is the
    model's own draw from p2 when the first proposal was rejected (as the next pass would)."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((5, 5))
    for _ in range(draws):
        d1, d2 = int(rng.choice(5, p=q1)), int(rng.choice(5, p=q2))
        kept = rule(np.stack([p1, p2, p2]), [q1, q2], [d1, d2], rng)
        second = kept[1] if len(kept) > 1 else int(rng.choice(5, p=p2))
        counts[kept[0], second] += 1
    return counts


@pytest.mark.parametrize("certain", [False, True], ids=["drafter-sampled", "drafter-certain"])
def test_speculative_sampling_draws_from_the_model_distribution(certain):
    """Joint counts of the first two tokens against p1 x p2 (chi-square, p = 0.001); the same
    test rejects a rule that keeps every proposal."""
    p1, p2 = np.array([0.4, 0.25, 0.2, 0.1, 0.05]), np.array([0.05, 0.15, 0.5, 0.2, 0.1])
    q1, q2 = np.array([0.1, 0.1, 0.2, 0.3, 0.3]), np.array([0.3, 0.3, 0.2, 0.1, 0.1])
    if certain:  # a lookup drafter proposes one token for sure at each position
        q1, q2 = np.eye(1, 5, 3)[0], np.eye(1, 5, 2)[0]

    def rule(p_rows, q_rows, proposed, rng):
        return accept_sampled(lambda i: p_rows[i], None if certain else q_rows, proposed, rng)

    draws = 20_000
    expected = draws * np.outer(p1, p2)
    assert chi_square(two_tokens(rule, p1, p2, q1, q2, draws, seed=1), expected) < CHI2_999[24]

    def keep_all(p_rows, q_rows, proposed, rng):
        return proposed

    assert chi_square(two_tokens(keep_all, p1, p2, q1, q2, draws, seed=1), expected) > CHI2_999[24]


def test_bad_speculation_settings_are_refused():
    with pytest.raises(ValueError, match="speculate must be in"):
        Speculation(0)
    with pytest.raises(ValueError, match="unknown drafter"):
        Speculation(2, "medusa")
    with pytest.raises(ValueError, match="draft layers"):
        Speculation(2, "early-exit", depth=0)
    with pytest.raises(ValueError, match="needs a skip set"):
        Speculation(2, "skip")
    with pytest.raises(ValueError, match="must leave at least one"):
        Speculation(2, "skip", skip=(0, 1)).drafters(2)
    with pytest.raises(ValueError, match="out of range: \\[5\\]"):
        Speculation(2, "skip", skip=(5,)).drafters(2)
    assert lookup_proposal([1, 2, 3, 1, 2], k=4) == [3, 1, 2]


SKIP_SET = Path(__file__).resolve().parents[1] / "tools" / "data" / "skip_qwen2.5-coder-0.5b.json"


@pytest.mark.real_model
@pytest.mark.parametrize("spec", [Speculation(4), Speculation(3, "early-exit", depth=6),
                                  Speculation(3, "skip", skip=load_skip_set(SKIP_SET, 24, 6)),
                                  Speculation(None, "auto", skip=load_skip_set(SKIP_SET, 24))], ids=repr)
def test_speculation_on_the_real_model_gives_the_plain_greedy_tokens(real_engine, spec):
    prompt = real_engine.prompt_ids('def fizzbuzz(n):\n    """Return "Fizz", "Buzz", "FizzBuzz" or str(n)."""\n')
    plain = run(real_engine, prompt, max_tokens=32)
    assert run(real_engine, prompt, spec, max_tokens=32) == plain
    assert real_engine.last_speculation.passes < 32


def test_a_forward_over_a_subset_of_layers_is_the_model_without_the_others(engine, tiny_model, tmp_path):
    """forward(layers=(1,)) against the whole model with layer 0's output products zeroed (the
    layer then adds nothing to the residual stream): a reference that does not skip anything."""
    src = GGUFFile(tiny_model("llama"))
    tensors = dict(src.tensors)
    for name in ("blk.0.attn_output.weight", "blk.0.ffn_down.weight"):
        t = tensors[name]
        tensors[name] = (np.zeros_like(np.asarray(t.data)), t.qtype)
    zeroed = Engine(rewrite_model(tmp_path / "zeroed.gguf", src.metadata, tensors), max_context=256)

    def logits(e, layers=None):
        seq = Sequence(list(REPEATING))
        e.reserve([(seq, len(REPEATING))])
        try:
            return e.forward([(seq, len(REPEATING))], all_logits=True, layers=layers)
        finally:
            e.release(seq)

    want, got = logits(zeroed), logits(engine, layers=(1,))
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    assert np.max(np.abs(logits(engine) - want)) > 1e-2 * np.max(np.abs(want))  # layer 0 matters
    with pytest.raises(ValueError, match="ascending distinct"):
        logits(engine, layers=(1, 0))


def test_the_policy_speculates_when_a_pass_pays_and_steps_plainly_when_none_does():
    spec = Speculation(None, "auto", skip=(1,))
    cheap = DraftPolicy(spec, spec.drafters(4), {"lookup": 0.0, "early-exit": 0.5, "skip": 0.8}, verify_cost={1: 1.0})
    first = cheap.next()
    assert first.drafter == "lookup" and first.k == 16  # free drafts, free rows: as many as allowed
    for _ in range(6):  # lookup rejected at once, early exit kept in full
        cheap.update("lookup", 4, 0)
        cheap.update("early-exit", 3, 3)
    c = cheap.next()
    assert c.drafter == "early-exit" and c.layers == (0,) and c.k > 1
    costly = DraftPolicy(Speculation(None, "lookup"), {"lookup": None}, {"lookup": 0.0}, verify_cost={1: 2.1})
    choices = [costly.next() for _ in range(PROBE_FIRST + 1)]
    assert choices[:PROBE_FIRST] == [None] * PROBE_FIRST and choices[-1].drafter == "lookup"  # a probe
    choices = [costly.next() for _ in range(2 * PROBE_FIRST + 1)]
    assert choices.count(None) == 2 * PROBE_FIRST  # the wait doubled
    for _ in range(10):
        costly.update("lookup", 8, 8)
    assert costly.next() is not None  # a drafter that is always right pays even at 2.1 steps a pass
    fixed = DraftPolicy(Speculation(3, "lookup"), {"lookup": None}, {"lookup": 0.0}, verify_cost={1: 2.1})
    assert fixed.next().k == 3  # a fixed k always speculates


def test_a_greedy_request_starts_where_the_last_one_left_off():
    """DraftMemory: a policy seeded from it starts from the estimates and the probe wait of the
    last policy it kept, so a drafter that has not paid is not probed again after PROBE_FIRST
    plain steps; a policy not seeded starts from 1/2 and PROBE_FIRST."""
    spec = Speculation(None, "lookup")
    memory = DraftMemory()

    def policy():
        return DraftPolicy(spec, {"lookup": None}, {"lookup": 0.0}, verify_cost={1: 2.1})

    first = policy()
    memory.seed(first)
    assert [first.next() for _ in range(PROBE_FIRST + 1)][-1] is not None  # a probe
    first.update("lookup", 4, 0)  # that did not pay
    memory.keep(first)
    second, fresh = policy(), policy()
    memory.seed(second)
    assert second.acceptance("lookup") == first.acceptance("lookup") < fresh.acceptance("lookup") == 0.5
    assert second.plain_steps_ahead() == 2 * PROBE_FIRST == 2 * fresh.plain_steps_ahead()
    assert [second.next() for _ in range(2 * PROBE_FIRST)] == [None] * (2 * PROBE_FIRST)


def test_a_drafter_that_keeps_nothing_is_not_drafted_with_however_cheap():
    """A draft through one resident layer (1.6% of a streamed step a token) whose proposals
    and leaves are all rejected: the policy steps plainly, as DECAY and PRIOR's floor allow
    (1/22). The old estimate, (hits + 1) / (hits + misses + 2) decayed by 0.8, could not fall
    below 1/7, where a tree of this draft rates above a plain step (on the H100 it drafted 898
    of 918 passes at 0.89x of plain decoding). A drafter that keeps two thirds of a skip
    draft's proposals at 0.36 of a step a token (1.50 GiB's) still drafts."""
    spec = Speculation(None, "early-exit")
    drafters = {"early-exit": (0,)}

    def policy(cost):
        return DraftPolicy(spec, drafters, {"early-exit": cost}, VERIFY_COST["cupy", True], trees=True)

    useless = policy(0.016)
    for _ in range(40):
        useless.update("early-exit", 2, 0, leaf_hit=False)
    assert useless.acceptance("early-exit") < 1 / 20 and useless.leaf_acceptance("early-exit") < 1 / 20
    assert useless.next() is None
    assert useless._rate(1 / 7, 1 / 7, "early-exit", 2, 1, True) > 1.0  # where the old floor left it
    good = policy(0.36)
    for i in range(40):
        good.update("early-exit", 2, (2, 1, 2)[i % 3], leaf_hit=i % 2 == 0 if i % 3 == 1 else None)
    choice = good.next()
    assert choice is not None and choice.drafter == "early-exit"


def test_the_wait_before_a_probe_goes_on_across_requests():
    """Requests of 20 tokens, each with its own policy from the engine's memory, after the
    wait has grown to PROBE_MAX: the plain steps add up across them, so the drafter is tried
    again within the fourth request (it would not be if each counted from zero)."""
    spec = Speculation(None, "lookup")
    memory = DraftMemory()
    memory.probe_after = PROBE_MAX
    passes = []
    for _ in range(4):
        p = DraftPolicy(spec, {"lookup": None}, {"lookup": 0.0}, verify_cost={1: 2.1})
        memory.seed(p)
        passes += [p.next() is not None for _ in range(20)]
        memory.keep(p)
    assert passes.index(True) == PROBE_MAX and passes.count(True) == 1


def test_the_engine_keeps_what_greedy_requests_measured_for_the_next_greedy_one(engine):
    engine.draft_memory = DraftMemory()
    spec = Speculation(None, "auto", skip=(1,))
    run(engine, REPEATING, spec, temperature=0.9, seed=3, max_tokens=30)
    assert not engine.draft_memory.counts  # a sampled request leaves it as it was
    run(engine, REPEATING, spec, max_tokens=40)
    kept = engine.draft_memory.counts
    assert engine.last_speculation.passes > 0 and kept
    greedy, sampled = (DraftPolicy.for_engine(engine, spec, greedy=g) for g in (True, False))
    for name, layers in greedy.drafters.items():
        assert (greedy.hits[name], greedy.misses[name], greedy.leaf_hits[name],
                greedy.leaf_misses[name]) == kept[name, layers]
        assert sampled.acceptance(name) == 0.5
    assert any(greedy.acceptance(name) != 0.5 for name in greedy.drafters)


def test_the_policy_weighs_a_pass_by_its_rows():
    """A pass of k + 1 rows costs what VERIFY_COST measured for k (interpolated between the
    measured ones): a free drafter of which one pass in ten keeps a token (acceptance
    estimate ~0.10) is worth k = 1 when streamed (~1.10 tokens for 1.07 steps) and costs more
    than it gives at k = 16 (~1.11 tokens for 1.44 steps)."""
    costs = VERIFY_COST["cupy", True]
    policy = DraftPolicy(Speculation(None, "lookup"), {"lookup": None}, {"lookup": 0.0}, verify_cost=costs)
    assert policy.verify_cost[4] == costs[4] and costs[4] < policy.verify_cost[6] < costs[8]
    for _ in range(20):
        policy.update("lookup", 4, 0 if _ % 10 else 1)
    a = policy.acceptance("lookup")
    choice = policy.next()
    assert choice.k == 1 and expected_tokens(a, 1) / costs[1] > 1.0 > expected_tokens(a, 16) / costs[16]
    flat = DraftPolicy(Speculation(None, "lookup"), {"lookup": None}, {"lookup": 0.0}, verify_cost={1: costs[1]})
    for _ in range(20):
        flat.update("lookup", 4, 0 if _ % 10 else 1)
    assert flat.next().k == 16  # what one constant cost chose


def test_a_pass_pays_less_in_a_batch():
    """In a step of B decodes a plain step already gives B tokens, and a pass makes all B wait:
    it is worth (B - 1 + tokens) / (B * cost) plain steps. A skip draft that keeps 60% of its
    tokens pays alone (~2.2 tokens for ~1.8 steps at k = 3) and not among four decodes."""
    costs = VERIFY_COST["cupy", True]
    policy = DraftPolicy(Speculation(None, "skip", skip=(1,)), {"skip": (0,)}, {"skip": 0.21}, verify_cost=costs)
    for _ in range(30):
        policy.update("skip", 5, 3)
    a = policy.acceptance("skip")
    for batch in (1, 4):
        for k in (1, 3, 16):
            cost = policy.verify_cost[k] + k * 0.21
            assert policy.rate("skip", k, batch) == pytest.approx((batch - 1 + expected_tokens(a, k)) / (batch * cost))
    assert policy.next(1) is not None and policy.plain_steps_ahead(1) == 0
    assert policy.plain_steps_ahead(4) > 0 and policy.next(4) is None


def test_a_sampled_pass_pays_the_hosts_sampling():
    """A sampled pass costs a distribution for each row its rule reads (one a token it gives)
    and each proposal a model draft draws, and a draw for each of those and the pass's last
    token: a closed form of the costs given. Gemma 3 270M resident on the GPU (0.96 ms a step,
    its 262,144 logits, SAMPLE_SECONDS_PER_LOGIT): no pass beats a plain step even with every
    proposal kept, where the same policy greedy could."""
    spec = Speculation(None, "auto", skip=(1,))
    drafters = {"lookup": None, "skip": (0,)}
    draft, verify = {"lookup": 0.0, "skip": 0.4}, VERIFY_COST["cupy", False]
    dist, draw = 0.3, 0.1
    policy = DraftPolicy(spec, drafters, draft, verify, sample_cost=(dist, draw))
    for _ in range(10):
        policy.update("lookup", 4, 2)
        policy.update("skip", 4, 3)
    for d, drawn in (("lookup", 0), ("skip", 3)):
        a = policy.acceptance(d)
        tokens = expected_tokens(a, 3)
        cost = policy.verify_cost[3] + 3 * draft[d] + (tokens + drawn) * dist + (1 + drawn) * draw
        assert policy.rate(d, 3) == pytest.approx(tokens / cost)
    gemma = tuple(s * 262144 / 0.96e-3 for s in draft_policy.SAMPLE_SECONDS_PER_LOGIT["cupy"])
    sampled = DraftPolicy(spec, drafters, {"lookup": 0.0, "skip": 0.5}, verify, sample_cost=gemma)
    greedy = DraftPolicy(spec, drafters, {"lookup": 0.0, "skip": 0.5}, verify)
    assert greedy.could_pay() and not sampled.could_pay()


def test_a_request_no_pass_could_speed_up_decodes_plainly(engine, monkeypatch):
    """Where the host's sampling makes every pass lose, even with every proposal kept, a
    sampled request under --speculate auto does not speculate (no pass, no probe): it draws
    plain decoding's tokens for its seed. With a fixed k it still speculates, as asked; a
    greedy request still does."""
    spec = Speculation(None, "lookup")
    params = dict(temperature=0.8, seed=5, max_tokens=40)
    plain = run(engine, REPEATING, **params)
    assert DraftPolicy.for_engine(engine, spec, greedy=False) is not None
    # as if the CPU's host sampling cost a millisecond a logit
    monkeypatch.setitem(draft_policy.SAMPLE_SECONDS_PER_LOGIT, "numpy", (1e-3, 1e-3))
    assert DraftPolicy.for_engine(engine, spec, greedy=False) is None
    assert run(engine, REPEATING, spec, **params) == plain
    stats = engine.last_speculation
    assert (stats.passes, stats.plain_steps) == (0, 0)
    assert DraftPolicy.for_engine(engine, Speculation(2, "lookup"), greedy=False) is not None
    run(engine, REPEATING, Speculation(2, "lookup"), **params)
    assert engine.last_speculation.passes > 0
    engine.draft_memory = DraftMemory()
    run(engine, REPEATING, spec, max_tokens=40)
    assert engine.last_speculation.passes > 0


def test_a_drafter_that_proposes_nothing_loses_the_choice():
    """Lookup finding no match drafts nothing: the pass gives one token, as a first proposal
    rejected does, and counts so; the skip draft, kept about half the time, takes over."""
    spec = Speculation(3, "auto", skip=(1,))
    policy = DraftPolicy(spec, {"lookup": None, "skip": (0,)}, {"lookup": 0.0, "skip": 0.1},
                         verify_cost=VERIFY_COST["cupy", True])
    assert policy.next().drafter == "lookup"  # free, and both at the prior
    for _ in range(5):
        policy.update("lookup", 0, 0)
        policy.update("skip", 3, 1)
    assert policy.acceptance("lookup") < 0.2 < policy.acceptance("skip")
    assert policy.next().drafter == "skip"


def test_a_lookup_pass_pays_the_host_time_the_device_waits_for():
    """On a GPU the host's search and the pass's build stand between passes when lookup drafts
    (a model draft's chain hides them): host_cost adds to a lookup pass's cost only, so a skip
    draft kept as often, which costs a little more than a free lookup draft and less than one
    with the host's time, is chosen once that time counts (the rates' closed form)."""
    spec = Speculation(2, "auto", skip=(1,))
    drafters, costs = {"lookup": None, "skip": (0,)}, {"lookup": 0.0, "skip": 0.02}
    free, paid = (DraftPolicy(spec, drafters, costs, VERIFY_COST["cupy", True], host_cost=h) for h in (0.0, 0.083))
    for policy in (free, paid):
        for _ in range(6):
            policy.update("lookup", 2, 1)
            policy.update("skip", 2, 1)
    tokens = expected_tokens(free.acceptance("lookup"), 2)
    assert free.acceptance("skip") == free.acceptance("lookup")
    assert free.rate("lookup", 2) == pytest.approx(tokens / free.verify_cost[2])
    assert paid.rate("lookup", 2) == pytest.approx(tokens / (free.verify_cost[2] + 0.083))
    assert paid.rate("skip", 2) == free.rate("skip", 2) == pytest.approx(tokens / (free.verify_cost[2] + 0.04))
    assert free.next().drafter == "lookup" and paid.next().drafter == "skip"


def test_expected_tokens_is_the_geometric_sum():
    for a, k in ((0.3, 4), (0.9, 1), (0.0, 5)):
        assert expected_tokens(a, k) == pytest.approx(sum(a ** i for i in range(k + 1)))
    assert expected_tokens(1.0, 3) == 4


def test_calibration_skips_the_layer_whose_absence_hurts_least_and_round_trips(engine, tmp_path):
    ids = REPEATING * 2
    result = calibrate(engine, ids, fraction=0.5)
    n = engine.config.n_layers

    def read(layers):
        seq = Sequence(list(ids))
        engine.reserve([(seq, len(ids))])
        try:
            x = engine.forward([(seq, len(ids))], all_logits=True, layers=layers).astype(np.float64)
        finally:
            engine.release(seq)
        return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))

    ref = read(None)
    scores = {i: score(ref, read(tuple(j for j in range(n) if j != i))) for i in range(n)}
    best = min(scores, key=lambda i: (-scores[i][0], scores[i][1], i))
    assert result["skip"] == [best] and result["order"][0]["agreement"] == pytest.approx(scores[best][0], abs=1e-4)
    assert scores[0] != scores[1]
    path = tmp_path / "skip.json"
    write(path, result, {"text": "inline"})
    assert load_skip_set(path, n) == (best,)
    with pytest.raises(ValueError, match="calibrated for 2 layers; this model has 24"):
        load_skip_set(path, 24)
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a calibrate-skip file"):
        load_skip_set(path, n)
    with pytest.raises(ValueError, match="skip fraction"):
        calibrate(engine, ids, fraction=1.0)


def test_calibration_text_from_prompts_is_each_prompt_then_the_models_greedy_continuation(engine, tmp_path):
    prompts = ["hello world", "the cat sat"]
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    want = []
    for p in prompts:
        ids = engine.prompt_ids(p)
        want += ids + [t.token_id for t in engine.generate(ids, greedy)]
    assert own_continuations(engine, prompts, 5, limit=1000) == want
    assert own_continuations(engine, prompts, 5, limit=9) == want[:9]
    with pytest.raises(ValueError, match="continuation tokens"):
        own_continuations(engine, prompts, 0, limit=10)
    bad = tmp_path / "p.json"
    for content in ("not json", "[]", '["x", 3]', '{"code": ["x"]}'):
        bad.write_text(content)
        with pytest.raises(ValueError, match="calibration prompts"):
            read_prompts(bad)
