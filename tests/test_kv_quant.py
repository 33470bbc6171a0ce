"""RotateKV's host twin (kernels/kv_quant.py): the rotation, the row format and the quantized
cache read by the NumPy backend's attention, each against a closed form."""

import numpy as np
import pytest

from kernels.kv_layout import CODE_ORDER, KV_TYPES, RECENT, KVLayout, kv_type
from kernels.kv_quant import dequantize_rows, hadamard, quantize_rows, transform, untransform
from kernels.numpy_backend import NumpyBackend
from kernels.ops import AttentionBatch, StepInputs

QUANTIZED = [n for n, t in KV_TYPES.items() if t.quantized]


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


@pytest.mark.parametrize("d, block", [(64, 64), (128, 128), (96, 32)])
def test_hadamard_is_the_normalized_sylvester_matrix_in_blocks(d, block):
    x = np.random.default_rng(d).standard_normal((5, d)).astype(np.float32)
    expect = (x.reshape(5, d // block, block) @ sylvester(block).T).reshape(5, d)
    assert np.abs(hadamard(x) - expect).max() < 1e-5 * np.abs(expect).max()
    assert np.abs(hadamard(hadamard(x)) - x).max() < 1e-5 * np.abs(x).max()  # its own inverse


@pytest.mark.parametrize("kv", QUANTIZED)
def test_codes_pack_little_endian_and_dequantize_within_half_a_step(kv):
    rng = np.random.default_rng(len(kv))
    layout = KVLayout(2, 64, 16, kv_type(kv))
    y = rng.standard_normal((7, 2, 64)).astype(np.float32) * rng.uniform(0.1, 10, (7, 2, 1)).astype(np.float32)
    rows = quantize_rows(y, layout)
    assert rows.shape == (7, 2, layout.row_bytes) and rows.dtype == np.uint8
    t, g = layout.type, layout.group
    params = rows[..., layout.code_bytes:].copy().view(np.float16).astype(np.float64).reshape(7, 2, 64 // g, 2)
    # value j of a row sits in slot s of its word of 8 (CODE_ORDER[bits][s] == j % 8), at bits
    # (8 (j // 8) + s) * bits .. + bits - 1 of the little-endian code bytes
    word = int.from_bytes(rows[0, 0, :layout.code_bytes].tobytes(), "little")
    slot = {int(v): s for s, v in enumerate(CODE_ORDER[t.bits])}
    codes = np.array([(word >> ((8 * (j // 8) + slot[j % 8]) * t.bits)) & (2 ** t.bits - 1) for j in range(64)],
                     np.float64)
    scale, lo = np.repeat(params[0, 0, :, 0], g), np.repeat(params[0, 0, :, 1], g)
    assert np.allclose(dequantize_rows(rows, layout)[0, 0], lo + codes * scale, rtol=1e-6, atol=1e-6)
    # every value inside its group's clipped range within half a step of its code (plus the
    # float16 minimum's rounding), and each group's squared error no more than min/max
    # quantization's (the ratio 1 the clipping search starts from)
    y4, deq = y.reshape(7, 2, 64 // g, g), dequantize_rows(rows, layout).reshape(7, 2, 64 // g, g)
    d, m = params[..., 0:1], params[..., 1:2]
    inside = (y4 >= m) & (y4 <= m + (2 ** t.bits - 1) * d)
    assert (np.abs(deq - y4)[inside] <= np.broadcast_to(d * 0.5 + np.abs(m) * 2 ** -10 + 1e-6, y4.shape)[inside]).all()
    f16 = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731  (the stored precision)
    lo, hi = y4.min(-1, keepdims=True), y4.max(-1, keepdims=True)
    lo, step = f16(lo), f16((hi - lo) / (2 ** t.bits - 1))
    minmax = lo + np.clip(np.rint((y4 - lo) / step), 0, 2 ** t.bits - 1) * step
    assert (np.square(deq - y4).sum(-1) <= np.square(minmax - y4).sum(-1) * (1 + 1e-3) + 1e-6).all()


def roundtrip(x, layout, center=None, scale=None):
    return untransform(dequantize_rows(quantize_rows(transform(x, center, scale), layout), layout), center, scale)


def test_rotation_and_centring_spread_an_outlier_channel():
    """Keys with one channel 30x the others, and one far off zero (Qwen's keys): rotated q4
    loses far less than unrotated, and centring the offset channel far less again."""
    rng = np.random.default_rng(0)
    layout = KVLayout(1, 64, 16, kv_type("q4"))
    x = rng.standard_normal((256, 1, 64)).astype(np.float32)
    x[..., 5] *= 30
    plain = np.linalg.norm(dequantize_rows(quantize_rows(x, layout), layout) - x)
    rotated = np.linalg.norm(roundtrip(x, layout) - x)
    assert rotated < 0.5 * plain
    x[..., 9] += 150
    center, ones = x.mean(0), np.ones((1, 64), np.float32)
    assert np.linalg.norm(roundtrip(x, layout, center, ones) - x) < 0.3 * np.linalg.norm(roundtrip(x, layout) - x)


def reference_attention(q, k, v, qpos, layout, center, scale, d):
    """Exact causal attention of queries at positions qpos over keys and values 0..max(qpos),
    except that a key or value more than RECENT - 1 positions behind its query, other than
    position 0, is its quantization round trip; the others are the float16 rows in the
    cache's basis."""
    kq, vq = roundtrip(k, layout, center, scale), roundtrip(v, layout)
    k16 = untransform(transform(k, center, scale).astype(np.float16).astype(np.float32), center, scale)
    v16 = untransform(transform(v).astype(np.float16).astype(np.float32))
    heads, kvh = q.shape[1], k.shape[1]
    out = np.zeros((len(qpos), heads, d))
    for i, p in enumerate(qpos):
        pos = np.arange(p + 1)
        near = ((p - pos) < RECENT) | (pos == 0)
        kk = np.where(near[:, None, None], k16[:p + 1], kq[:p + 1])
        vv = np.where(near[:, None, None], v16[:p + 1], vq[:p + 1])
        for h in range(heads):
            s = kk[:, h // (heads // kvh)] @ q[i, h] / np.sqrt(d)
            w = np.exp(s - s.max())
            out[i, h] = (w / w.sum()) @ vv[:, h // (heads // kvh)]
    return out.reshape(len(qpos), -1)


@pytest.mark.parametrize("kv", QUANTIZED)
def test_paged_rotate_kv_attention_reads_the_sink_and_recent_rows_unquantized(kv):
    """Two sequences through prefill chunks, decode steps and a rejected speculation (tokens
    written then trimmed and rewritten), interleaved: every step's output equals attention
    over keys and values that are exact within RECENT positions of each query and at position
    0, their quantization round trip elsewhere (the ring is updated, read and overwritten
    right)."""
    rng = np.random.default_rng(11)
    ops = NumpyBackend()
    heads, kvh, d, bs = 4, 2, 64, 16
    layout = ops.kv_layout(kvh, d, bs, kv)
    k_cache, v_cache = ops.new_kv_cache(64, layout, recent_slots=3)
    k_cache.center[...] = rng.standard_normal((kvh, d)) * 5
    k_cache.scale[...] = np.exp(rng.standard_normal((kvh, d)) * 0.5)
    n = 230
    seqs = {0: (2, list(range(0, 16))), 1: (0, list(range(16, 32)))}  # ring slot, blocks
    data = {s: [rng.standard_normal((n, kvh, d)).astype(np.float32) * 3 for _ in range(2)] for s in seqs}

    def step(chunks):  # chunks: (seq, first position, count)
        qs, ks, vs, starts, ctx, slots, tables, pos = [], [], [], [0], [], [], [], []
        for sid, p0, cnt in chunks:
            k, v = data[sid]
            p = np.arange(p0, p0 + cnt)
            qs.append(rng.standard_normal((cnt, heads, d)).astype(np.float32))
            ks.append(k[p])
            vs.append(v[p])
            starts.append(starts[-1] + cnt)
            ctx.append(p0 + cnt)
            blocks = np.array(seqs[sid][1])
            slots.append(blocks[p // bs] * bs + p % bs)
            tables.append(blocks)
            pos.append(p)
        batch = AttentionBatch(np.array(starts, np.int32), np.array(ctx, np.int32), np.array(tables, np.int32),
                               np.concatenate(slots).astype(np.int32),
                               np.array([seqs[sid][0] for sid, _, _ in chunks], np.int32))
        q = np.concatenate(qs)
        out = ops.attention(q, np.concatenate(ks), np.concatenate(vs), k_cache, v_cache,
                            StepInputs(np.zeros(len(q), np.int32), np.concatenate(pos), batch), d ** -0.5)
        for i, (sid, p0, cnt) in enumerate(chunks):
            k, v = data[sid]
            want = reference_attention(qs[i], k[:p0 + cnt], v[:p0 + cnt], np.arange(p0, p0 + cnt), layout,
                                       k_cache.center, k_cache.scale, d)
            got = out[starts[i]:starts[i + 1]]
            assert np.abs(got - want).max() < 1e-4 * np.abs(want).max(), (sid, p0, cnt)

    step([(0, 0, 70), (1, 0, 40)])
    step([(0, 70, 100), (1, 40, 1)])  # a chunk longer than the ring beside a decode
    for p in range(170, 180):
        step([(0, p, 1), (1, p - 129, 1)])
    step([(0, 180, 17)])  # a speculative pass of MAX_K + 1 tokens, of which 1 is kept:
    for t in range(181, 197):  # positions 181.. are rewritten with other values
        data[0][0][t], data[0][1][t] = (rng.standard_normal((kvh, d)).astype(np.float32) * 3 for _ in range(2))
    for p in range(181, 200):
        step([(0, p, 1)])


# relative error of attention over a quantized cache vs exact, random Gaussian K/V (D = 64):
# 300 positions, so most keys are quantized
BOUND = {"f16": 1e-3, "q8": 1e-2, "q4": 0.15, "q3": 0.3, "q2": 0.6}


@pytest.mark.parametrize("kv", list(BOUND))
def test_attention_over_a_quantized_cache_is_close_to_exact(kv):
    """A prefill then decode steps through the paged cache: close to attention over the exact
    K and V, within a bound that grows as bits drop (and q8 much closer than q4)."""
    rng = np.random.default_rng(3)
    ops = NumpyBackend()
    heads, kvh, d, bs, n = 4, 2, 64, 16, 300
    k_cache, v_cache = ops.new_kv_cache(24, ops.kv_layout(kvh, d, bs, kv), recent_slots=1)
    k = rng.standard_normal((n, kvh, d)).astype(np.float32)
    v = rng.standard_normal((n, kvh, d)).astype(np.float32)
    q = rng.standard_normal((n, heads, d)).astype(np.float32)
    table = np.array([rng.permutation(24)[:19]], np.int32)
    slots = (table[0][np.arange(n) // bs] * bs + np.arange(n) % bs).astype(np.int32)

    def step(lo, hi):
        batch = AttentionBatch(np.array([0, hi - lo], np.int32), np.array([hi], np.int32), table, slots[lo:hi],
                               np.zeros(1, np.int32))
        return StepInputs(np.zeros(hi - lo, np.int32), np.arange(lo, hi), batch)

    out = [ops.attention(q[:280], k[:280], v[:280], k_cache, v_cache, step(0, 280), d ** -0.5)]
    out += [ops.attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], k_cache, v_cache, step(i, i + 1), d ** -0.5)
            for i in range(280, n)]
    got = np.concatenate(out)
    exact = NumpyBackend()
    ek, ev = exact.new_kv_cache(24, exact.kv_layout(kvh, d, bs, "f32"))
    want = exact.attention(q, k, v, ek, ev, step(0, n), d ** -0.5)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < BOUND[kv]
    if kv == "q4":
        assert err > BOUND["q8"]  # the bound is not loose enough to pass anything
