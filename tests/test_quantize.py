"""The NumPy quantizers (kernels/quantize.py) against gguf-py's quantizer and dequantizer.

gguf-py's `dequantize` reads every block back (a wrong bit layout shows as a large error);
its `quantize` is the bit-exact reference for the legacy types. The K-quants, which gguf-py
cannot quantize, are held to the closed-form error of plain round-to-nearest on each
sub-block's own range: a scale search that is no better than that is broken.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import quantize as gguf_quantize

from kernels.quantize import QUANTIZABLE, quantize
from kernels.quants import Q, block_shape, dequantize

LEGACY = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
# (values per sub-block, levels, symmetric): each type's finest scale and its grid
GRID = {Q.Q4_0: (32, 16, True), Q.Q4_1: (32, 16, False), Q.Q5_0: (32, 32, True), Q.Q5_1: (32, 32, False),
        Q.Q8_0: (32, 255, True), Q.Q2_K: (16, 4, False), Q.Q3_K: (16, 8, True), Q.Q4_K: (32, 16, False),
        Q.Q5_K: (32, 32, False), Q.Q6_K: (16, 64, True)}
ALL = sorted(QUANTIZABLE, key=lambda q: q.value)


def gaussian(seed: int, rows: int = 48, cols: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[1, :256] = 0  # an all-zero block and super-block
    x[2] *= 50  # rows of very different scale
    x[3, 5] = 1.0  # an outlier
    return x


def naive_rmse(x: np.ndarray, qtype) -> float:
    """RMS error of rounding each sub-block to `levels` evenly spaced points over its own range
    (symmetric: [-amax, amax]), unquantized scales: step / sqrt(12) per value."""
    sub, levels, symmetric = GRID[qtype]
    b = x.reshape(-1, sub).astype(np.float64)
    span = 2 * np.abs(b).max(axis=1) if symmetric else b.max(axis=1) - np.minimum(b.min(axis=1), 0)
    step = span / (levels - 1)
    return float(np.sqrt(np.mean(step ** 2 / 12)))


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_legacy_types_bit_exact_with_gguf_py(qtype, seed):
    x = gaussian(seed)
    assert np.array_equal(quantize(x, qtype), gguf_quantize(x, qtype))


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_round_trip_error_within_plain_rounding(qtype):
    x = gaussian(2)
    raw = quantize(x, qtype)
    block, size = block_shape(qtype)
    assert raw.shape == (x.shape[0], x.shape[1] // block * size) and raw.dtype == np.uint8
    back = dequantize(raw, qtype)
    assert np.all(back[1, :256] == 0)
    rmse = float(np.sqrt(np.mean((back.astype(np.float64) - x) ** 2)))
    # sub-block scales stored in a few bits cost a little over unquantized ones
    assert rmse <= 1.15 * naive_rmse(x, qtype), (rmse, naive_rmse(x, qtype))
    row_rel = np.linalg.norm(back - x, axis=1) / np.linalg.norm(x, axis=1).clip(1e-30)
    assert np.all(row_rel[np.arange(len(x)) != 1] < 0.5)


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_importance_lowers_the_weighted_error(qtype):
    x = gaussian(3)
    imp = np.random.default_rng(4).lognormal(0, 1.5, x.shape[1]).astype(np.float32)
    err = lambda raw: float(np.sum(imp * (dequantize(raw, qtype) - x) ** 2))  # noqa: E731
    plain, weighted = err(quantize(x, qtype)), err(quantize(x, qtype, imp))
    if qtype == Q.Q8_0:  # llama.cpp ignores an imatrix for Q8_0, and so do we
        assert weighted == plain
    else:
        assert weighted < 0.97 * plain, (weighted, plain)
    assert np.array_equal(quantize(x, qtype, np.zeros_like(imp)).shape, quantize(x, qtype).shape)


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
def test_requantizing_a_legacy_tensor_keeps_its_bytes(qtype):
    # (no all-zero block: its scale, +0 or -0, reads back the same either way)
    raw = gguf_quantize(np.random.default_rng(5).standard_normal((16, 512)).astype(np.float32), qtype)
    assert np.array_equal(quantize(dequantize(raw, qtype), qtype), raw)


def test_bad_input_is_refused_by_name():
    x = np.zeros((4, 896), np.float32)
    with pytest.raises(ValueError, match="row length 896 is not a multiple of the Q4_K block of 256"):
        quantize(x, Q.Q4_K)
    with pytest.raises(ValueError, match="row length 40 .* Q8_0 block of 32"):
        quantize(np.zeros((2, 40), np.float32), Q.Q8_0)
    with pytest.raises(ValueError, match="cannot quantize to F16"):
        quantize(x, Q.F16)
    with pytest.raises(ValueError, match=r"\[rows, cols\]"):
        quantize(np.zeros(64, np.float32), Q.Q8_0)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quantize(bad, Q.Q5_0)
    with pytest.raises(ValueError, match=r"importance must have shape \(896,\)"):
        quantize(x, Q.Q5_0, np.ones(128, np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        quantize(x, Q.Q5_0, -np.ones(896, np.float32))


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_rows_quantized_in_chunks_on_the_pool_are_the_whole_arrays(qtype, monkeypatch):
    """Chunks of rows go to a thread pool (kernels/row_chunks.py): with chunks of 5 rows
    (the last short), every byte is what one chunk of all the rows gives, with and without
    importance."""
    from kernels import quantize as quantizer

    x = gaussian(int(qtype), rows=23)
    imp = np.random.default_rng(1).random(x.shape[1]).astype(np.float32)
    whole = [quantize(x, qtype), quantize(x, qtype, imp)]
    monkeypatch.setattr(quantizer, "CHUNK_VALUES", 5 * x.shape[1])
    assert all(np.array_equal(quantize(x, qtype, i), w) for i, w in zip((None, imp), whole))


def test_a_chunks_error_is_raised_and_a_forked_child_gets_a_pool_of_its_own():
    """each_chunk raises what a task raised; a task may split its own rows again (run in its
    thread); a child forked after the pool started runs its chunks on a pool of its own (its
    parent's threads are not in it: an inherited pool would take the tasks and never run them)."""
    import os
    import signal
    import threading

    from kernels.row_chunks import each_chunk

    done = []
    each_chunk(10, 3, done.append)
    assert sorted(done) == [0, 3, 6, 9]

    def fails(start):
        if start == 6:
            raise ValueError("chunk 6")

    with pytest.raises(ValueError, match="chunk 6"):
        each_chunk(10, 3, fails)
    nested = []
    outer = threading.Thread(target=each_chunk, daemon=True,  # a deadlock fails the join, not the run
                             args=(4, 1, lambda start: each_chunk(3, 1, lambda inner: nested.append((start, inner)))))
    outer.start()
    outer.join(30)
    assert not outer.is_alive() and sorted(nested) == [(s, i) for s in range(4) for i in range(3)]
    pid = os.fork()
    if pid == 0:  # the child: dies by the alarm if its chunks never run
        signal.alarm(20)
        seen = []
        each_chunk(10, 3, seen.append)
        os._exit(0 if sorted(seen) == [0, 3, 6, 9] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
