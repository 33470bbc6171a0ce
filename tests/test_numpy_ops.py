"""The NumPy backend against closed forms computed independently in float64."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from gguf import GGMLQuantizationType as Q

from kernels import AttentionBatch, StepInputs, get_backend, numpy_backend
from kernels.quants import SUPPORTED_QTYPES, block_shape, dequantize
from workers.model.gguf_file import TensorInfo
from workers.model.synthetic import random_blocks

ops = get_backend("numpy")


def step_of(tokens=None, positions=None, batch=None) -> StepInputs:
    """The step inputs an op under test reads (the rest left empty)."""
    return StepInputs(tokens, positions, batch)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def test_q8_0_and_q4_0_blocks_by_hand():
    # Q8_0: f16 scale then 32 int8 values.
    scale, qs = np.float16(0.5), np.arange(-16, 16, dtype=np.int8)
    block = np.concatenate([np.array([scale]).view(np.uint8), qs.view(np.uint8)])
    assert np.array_equal(dequantize(block[None], Q.Q8_0)[0], 0.5 * qs.astype(np.float32))
    # Q4_0: f16 scale then 16 bytes; low nibbles are values 0..15, high nibbles 16..31, offset by 8.
    nibbles = np.arange(32) % 16
    packed = (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8)
    block = np.concatenate([np.array([np.float16(2.0)]).view(np.uint8), packed])
    assert np.array_equal(dequantize(block[None], Q.Q4_0)[0], 2.0 * (nibbles - 8).astype(np.float32))


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_QTYPES - {Q.F32, Q.F16, Q.BF16}, key=lambda q: q.value),
                         ids=lambda q: q.name)
def test_dequantize_in_row_tasks_is_ggufs_own(qtype):
    """Rows split over the thread pool's tasks (the last one short) give gguf's values bit for
    bit, into a slice of a larger array as into a new one; a wrong out is refused."""
    from gguf.quants import dequantize as gguf_dequantize

    from kernels import quants

    rng = np.random.default_rng(qtype.value)
    rows = 2 * quants.ROWS_PER_TASK + 37
    raw = random_blocks(rng, (rows, 256), qtype, std=0.05)
    want = gguf_dequantize(raw, qtype)
    assert np.array_equal(dequantize(raw, qtype), want)
    whole = np.full((rows + 2, 256), np.nan, np.float32)
    dequantize(raw, qtype, out=whole[1:-1])
    assert np.array_equal(whole[1:-1], want) and np.isnan(whole[[0, -1]]).all()
    with pytest.raises(ValueError, match="out must be"):
        dequantize(raw, qtype, out=np.empty((rows, 255), np.float32))


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_QTYPES, key=lambda q: q.value), ids=lambda q: q.name)
def test_matmul_on_every_quant_type(qtype):
    rng = np.random.default_rng(qtype.value)
    rows, cols = 37, 512  # rows not a multiple of any tile
    raw = random_blocks(rng, (rows, cols), qtype, std=0.05) if qtype not in (Q.F32, Q.F16, Q.BF16) else None
    if raw is None:
        values = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        raw = {Q.F32: values, Q.F16: values.astype(np.float16), Q.BF16: None}[qtype]
        if qtype == Q.BF16:
            raw = (values.view(np.uint32) >> 16).astype(np.uint16)
        raw = raw.view(np.uint8).reshape(rows, -1)
    tensor = TensorInfo("w", qtype, (rows, cols), raw)
    weight = dequantize(raw, qtype)
    assert weight.shape == (rows, cols) and np.isfinite(weight).all() and weight.std() > 0.01
    x = rng.standard_normal((3, cols)).astype(np.float32)
    got = ops.matmul(x, ops.load_matrix(tensor))
    assert rel_err(got, x.astype(np.float64) @ weight.astype(np.float64).T) < 1e-5
    stacked = ops.matmul(x, ops.load_matrix(tensor, tensor))
    # norm-wise: BLAS may sum a 2x taller product in another order (OpenBLAS 0.3.31: 1.8e-7 off a
    # 0.0045 element, past allclose's per-element 1e-5)
    assert rel_err(stacked[:, :rows], got) < 1e-6 and rel_err(stacked[:, rows:], got) < 1e-6
    ids = np.array([5, 0, 5, rows - 1])
    assert np.array_equal(ops.embedding(ops.load_embedding(tensor), step_of(ids)), weight[ids])


@pytest.mark.parametrize("rows", [2, 5, numpy_backend.GEMV_ROWS, numpy_backend.GEMV_ROWS + 1])
def test_few_row_products_are_each_rows_own(monkeypatch, rows):
    # a slice of 16 weight rows: 100 rows end in a partial slice
    monkeypatch.setattr(numpy_backend, "GEMV_SLICE_BYTES", 16 * 64 * 4)
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((100, 64)).astype(np.float32)
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    got = ops.matmul(x, w)
    assert got.shape == (rows, 100) and got.dtype == np.float32
    assert rel_err(got, x.astype(np.float64) @ w.astype(np.float64).T) < 1e-6
    if rows <= numpy_backend.GEMV_ROWS:  # what a verifying pass relies on: row i is x[i]'s product alone
        assert all(np.array_equal(got[i], ops.matmul(x[i:i + 1], w)[0]) for i in range(rows))


def test_block_shapes_cover_all_types():
    for qtype in SUPPORTED_QTYPES:
        values, nbytes = block_shape(qtype)
        assert values in (1, 32, 256) and nbytes > 0


def test_rmsnorm_and_swiglu():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 96)).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * w
    assert rel_err(ops.rmsnorm(x, w, 1e-6), want) < 1e-6
    gate, up = x[:, :48], x[:, 48:]
    want = gate / (1 + np.exp(-gate.astype(np.float64))) * up
    assert rel_err(ops.swiglu(x), want) < 1e-6


@pytest.mark.parametrize("neox", [False, True])
def test_rope_is_a_complex_rotation(neox):
    rng = np.random.default_rng(1)
    n, heads, d = 7, 3, 16
    x = rng.standard_normal((n, heads, d)).astype(np.float32)
    positions = np.array([0, 1, 2, 5, 100, 4095, 7])
    inv_freq = 10000.0 ** (-np.arange(0, d, 2) / d)
    half = d // 2
    pairs = (x[..., :half] + 1j * x[..., half:]) if neox else (x[..., 0::2] + 1j * x[..., 1::2])
    rotated = pairs * np.exp(1j * positions[:, None, None] * inv_freq[None, None, :])
    want = np.empty_like(x, dtype=np.float64)
    if neox:
        want[..., :half], want[..., half:] = rotated.real, rotated.imag
    else:
        want[..., 0::2], want[..., 1::2] = rotated.real, rotated.imag
    assert rel_err(ops.rope(x, step_of(positions=positions), inv_freq, neox), want) < 1e-6


def test_geglu_is_gelu_tanh_gate_times_up():
    """Against the tanh form evaluated in float64 and against exact GELU (x * Phi(x), by erf):
    the approximation stays within 1e-3 of it."""
    from math import erf

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((7, 2 * 96)) * 3).astype(np.float32)
    g, u = x[:, :96].astype(np.float64), x[:, 96:].astype(np.float64)
    tanh_form = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))) * u
    exact = g * 0.5 * (1 + np.vectorize(erf)(g / np.sqrt(2))) * u
    got = ops.geglu(x)
    assert got.shape == (7, 96) and got.dtype == np.float32
    assert rel_err(got, tanh_form) < 1e-6
    assert np.max(np.abs(got - exact)) < 1e-3 * np.max(np.abs(u))


def dense_attention(q, k, v, n_past, window=0):
    """One sequence, contiguous K/V, float64, GQA by repeating KV heads; with a window, query
    position p sees keys p - window < j <= p."""
    n, heads, d = q.shape
    group = heads // k.shape[1]
    k, v = np.repeat(k, group, axis=1).astype(np.float64), np.repeat(v, group, axis=1).astype(np.float64)
    scores = np.einsum("qhd,khd->hqk", q.astype(np.float64), k) / np.sqrt(d)
    qpos, kpos = (n_past + np.arange(n))[:, None], np.arange(k.shape[0])[None, :]
    mask = (kpos > qpos) | ((kpos <= qpos - window) if window else False)
    scores[:, mask] = -np.inf
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * d)


@pytest.mark.parametrize("window", [0, 1, 3, 6, 64])
def test_paged_attention_matches_dense_for_mixed_batch(window):
    """Three sequences (a prefill, a decode, a chunk after a cached prefix) in one call, with
    no window, windows shorter than a block, than a prefill, than the context, and longer."""
    rng = np.random.default_rng(2 + window)
    heads, kv_heads, d, bs, n_blocks = 8, 2, 32, 4, 64
    layout = ops.kv_layout(kv_heads, d, bs)
    assert layout.bytes_per_token == 2 * kv_heads * d * 4 and layout.bytes_per_block == bs * layout.bytes_per_token
    k_cache, v_cache = ops.new_kv_cache(n_blocks, layout)
    assert k_cache.rows.shape == (n_blocks, bs, kv_heads, d) and k_cache.rows.dtype == np.float32
    free = list(rng.permutation(n_blocks))  # scattered blocks: the block table must be honoured
    specs = [(0, 9), (13, 1), (6, 5)]  # (tokens already cached, new tokens)
    seqs = []
    for past, new in specs:
        total = past + new
        table = [int(free.pop()) for _ in range(-(-total // bs))]
        k_all = rng.standard_normal((total, kv_heads, d)).astype(np.float32)
        v_all = rng.standard_normal((total, kv_heads, d)).astype(np.float32)
        pos = np.arange(total)
        slots = np.array(table)[pos // bs] * bs + pos % bs
        k_cache.rows.reshape(-1, kv_heads, d)[slots[:past]] = k_all[:past]  # the cached prefix
        v_cache.rows.reshape(-1, kv_heads, d)[slots[:past]] = v_all[:past]
        q = rng.standard_normal((new, heads, d)).astype(np.float32)
        seqs.append((past, new, table, k_all, v_all, q, slots[past:]))
    width = max(len(s[2]) for s in seqs)
    tables = np.full((3, width), -1, np.int32)
    for i, s in enumerate(seqs):
        tables[i, : len(s[2])] = s[2]
    batch = AttentionBatch(
        query_starts=np.cumsum([0] + [s[1] for s in seqs]).astype(np.int32),
        context_lens=np.array([s[0] + s[1] for s in seqs], np.int32),
        block_tables=tables, slot_mapping=np.concatenate([s[6] for s in seqs]).astype(np.int32))
    q = np.concatenate([s[5] for s in seqs])
    k_new = np.concatenate([s[3][s[0]:] for s in seqs])
    v_new = np.concatenate([s[4][s[0]:] for s in seqs])
    out = ops.attention(q, k_new, v_new, k_cache, v_cache, step_of(batch=batch), 1 / np.sqrt(d), window)
    for i, (past, new, _, k_all, v_all, qi, _) in enumerate(seqs):
        start = batch.query_starts[i]
        assert rel_err(out[start:start + new], dense_attention(qi, k_all, v_all, past, window)) < 1e-5
    if 0 < window < 6:  # the mask changed something: a full-context answer differs
        assert rel_err(out[:9], dense_attention(seqs[0][5], seqs[0][3], seqs[0][4], 0)) > 1e-2


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        get_backend("tpu")


def test_token_logprobs_in_row_chunks_are_the_log_softmax():
    """Rows in chunks on the thread pool (the last one short): each row's log-probability of
    its target and its top 7, against float64 log-sum-exp by np.logaddexp over the whole row and
    a stable sort of it."""
    from kernels import ops as ops_module

    rng = np.random.default_rng(3)
    rows = 3 * ops_module.TOKEN_LOGPROB_ROWS + 5
    logits = (rng.standard_normal((rows, 1000)) * 4).astype(np.float32)
    logits[0, 7] = 60.0  # a row whose exp would overflow without the max taken out
    targets = rng.integers(0, 1000, rows)
    want = logits.astype(np.float64) - np.logaddexp.reduce(logits.astype(np.float64), axis=-1)[:, None]
    lp, top_ids, top_lp = ops.token_logprobs(logits, targets, 7)
    assert lp.shape == (rows,) and np.allclose(lp, want[np.arange(rows), targets], rtol=0, atol=1e-7)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :7]
    assert np.array_equal(top_ids, order)
    assert np.allclose(top_lp, np.take_along_axis(want, order, axis=1), rtol=0, atol=1e-7)
    assert ops.token_logprobs(logits, targets)[1].shape == (rows, 0)
    with pytest.raises(ValueError, match="top_n"):
        ops.token_logprobs(logits, targets, 1001)


@given(st.integers(1, 6), st.integers(1, 40), st.data())
@settings(max_examples=200, derandomize=True, deadline=None, database=None)
def test_largest_breaks_ties_by_lower_index(rows, width, data):
    """Rows of a few distinct values (ties everywhere, across the n-th place too): the n largest
    as a stable descending sort orders them."""
    from kernels.ops import largest

    values = data.draw(st.lists(st.lists(st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 2.0]), min_size=width,
                                         max_size=width), min_size=rows, max_size=rows))
    x = np.asarray(values, np.float32)
    n = data.draw(st.integers(1, width))
    assert np.array_equal(largest(x, n), np.argsort(-x, axis=1, kind="stable")[:, :n])
