"""Sampling: each filter against its definition, seeds, penalties, validation."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.ops import token_logprobs
from workers.engine.sampling import MAX_STOP_LENGTH, PRESETS, Sampler, SamplingParams, log_softmax, logprob_picks


def draws(params: SamplingParams, logits: np.ndarray, n: int = 400) -> set[int]:
    sampler = Sampler(params)
    return {sampler.sample(logits) for _ in range(n)}


LOGITS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02], dtype=np.float32))


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits) == int(np.argmax(logits))


def test_top_k_top_p_min_p_supports():
    assert draws(SamplingParams(temperature=1.0, top_k=2), LOGITS) == {0, 1}
    # top_p 0.7: 0.4 + 0.25 = 0.65 < 0.7, so the third token is needed too.
    assert draws(SamplingParams(temperature=1.0, top_p=0.7), LOGITS) == {0, 1, 2}
    # min_p 0.3: keep p >= 0.3 * 0.4 = 0.12.
    assert draws(SamplingParams(temperature=1.0, min_p=0.3), LOGITS) == {0, 1, 2}
    assert draws(SamplingParams(temperature=1.0), LOGITS, 3000) == set(range(7))


def filtered_by_sorting(row, temperature, top_k, top_p, min_p) -> np.ndarray:
    """The filters' definition, with the whole row sorted: the tokens kept, as a bool mask."""
    p = np.exp((row.astype(np.float64) - row.max()) / temperature)
    keep = np.ones(len(row), bool)
    if 0 < top_k < len(row):
        keep &= row >= np.sort(row)[-top_k]
    if top_p < 1.0:
        desc = np.sort(p[keep])[::-1]
        keep &= p >= desc[min(int(np.searchsorted(np.cumsum(desc), top_p * desc.sum())), len(desc) - 1)]
    if min_p:
        keep &= p >= min_p * p.max()
    return keep


def test_filters_keep_what_sorting_the_whole_row_keeps():
    """kept_weights sorts only the tokens top-p may keep; on fresh rows (peaked, flat, tied,
    vocabularies of 50 to 262k) it keeps exactly the tokens the definition keeps, with their
    weights, and the host Sampler draws what the device sampler's twin draws."""
    from kernels.numpy_backend import NumpyBackend, kept_weights

    rng = np.random.default_rng()
    cases = [(0.7, 0, 0.9, 0.0), (1.0, 40, 0.95, 0.0), (0.8, 0, 0.5, 0.05), (1.2, 100, 1.0, 0.1), (0.3, 0, 0.99, 0.0)]
    for vocab, scale in ((50, 2.0), (32_000, 0.05), (32_000, 3.0), (262_144, 1.5)):
        row = (rng.standard_normal(vocab) * scale).astype(np.float32)
        row[rng.integers(0, vocab, vocab // 10)] = row.max()  # ties at the top
        row[rng.integers(0, vocab, 5)] += 8  # a few far ahead
        for temperature, top_k, top_p, min_p in cases:
            w = kept_weights(row, temperature, top_k, top_p, min_p)
            keep = filtered_by_sorting(row, temperature, top_k, top_p, min_p)
            assert np.array_equal(w > 0, keep), (vocab, scale, temperature, top_k, top_p, min_p)
            assert np.allclose(w[keep], np.exp((row[keep].astype(np.float64) - row.max()) / temperature), rtol=1e-12)
            params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=7)
            host, u = Sampler(params), np.random.default_rng(7).random(20)
            twin = NumpyBackend().sample(np.stack([row] * 20), [temperature] * 20, [top_k] * 20, [top_p] * 20,
                                         [min_p] * 20, u)
            assert [host.sample(row) for _ in range(20)] == twin.tolist()


def test_temperature_sharpens_frequencies():
    n = 4000
    hot = Sampler(SamplingParams(temperature=1.0, seed=1))
    counts = np.bincount([hot.sample(LOGITS) for _ in range(n)], minlength=7) / n
    assert np.abs(counts - np.exp(LOGITS)).max() < 0.03
    cold = Sampler(SamplingParams(temperature=0.5, seed=1))
    counts = np.bincount([cold.sample(LOGITS) for _ in range(n)], minlength=7) / n
    want = np.exp(2 * LOGITS) / np.exp(2 * LOGITS).sum()
    assert np.abs(counts - want).max() < 0.03


def test_same_seed_same_tokens():
    logits = np.random.default_rng(3).standard_normal(5000).astype(np.float32)
    params = SamplingParams.preset("creative", seed=42)

    def run(p):
        sampler = Sampler(p)
        return [sampler.sample(logits) for _ in range(20)]

    assert run(params) == run(params)
    assert run(params) != run(params.with_(seed=43))


def test_penalties_closed_form():
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    s = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25))
    s.history.update([0, 0, 1])
    got = s.next_draw().adjusted(logits)
    assert got == pytest.approx([2.0 / 2 - 2 * 0.5 - 0.25, -1.0 * 2 - 0.5 - 0.25, 0.5, 3.0])


def test_logprobs_are_log_softmax():
    logits = np.random.default_rng(4).standard_normal(50).astype(np.float32)
    ((token, lp, top),) = logprob_picks([7], token_logprobs(logits[None], [7], 5), [5])
    want = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    assert token == 7 and lp == pytest.approx(want[7])
    assert [t for t, _ in top] == list(np.argsort(-want)[:5])
    assert [v for _, v in top] == pytest.approx(list(np.sort(want)[::-1][:5]))
    assert np.exp(log_softmax(logits)).sum() == pytest.approx(1.0)


def test_presets():
    assert set(PRESETS) == {"greedy", "balanced", "creative"}
    b = SamplingParams.preset("balanced")
    assert (b.temperature, b.top_k, b.top_p) == (0.8, 40, 0.9)
    c = SamplingParams.preset("creative", max_tokens=3)
    assert (c.temperature, c.top_k, c.top_p, c.max_tokens) == (1.2, 100, 0.95, 3)
    assert SamplingParams.preset("greedy").greedy
    with pytest.raises(ValueError, match="unknown sampling preset 'wild'"):
        SamplingParams.preset("wild")


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-2), dict(top_k=2.5), dict(top_p=0.0),
    dict(top_p=1.5), dict(min_p=-0.1), dict(repetition_penalty=0.0), dict(frequency_penalty=3.0),
    dict(presence_penalty=-2.5), dict(max_tokens=0), dict(max_tokens=-5), dict(seed=-1), dict(logprobs=21),
    dict(stop=("",)), dict(temperature="hot"), dict(stop=("a", "b", "c", "d", "e")),
    dict(stop=("x" * (MAX_STOP_LENGTH + 1),)),
])
def test_invalid_parameters_raise_clear_errors(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"invalid sampling parameter {name}="):
        SamplingParams(**bad)


def test_limits_that_every_entry_point_shares():
    assert SamplingParams(top_k=-1).top_k == 0  # vLLM's "off" is ours too
    assert SamplingParams(stop=("x" * MAX_STOP_LENGTH,) * 4).stop[0] == "x" * MAX_STOP_LENGTH
