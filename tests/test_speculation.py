"""Self-speculative greedy decoding: the same tokens as plain greedy decoding, several a pass."""

from __future__ import annotations

import numpy as np
import pytest

from workers.engine.engine import Engine
from workers.engine.sampling import SamplingParams
from workers.engine.speculation import Speculation, accept_sampled, lookup_proposal

REPEATING = [5, 17, 99, 4, 23, 5, 17, 99, 4, 23, 5, 17, 99]  # lookup finds something to propose


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=512)


def run(engine, prompt, speculation=None, **params):
    params = SamplingParams(**{"max_tokens": 24, "temperature": 0, "ignore_eos": True, **params})
    events = list(engine.generate(prompt, params, speculation))
    return [(e.token_id, e.text, e.finish_reason) for e in events]


@pytest.mark.parametrize("spec", [Speculation(1), Speculation(4), Speculation(3, "early-exit"),
                                  Speculation(5, "early-exit", depth=1)], ids=repr)
def test_speculative_greedy_gives_the_plain_greedy_tokens(engine, spec):
    plain = run(engine, REPEATING)
    assert run(engine, REPEATING, spec) == plain
    stats = engine.last_speculation
    assert stats.passes > 0 and stats.accepted <= stats.drafted
    assert engine.blocks.free_blocks == engine.blocks.num_blocks  # rejected tails and the request gave their blocks back


def test_a_drafter_that_is_the_model_has_every_proposal_accepted(engine):
    """Early exit after every layer drafts what the model computes: k + 1 tokens a pass (the
    last pass is cut by max_tokens)."""
    spec = Speculation(3, "early-exit", depth=engine.config.n_layers)
    plain = run(engine, REPEATING, max_tokens=17)
    assert run(engine, REPEATING, spec, max_tokens=17) == plain
    s = engine.last_speculation
    assert s.accepted == s.drafted and s.passes == 4  # 1 token from the prefill, then 4 + 4 + 4 + 4


def test_max_tokens_and_stops_end_a_speculative_run_where_plain_decoding_ends(engine):
    spec = Speculation(5, "early-exit", depth=engine.config.n_layers)
    for params in ({"max_tokens": 7}, {"max_tokens": 1}, {"stop_ids": (run(engine, REPEATING)[5][0],)}):
        plain, fast = run(engine, REPEATING, **params), run(engine, REPEATING, spec, **params)
        assert fast == plain and len(fast) <= 24
    assert engine.blocks.free_blocks == engine.blocks.num_blocks


def test_logprob_and_penalized_requests_decode_plainly(engine):
    spec = Speculation(4)
    run(engine, REPEATING, spec, logprobs=2)
    assert engine.last_speculation.passes == 0
    run(engine, REPEATING, spec, temperature=0.8, seed=1, repetition_penalty=1.3)
    assert engine.last_speculation.passes == 0


@pytest.mark.parametrize("spec", [Speculation(4), Speculation(3, "early-exit", depth=1)], ids=repr)
def test_sampled_speculation_is_reproducible_by_seed_and_ends_where_asked(engine, spec):
    a = run(engine, REPEATING, spec, temperature=0.9, top_k=20, seed=7, max_tokens=20)
    assert engine.last_speculation.passes > 0
    assert run(engine, REPEATING, spec, temperature=0.9, top_k=20, seed=7, max_tokens=20) == a
    assert len(a) == 20 and a[-1][2] == "length"
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
        return accept_sampled(p_rows, None if certain else q_rows, proposed, rng)

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
    assert lookup_proposal([1, 2, 3, 1, 2], k=4) == [3, 1, 2]


@pytest.mark.real_model
@pytest.mark.parametrize("spec", [Speculation(4), Speculation(3, "early-exit", depth=6)], ids=repr)
def test_speculation_on_the_real_model_gives_the_plain_greedy_tokens(real_engine, spec):
    prompt = real_engine.prompt_ids('def fizzbuzz(n):\n    """Return "Fizz", "Buzz", "FizzBuzz" or str(n)."""\n')
    plain = run(real_engine, prompt, max_tokens=32)
    assert run(real_engine, prompt, spec, max_tokens=32) == plain
    assert real_engine.last_speculation.passes < 32
