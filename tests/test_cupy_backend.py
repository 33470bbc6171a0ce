"""The CuPy backend's kernels against their NumPy twins, on a GPU (`pytest -m gpu`).

Fresh random inputs for every case; the memory pool is filled with NaN before each test so an
output element a kernel forgets to write shows up; bounds: fp32 paths 1e-5 relative, paths
through fp16 (cuBLAS inputs, the KV cache) 3e-3. The GEMV on integer activations (Q8_ROWS
formats, up to 4 tokens) is held to 1e-5 against its NumPy twin (numpy_backend.matmul_q8),
which quantizes the activations the same way.
"""

from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from kernels import AttentionBatch, StepInputs, get_backend  # noqa: E402
from kernels.cupy import attention as attention_kernels  # noqa: E402
from kernels.cupy import elementwise, products  # noqa: E402
from kernels.cupy.kernel_constants import QMMA_MAX_T  # noqa: E402
from kernels.cupy.tuning import GEMV_MAX_T, Q8_ROWS  # noqa: E402
from kernels.kv_quant import dequantize_rows  # noqa: E402
from kernels.numpy_backend import matmul_q8, quantize_q8, quantize_q8_input  # noqa: E402
from kernels.quants import SUPPORTED_QTYPES, block_shape, dequantize  # noqa: E402
from workers.model.gguf_file import TensorInfo  # noqa: E402
from workers.model.synthetic import random_blocks  # noqa: E402

pytestmark = pytest.mark.gpu
cpu = get_backend("numpy")
FLOATS = (Q.F32, Q.F16, Q.BF16)


@pytest.fixture(scope="module")
def gpu(cuda_device):
    return get_backend("cupy")


@pytest.fixture(autouse=True)
def poison_pool(gpu):
    """Freed pool memory full of NaN: the next outputs are carved from it. Filled on the
    backend's stream, so that the fill is ordered before the kernels that write them."""
    try:
        with gpu.stream:
            junk = cupy.full((64 << 20,), np.nan, cupy.float32)
            del junk
    except cupy.cuda.memory.OutOfMemoryError:
        pass
    yield


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bad = ~np.isfinite(got)
    assert not bad.any(), f"{bad.sum()} of {bad.size} outputs NaN/inf (not written?), shape {got.shape}"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def make_tensor(rng, qtype, rows, cols, name="w"):
    if qtype in FLOATS:
        values = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        raw = {Q.F32: values, Q.F16: values.astype(np.float16),
               Q.BF16: (values.view(np.uint32) >> 16).astype(np.uint16)}[qtype]
        raw = raw.view(np.uint8).reshape(rows, -1)
    else:
        raw = random_blocks(rng, (rows, cols), qtype, std=0.05)
    return TensorInfo(name, qtype, (rows, cols), np.ascontiguousarray(raw))


def cols_for(qtype, rng):
    block = block_shape(qtype)[0]
    if qtype in FLOATS:
        return int(rng.choice([100, 264, 512]))  # not a multiple of 32 either
    if block == 32:
        return 32 * int(rng.choice([25, 24, 7]))  # not a multiple of 256
    return 256 * int(rng.choice([2, 3]))


QTYPES = sorted(SUPPORTED_QTYPES, key=lambda q: q.value)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("T", [1, 3, 8, 19, 64, 70])
def test_matmul_every_quant_type(gpu, qtype, T):
    rng = np.random.default_rng()
    rows, cols = int(rng.choice([37, 61, 130])), cols_for(qtype, rng)
    t = make_tensor(rng, qtype, rows, cols)
    weight = dequantize(t.data, qtype).astype(np.float64)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    got = gpu.to_numpy(gpu.matmul(gpu.asarray(x), gpu.load_matrix(t)))
    assert got.shape == (T, rows)
    # T <= GEMV_MAX_T: GEMV on the quantized blocks (fp32, or integer activations and its twin);
    # above: fp16 operands (tensor cores on the blocks up to 64 tokens, cuBLAS beyond)
    integer = T <= GEMV_MAX_T and qtype in Q8_ROWS
    err = rel_err(got, matmul_q8(*quantize_q8(x), weight) if integer else x @ weight.T)
    assert err < (1e-5 if T <= GEMV_MAX_T else 3e-3), f"{rows}x{cols}: relative error {err:.2e}"


@pytest.mark.parametrize("qtype", FLOATS, ids=lambda q: q.name)
@pytest.mark.parametrize("fused", ["plain", "norm", "swiglu"])
def test_float_rows_read_nothing_past_x(gpu, qtype, fused):
    """Float rows are padded to 32 values and K = 264 is not a multiple of 32: with NaN right
    after each x row (and after the norm weight), the 1-token GEMV must read none of it. (It
    did: test_matmul_every_quant_type's 264-column float cases came back all NaN whenever
    the pool memory after x held the fixture's poison.)"""
    rng = np.random.default_rng()
    rows, cols = 45, 264
    t = make_tensor(rng, qtype, rows, cols)
    w_gpu, weight = gpu.load_matrix(t), dequantize(t.data, qtype).astype(np.float64)
    width = 2 * cols if fused == "swiglu" else cols
    x = rng.standard_normal((1, width)).astype(np.float32)
    norm_w = (1 + 0.1 * rng.standard_normal(cols)).astype(np.float32)

    def nan_after(a):  # a on the device, as a view whose neighbours to the right are NaN
        buf = np.full((a.shape[0], a.shape[1] + 64), np.nan, np.float32)
        buf[:, :a.shape[1]] = a
        return gpu.asarray(buf)[:, :a.shape[1]]

    xg = nan_after(x)
    if fused == "norm":
        xin, xf = gpu.rmsnorm(xg, nan_after(norm_w[None])[0], 1e-5), cpu.rmsnorm(x, norm_w, 1e-5)
    elif fused == "swiglu":
        xin, xf = gpu.swiglu(xg), cpu.swiglu(x)
    else:
        xin, xf = xg, x
    got = gpu.to_numpy(gpu.matmul(xin, w_gpu))
    assert rel_err(got, xf @ weight.T) < 1e-5


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("T", [40, 64])
def test_tensor_cores_blocks_across_tiles(gpu, qtype, T):
    """More 128-row tiles than blocks run at once: each block of the tensor-core kernel takes a
    run of (tile, step) pairs, whole tiles (plain stores) and tiles shared with the next block
    (atomic adds), with the residual added once."""
    rng = np.random.default_rng()
    rows, cols = 128 * 500 + 5, 256
    t = make_tensor(rng, qtype, rows, cols)
    weight = dequantize(t.data, qtype)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    res = rng.standard_normal((T, rows)).astype(np.float32)
    got = gpu.to_numpy(gpu.matmul_add(gpu.asarray(x), gpu.load_matrix(t), gpu.asarray(res)))
    assert rel_err(got, x @ weight.T + res) < 3e-3


@pytest.mark.parametrize("T", [1, 2, 5, 24, 64, 100])
def test_stacked_mixed_types_and_fused_inputs(gpu, T):
    """Q/K/V of three quant types in one weight; the norm, SwiGLU, bias and residual fusions."""
    rng = np.random.default_rng()
    cols = 512 * 9  # long enough to split K in the tensor-core kernel
    parts = [make_tensor(rng, q, r, cols) for q, r in ((Q.Q4_K, 70), (Q.Q6_K, 33), (Q.Q8_0, 17))]
    w_gpu, w_cpu = gpu.load_matrix(*parts), cpu.load_matrix(*parts)
    tol = 1e-5 if T <= GEMV_MAX_T else 3e-3
    x = rng.standard_normal((T, cols)).astype(np.float32)
    norm_w = (1 + 0.1 * rng.standard_normal(cols)).astype(np.float32)
    bias = rng.standard_normal(120).astype(np.float32)
    res = rng.standard_normal((T, 120)).astype(np.float32)
    xg = gpu.asarray(x)
    if T <= GEMV_MAX_T and Q8_ROWS:  # all three parts on integer activations: their twin
        assert all(p.qtype in Q8_ROWS for p in parts)
        ref = lambda *a, **kw: matmul_q8(*quantize_q8_input(*a, **kw), w_cpu)  # noqa: E731
    else:
        ref = lambda x, norm_weight=None, eps=0.0, swiglu=False: cpu.matmul(  # noqa: E731
            cpu.swiglu(x) if swiglu else x if norm_weight is None else cpu.rmsnorm(x, norm_weight, eps), w_cpu)

    want = ref(x, norm_w, 1e-6)
    got = gpu.matmul(gpu.rmsnorm(xg, gpu.asarray(norm_w), 1e-6), w_gpu)
    assert rel_err(gpu.to_numpy(got), want) < tol
    got = gpu.matmul_add(gpu.rmsnorm(xg, gpu.asarray(norm_w), 1e-6), w_gpu, gpu.asarray(bias))
    assert rel_err(gpu.to_numpy(got), want + bias) < tol
    got = gpu.matmul_add(xg, w_gpu, gpu.asarray(res))
    assert rel_err(gpu.to_numpy(got), ref(x) + res) < tol

    gu = rng.standard_normal((T, 2 * cols)).astype(np.float32)
    got = gpu.matmul(gpu.swiglu(gpu.asarray(gu)), w_gpu)
    assert rel_err(gpu.to_numpy(got), ref(gu, swiglu=True)) < tol


@pytest.mark.skipif(not Q8_ROWS, reason="NTR_GEMV_INT8=0")
@pytest.mark.parametrize("qtype", sorted(Q8_ROWS, key=lambda q: q.value), ids=lambda q: q.name)
@pytest.mark.parametrize("fused", ["plain", "norm", "swiglu"])
@pytest.mark.parametrize("T", [1, 3, 4])
@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_gemv_integer_activations(gpu, qtype, fused, T, long):
    """The dp4a GEMV (1 and 4-token kernels, called directly) and its input pre-pass against
    the NumPy twin: odd row counts, K off multiples of 256 where the format allows, long K
    (warps splitting a row), the bias and residual epilogues, outputs poisoned with NaN."""
    rng = np.random.default_rng()
    block = block_shape(qtype)[0]
    rows = int(rng.choice([37, 61, 131]))
    cols = (4608 if long else 768) if block == 256 else 32 * (145 if long else int(rng.choice([25, 7])))
    t = make_tensor(rng, qtype, rows, cols)
    w_gpu, weight = gpu.load_matrix(t), dequantize(t.data, qtype).astype(np.float64)
    if fused == "swiglu":
        x = rng.standard_normal((T, 2 * cols)).astype(np.float32)
        xin, kw = gpu.swiglu(gpu.asarray(x)), dict(swiglu=True)
    elif fused == "norm":
        x = rng.standard_normal((T, cols)).astype(np.float32)
        norm_w = (1 + 0.1 * rng.standard_normal(cols)).astype(np.float32)
        xin, kw = gpu.rmsnorm(gpu.asarray(x), gpu.asarray(norm_w), 1e-5), dict(norm_weight=norm_w, eps=1e-5)
    else:
        x = (3 * rng.standard_normal((T, cols))).astype(np.float32)
        x[:, :32] = 0  # an all-zero block: scale 0
        xin, kw = gpu.asarray(x), {}
    q, d = quantize_q8_input(x, **kw)

    mode = {"plain": 0, "norm": 1, "swiglu": 2}[fused]
    src = gpu.asarray(x)
    nw = gpu.asarray(kw["norm_weight"]) if fused == "norm" else None
    xq, ds = products.quantize_x(gpu, qtype, src, cols, mode, nw, kw.get("eps", 0.0))
    hi, lo = unpack_xq(gpu.to_numpy(xq), cols)
    assert np.array_equal((128 * hi + lo).reshape(T, cols), q)
    assert lo.min() >= 0
    ds = gpu.to_numpy(ds)
    assert rel_err(ds[..., 0], d) < 1e-6
    assert np.array_equal(ds[..., 1], q.reshape(T, -1, 32).sum(-1, dtype=np.int64))

    want = matmul_q8(q, d, weight)
    bias = rng.standard_normal(rows).astype(np.float32)
    res = rng.standard_normal((T, rows)).astype(np.float32)
    for y, add in ((None, 0), (gpu.asarray(bias), bias), (gpu.asarray(res), res)):
        out = cupy.full((T, rows), np.nan, cupy.float32)
        products.gemv(gpu, xin, w_gpu, y, out)
        got = gpu.to_numpy(out) - add
        err = rel_err(got, want)
        assert err < 1e-5, f"{rows}x{cols}: relative error {err:.2e}"
    # and the integer activations stay near the fp32 product
    xf = cpu.swiglu(x) if fused == "swiglu" else cpu.rmsnorm(x, norm_w, 1e-5) if fused == "norm" else x
    assert rel_err(got, xf @ weight.T) < 1e-3


@pytest.mark.skipif(not Q8_ROWS, reason="NTR_GEMV_INT8=0")
@pytest.mark.parametrize("qtype", sorted(Q8_ROWS, key=lambda q: q.value), ids=lambda q: q.name)
@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_residual_products_round_their_output(gpu, qtype, long, monkeypatch):
    """A decode layer's chain at one token, wo -> RMSNorm -> gate_up -> SwiGLU -> down ->
    RMSNorm -> a last product, where the residual products (wo, down) round their own output
    for the next product (quant_gemv_q8.cu gemv_q8_round): every output against the NumPy twin of its
    product on the GPU's own input to 1e-5, each rounded copy bit for bit against
    quantize_q8 of the output it was rounded from, the sums of squares for 1/rms to 1e-6;
    long rows take several passes of a block's warps; outputs poisoned with NaN."""
    monkeypatch.setattr(gpu.tuning, "round_in_products", True)
    rng = np.random.default_rng()
    block = block_shape(qtype)[0]
    d, F = (768, 4608 if long else 1280) if block == 256 else (800, 4640 if long else 1312)
    parts = {name: make_tensor(rng, qtype, r, c, name) for name, r, c in
             (("wo", d, d), ("gate_up", 2 * F, d), ("down", d, F), ("last", 61, d))}
    wg = {k: gpu.load_matrix(t) for k, t in parts.items()}
    wc = {k: dequantize(t.data, qtype).astype(np.float64) for k, t in parts.items()}
    att, x0 = rng.standard_normal((1, d)).astype(np.float32), rng.standard_normal((1, d)).astype(np.float32)
    nw1, nw2 = ((1 + 0.1 * rng.standard_normal(d)).astype(np.float32) for _ in range(2))
    eps = 1e-5

    wo = gpu.matmul_add(gpu.asarray(att), wg["wo"], gpu.asarray(x0))
    gate_up = gpu.matmul(gpu.rmsnorm(wo, gpu.asarray(nw1), eps), wg["gate_up"])
    down = gpu.matmul_add(gpu.swiglu(gate_up), wg["down"], wo)
    last = gpu.to_numpy(gpu.matmul(gpu.rmsnorm(down, gpu.asarray(nw2), eps), wg["last"]))
    assert wo.rounded is not None and down.rounded is not None, "a residual product ran without rounding"
    got = {k: gpu.to_numpy(v) for k, v in (("wo", wo), ("gate_up", gate_up), ("down", down))}

    def check_rounded(product, want_q, want_d):
        xq, ds, ss = product.rounded
        hi, lo = unpack_xq(gpu.to_numpy(xq), want_q.shape[1])
        assert np.array_equal((128 * hi + lo).reshape(want_q.shape), want_q)
        ds = gpu.to_numpy(ds)
        assert np.array_equal(ds[..., 0], want_d)
        assert np.array_equal(ds[..., 1], want_q.reshape(1, -1, 32).sum(-1, dtype=np.int64))
        out = gpu.to_numpy(product).astype(np.float64)
        assert rel_err(gpu.to_numpy(ss), np.square(out).reshape(-1, 32).sum(-1)) < 1e-6

    assert rel_err(got["wo"], matmul_q8(*quantize_q8(att), wc["wo"]) + x0) < 1e-5
    check_rounded(wo, *quantize_q8(got["wo"] * nw1))
    assert rel_err(got["gate_up"], matmul_q8(*quantize_q8_input(got["wo"], nw1, eps), wc["gate_up"])) < 1e-5
    want = matmul_q8(*quantize_q8_input(got["gate_up"], swiglu=True), wc["down"]) + got["wo"]
    assert rel_err(got["down"], want) < 1e-5
    check_rounded(down, *quantize_q8(got["down"] * nw2))
    assert rel_err(last, matmul_q8(*quantize_q8_input(got["down"], nw2, eps), wc["last"])) < 1e-5

    # a bias in place of the residual; the product read plainly (not rounding) agrees
    bias = rng.standard_normal(d).astype(np.float32)
    rounded = gpu.matmul_add(gpu.asarray(att), wg["wo"], gpu.asarray(bias))
    last = gpu.to_numpy(gpu.matmul(gpu.rmsnorm(rounded, gpu.asarray(nw1), eps), wg["last"]))
    plain = gpu.to_numpy(gpu.matmul_add(gpu.asarray(att), wg["wo"], gpu.asarray(bias)))
    assert rounded.rounded is not None
    assert rel_err(gpu.to_numpy(rounded), plain) < 1e-6
    # against the twin on the product's own output (plain's, 1e-6 away, may take another Q8 code)
    assert rel_err(last, matmul_q8(*quantize_q8_input(gpu.to_numpy(rounded), nw1, eps), wc["last"])) < 1e-5


def unpack_xq(xq: np.ndarray, K: int):
    """The high and low int8 planes [T, K/32, 32] from the pre-pass's rows: pairs of 32-value
    blocks, runs of 32 pairs stored chunk-major (common.cu xq_chunk)."""
    b = np.arange(K // 32)
    p = b >> 1
    first = (p >> 5) * 4096 + (b & 1) * 2048 + (p & 31) * 16  # chunk 0 of each block
    idx = first[:, None, None] + 512 * np.arange(4)[None, :, None] + np.arange(16)[None, None, :]
    v = xq[:, idx].astype(np.int32)  # [T, blocks, chunk, 16]
    T = xq.shape[0]
    return v[:, :, :2].reshape(T, -1, 32), v[:, :, 2:].reshape(T, -1, 32)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_embedding_rows(gpu, qtype):
    """The rows against the NumPy dequantizer; the table kept in pinned host memory (a streamed
    model's) gives the device table's rows bit for bit, its planes read where they are."""
    rng = np.random.default_rng()
    rows, cols = 300, cols_for(qtype, rng)
    t = make_tensor(rng, qtype, rows, cols)
    ids = rng.integers(0, rows, 9)
    got = gpu.to_numpy(gpu.embedding(gpu.load_embedding(t), StepInputs(ids, None, None)))
    assert rel_err(got, dequantize(t.data, qtype)[ids]) < 1e-6
    table = gpu.load_embedding(t, on_host=True)
    kinds = {cupy.cuda.runtime.pointerGetAttributes(p.data.ptr).type for s in table.segments for p in s.planes}
    assert kinds == {cupy.cuda.runtime.memoryTypeHost}
    assert np.array_equal(gpu.to_numpy(gpu.embedding(table, StepInputs(ids, None, None))), got)


def test_elementwise_ops(gpu):
    rng = np.random.default_rng()
    T, H, D = 7, 6, 64
    x = rng.standard_normal((T, 300)).astype(np.float32)
    w = rng.standard_normal(300).astype(np.float32)
    assert rel_err(gpu.to_numpy(gpu.rmsnorm(gpu.asarray(x), gpu.asarray(w), 1e-5)), cpu.rmsnorm(x, w, 1e-5)) < 1e-6
    gu = rng.standard_normal((T, 2 * 300)).astype(np.float32)
    assert rel_err(gpu.to_numpy(gpu.swiglu(gpu.asarray(gu))), cpu.swiglu(gu)) < 1e-6
    assert rel_err(gpu.to_numpy(gpu.geglu(gpu.asarray(gu))), cpu.geglu(gu)) < 1e-6
    assert rel_err(gpu.to_numpy(gpu.scale(gpu.asarray(x), 25.3)), cpu.scale(x, 25.3)) < 1e-7
    # the tensor-core products' fp16 inputs: rows of 4-value loads, an odd length, and rows
    # that do not start on 16 bytes (the element-wise path)
    for n, off in ((300, 0), (301, 0), (300, 1)):
        xs = rng.standard_normal((T, n + off)).astype(np.float32)
        ws = rng.standard_normal(n).astype(np.float32)
        gus = rng.standard_normal((T, 2 * n + off)).astype(np.float32)
        for dtype, bound in ((cupy.float32, 1e-6), (cupy.float16, 1e-3)):
            with gpu.stream:  # the private kernels run on the current stream
                # each also zeroes the next product's output (a tail past the last float4)
                zeroed = [cupy.full((T, 37), np.nan, cupy.float32) for _ in range(2)]
                norm = elementwise.rmsnorm(gpu, gpu.asarray(xs)[:, off:], gpu.asarray(ws), 1e-5, dtype, zeroed[0])
                act = elementwise.glu(gpu, gpu.asarray(gus)[:, off:], dtype, zeroed[1])
                gelu = elementwise.glu(gpu, gpu.asarray(gus)[:, off:], dtype, gelu=True)
            assert rel_err(gpu.to_numpy(norm).astype(np.float32), cpu.rmsnorm(xs[:, off:], ws, 1e-5)) < bound, (n, off)
            assert rel_err(gpu.to_numpy(act).astype(np.float32), cpu.swiglu(gus[:, off:])) < bound, (n, off)
            assert rel_err(gpu.to_numpy(gelu).astype(np.float32), cpu.geglu(gus[:, off:])) < bound, (n, off)
            assert all(np.array_equal(gpu.to_numpy(z), np.zeros((T, 37), np.float32)) for z in zeroed)
    a, b = rng.standard_normal((2, T, 300)).astype(np.float32)
    assert rel_err(gpu.to_numpy(gpu.add(gpu.asarray(a), gpu.asarray(b))), a + b) < 1e-7
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    pos = rng.integers(0, 5000, T)
    inv_freq = 10000.0 ** (-np.arange(0, D, 2) / D)
    for neox in (False, True):
        step = StepInputs(None, pos, None)
        got = gpu.to_numpy(gpu.rope(gpu.asarray(q), step, inv_freq, neox))
        assert rel_err(got, cpu.rope(q, step, inv_freq, neox)) < 1e-5


class Tables:
    """Block tables of a paged cache, blocks handed out in random order."""

    def __init__(self, num_blocks, block_size, rng):
        self.free, self.bs, self.tables = [int(b) for b in rng.permutation(num_blocks)], block_size, {}

    def batch(self, seqs, rows: bool = False):
        """seqs: (seq id, cached tokens, new tokens) -> (AttentionBatch, positions). rows: each
        sequence's new tokens as decode rows of their own (a verifying pass: step_from)."""
        starts, ctx, slots, positions, row_seqs, first = [0], [], [], [], [], []
        for sid, cached, new in seqs:
            table = self.tables.setdefault(sid, [])
            while len(table) * self.bs < cached + new:
                table.append(self.free.pop())
            pos = np.arange(cached, cached + new)
            ends = pos + 1 if rows else [cached + new]
            starts.extend(starts[-1] + np.arange(1, new + 1) if rows else [starts[-1] + new])
            ctx.extend(ends)
            row_seqs.extend([sid] * len(ends))
            first.extend([cached] * len(ends))
            slots.append(np.asarray(table)[pos // self.bs] * self.bs + pos % self.bs)
            positions.append(pos)
        width = max(len(self.tables[sid]) for sid, _, _ in seqs)
        bt = np.full((len(row_seqs), width), -1, np.int32)
        for i, sid in enumerate(row_seqs):
            bt[i, :len(self.tables[sid])] = self.tables[sid]
        batch = AttentionBatch(np.asarray(starts, np.int32), np.asarray(ctx, np.int32), bt,
                               np.concatenate(slots).astype(np.int32),
                               np.asarray(row_seqs, np.int32),  # ring slot = sequence id
                               step_from=np.asarray(first, np.int32) if rows else None)
        return batch, np.concatenate(positions)


@pytest.mark.parametrize("kv", ["q8", "q4", "q3", "q2"])
@pytest.mark.parametrize("D", [64, 96, 128, 256])
def test_rotate_kv_rows_are_bit_exact(gpu, kv, D):
    """Without RoPE (whose sin/cos round differently) the GPU's stored rows, ring and all, are
    the NumPy twin's to the bit: the same butterflies, IEEE divisions and float16 roundings."""
    rng = np.random.default_rng()
    KVH, T, bs = 2, 90, 16
    caches = [ops.new_kv_cache(8, ops.kv_layout(KVH, D, bs, kv), recent_slots=1) for ops in (cpu, gpu)]
    center = (rng.standard_normal((KVH, D)) * 3).astype(np.float32)
    scale = np.exp(rng.standard_normal((KVH, D)) * 0.3).astype(np.float32)
    for ops, (k, _) in zip((cpu, gpu), caches):
        k.center[...], k.scale[...] = ops.asarray(center), ops.asarray(scale)
    table = np.array([rng.permutation(8)[:6]], np.int32)
    slots = (table[0][np.arange(T) // bs] * bs + np.arange(T) % bs).astype(np.int32)
    batch = AttentionBatch(np.array([0, T], np.int32), np.array([T], np.int32), table, slots, np.zeros(1, np.int32))
    step = StepInputs(np.zeros(T, np.int32), np.arange(T), batch)
    q = rng.standard_normal((T, 4, D)).astype(np.float32)
    k, v = (rng.standard_normal((T, KVH, D)).astype(np.float32) * 4 for _ in range(2))
    for ops, (kc, vc) in zip((cpu, gpu), caches):
        ops.attention(ops.asarray(q), ops.asarray(k), ops.asarray(v), kc, vc, step, D ** -0.5)
    for c, g in zip(caches[0], caches[1]):
        assert np.array_equal(gpu.to_numpy(g.rows), c.rows)
        assert np.array_equal(gpu.to_numpy(g.recent), c.recent)


# head_dim 256 (Gemma 3: dynamic shared memory): the 270M's 4 heads on 1 KV head, with and
# without its 512-key window; the 12B's 16 on 8 in a window shorter than a key tile; 8 heads
# on one KV head (a full group) in a window the long prompt outgrows. Qwen2.5-0.5B's 7 heads
# a KV head: the fp16 prefill's 16-row m-tiles straddle tokens. One head a KV head in a
# 70-key window: a warp's 16 queries straddle a window's edge within one 64-key tile
ATTENTION_SHAPES = [(14, 2, 64, 0), (32, 8, 128, 0), (8, 8, 96, 0), (16, 2, 128, 0), (8, 1, 128, 100),
                    (16, 2, 64, 33), (4, 1, 96, 512), (4, 1, 256, 0), (4, 1, 256, 512), (16, 8, 256, 33),
                    (8, 1, 256, 100), (2, 2, 64, 70)]
# (every bit width at head_dim 128 and Llama-3's 4 heads a KV head: each width's code pairs
# are unpacked by their own byte selections in the decode staging)
ROTATE_KV_SHAPES = [(14, 2, 64, 0, kv) for kv in ("q8", "q4", "q3", "q2")] + [
    (32, 8, 128, 0, kv) for kv in ("q8", "q4", "q3", "q2")] + [
    (8, 8, 96, 0, "q3"), (16, 2, 64, 33, "q2"), (8, 1, 128, 100, "q8"),
    (4, 1, 256, 0, "q8"), (4, 1, 256, 512, "q4"), (16, 8, 256, 33, "q3"), (8, 1, 256, 100, "q2")]


@pytest.mark.parametrize("D", attention_kernels.HEAD_DIMS)
@pytest.mark.parametrize("bits", [16, 8, 4, 3, 2])
def test_decode_kernels_hold_their_blocks_per_sm(gpu, D, bits):
    """decode_splits deals a step's keys to one wave of DECODE_BLOCKS_PER_SM blocks an SM: each
    decode kernel's registers and shared memory (decode_smem where dynamic) must let an SM hold
    that many, or the wave's tail runs as a second one."""
    smem = attention_kernels.decode_smem(D, bits)
    fn = gpu.k.get("attention.cu", f"attn_decode_{D}" if bits == 16 else f"attn_decode_q{bits}_{D}", dynamic_smem=smem)
    sm = cupy.cuda.Device().attributes
    warp_regs = -(-fn.num_regs * 32 // 256) * 256  # registers are given to a warp 256 at a time
    by_regs = sm["MaxRegistersPerMultiprocessor"] // (warp_regs * attention_kernels.DEC_WARPS)
    # the driver keeps 1 KiB of an SM's shared memory per resident block
    by_smem = sm["MaxSharedMemoryPerMultiprocessor"] // (fn.shared_size_bytes + smem + 1024)
    assert min(by_regs, by_smem) >= attention_kernels.DECODE_BLOCKS_PER_SM[D], (fn.num_regs, fn.shared_size_bytes, smem)


@pytest.mark.parametrize("H,KVH,D,window,kv", [(*s, "f16") for s in ATTENTION_SHAPES] + ROTATE_KV_SHAPES)
def test_attention_prefill_then_decode(gpu, H, KVH, D, window, kv, monkeypatch):
    """A prefill chunk of several sequences (one continuing a cached context), then
    single-token decode steps through flash-decoding with several splits; RoPE fused. Decode
    steps also check the copy of the output made for the next product (integers or fp16).
    window > 0: a sliding layer's mask (windows shorter than a key tile, than the prompts,
    and one the contexts reach only in the long prompt). A RotateKV cache against the NumPy
    backend storing the same type: the rows it writes and the attention it reads."""
    rng = np.random.default_rng()
    bs, nblocks = 16, 256
    inv_freq = 10000.0 ** (-np.arange(0, D, 2) / D)
    kc_g, vc_g = gpu.new_kv_cache(nblocks, gpu.kv_layout(KVH, D, bs, kv), recent_slots=4)
    kc_c, vc_c = cpu.new_kv_cache(nblocks, cpu.kv_layout(KVH, D, bs, kv), recent_slots=4)
    layout = kc_g.layout
    if layout.type.quantized:  # a calibrated key transform
        kc_c.center[...] = rng.standard_normal((KVH, D)) * 3
        kc_c.scale[...] = np.exp(rng.standard_normal((KVH, D)) * 0.3)
        kc_g.center[...], kc_g.scale[...] = gpu.asarray(kc_c.center), gpu.asarray(kc_c.scale)
    assert kc_g.rows.dtype == layout.dtype and kc_g.rows.shape == kc_c.rows.shape == (nblocks, bs, *layout.row_shape)
    # the cache rows as values: dequantized (rotated basis) for RotateKV
    values = (lambda rows: dequantize_rows(rows, layout)) if layout.type.quantized else (lambda rows: rows)
    scale = 1.0 / np.sqrt(D)
    tables = Tables(nblocks, bs, rng)

    def step(seqs, neox, rows=False):
        batch, pos = tables.batch(seqs, rows)
        T = len(pos)
        inputs = StepInputs(np.zeros(T, np.int32), pos, batch)  # called eagerly: the ops upload what they read
        q = rng.standard_normal((T, H, D)).astype(np.float32)
        k = rng.standard_normal((T, KVH, D)).astype(np.float32)
        v = rng.standard_normal((T, KVH, D)).astype(np.float32)
        want = cpu.attention(cpu.rope(q, inputs, inv_freq, neox), cpu.rope(k, inputs, inv_freq, neox), v, kc_c, vc_c,
                             inputs, scale, window)
        got = gpu.attention(gpu.rope(gpu.asarray(q), inputs, inv_freq, neox),
                            gpu.rope(gpu.asarray(k), inputs, inv_freq, neox), gpu.asarray(v), kc_g, vc_g, inputs, scale,
                            window)
        err = rel_err(gpu.to_numpy(got), want)
        assert err < (1e-2 if layout.type.quantized else 3e-3), f"{seqs}: relative error {err:.2e}"
        if T == batch.num_seqs and T <= GEMV_MAX_T:  # decode for GEMVs: the integer copy too
            qi, d = quantize_q8_input(gpu.to_numpy(got))
            hi, lo = unpack_xq(gpu.to_numpy(got.xq), H * D)
            assert np.array_equal((128 * hi + lo).reshape(T, -1), qi)
            ds = gpu.to_numpy(got.ds)
            assert rel_err(ds[..., 0], d) < 1e-6
            assert np.array_equal(ds[..., 1], qi.reshape(T, -1, 32).sum(-1, dtype=np.int64))
        if T == batch.num_seqs and GEMV_MAX_T < T <= QMMA_MAX_T:  # for the tensor cores: fp16
            assert np.array_equal(gpu.to_numpy(got.half), gpu.to_numpy(got).astype(np.float16))
        written = batch.slot_mapping
        for g, c in ((kc_g, kc_c), (vc_g, vc_c)):
            rows_g = gpu.to_numpy(g.rows).reshape(-1, *layout.row_shape)[written]
            rows_c = c.rows.reshape(-1, *layout.row_shape)[written]
            got_rows, want_rows = values(rows_g).astype(np.float32), values(rows_c).astype(np.float32)
            if not layout.type.quantized:
                assert rel_err(got_rows, want_rows) < 1e-3
                continue
            # RoPE rounds differently on the GPU: a value on a rounding edge takes the next code,
            # and a group whose clipping ratios nearly tie may take the other ratio (at 2 bits
            # one such group moved the rows' relative error to 1.8e-2); the rest are the twin's
            moved = ~np.isclose(got_rows, want_rows, rtol=2e-3, atol=2e-3 * np.abs(want_rows).max())
            err = rel_err(got_rows, want_rows)
            assert moved.mean() < 1e-2 and err < 5e-2, f"{seqs}: {moved.mean():.2%} moved, relative error {err:.2e}"
            # the ring: each sequence's sink and latest rows
            assert rel_err(gpu.to_numpy(g.recent).astype(np.float32), c.recent.astype(np.float32)) < 1e-3
            # later steps' attention reads what the GPU stored: otherwise the moved codes of every
            # earlier step add up in the comparison (1.3e-2 at q4 after nine steps, 2026-12-05)
            c.rows[...], c.recent[...] = gpu.to_numpy(g.rows), gpu.to_numpy(g.recent)

    step([(0, 0, 200)], neox=True)
    step([(0, 200, 37), (1, 0, 5), (2, 0, 70)], neox=True)  # chunked prefill beside fresh prompts
    ctx = {0: 237, 1: 5, 2: 70}
    for _ in range(3):  # decode: contexts ~240 (two splits of 128), 6 and 71
        step([(sid, c, 1) for sid, c in ctx.items()], neox=True)
        ctx = {sid: c + 1 for sid, c in ctx.items()}
    step([(1, 8, 1)], neox=True)  # one sequence, one split
    # verifying passes as decode rows (attn_decode reads a sequence's other rows of the step from
    # the step, not from the cache they are being stored in) beside a plain decode row
    step([(0, 240, 6), (1, 9, 1), (2, 73, 17)], neox=True, rows=True)
    step([(3, 0, 600)], neox=False)  # one long prompt, normal rope
    step([(3, 600, 1)], neox=False)  # five splits
    # a chunk of 150 continuing 601 cached positions (blocks of rows reading cached and own keys
    # across many key tiles) beside a short continuing one
    step([(3, 601, 150), (1, 10, 2)], neox=False)
    # several chunks a split, as long contexts have them (a split stages its DECODE_CHUNK-key
    # chunks one after another): the softmax carried across them, verifying rows across a chunk's edge
    monkeypatch.setattr(attention_kernels, "decode_splits", lambda keys, pairs, D: 2)
    step([(3, 751, 1), (0, 246, 1), (2, 90, 1)], neox=False)
    step([(0, 247, 12), (2, 91, 1)], neox=False, rows=True)


def test_argmax_and_sampling(gpu):
    rng = np.random.default_rng()
    B, V = 5, 151936
    logits = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    logits[1, 77] = logits[1, 9] = logits[1].max() + 1  # tie: first index wins
    lg = gpu.asarray(logits)
    assert np.array_equal(gpu.argmax(lg), np.argmax(logits, axis=-1))
    for V2, off in ((32003, 0), (1001, 1)):  # a tail after the last 16-byte load; unaligned rows
        x = rng.standard_normal((3, V2 + off)).astype(np.float32)
        x[0, off + 5] = x[0, off + 6] = x[0].max() + 1  # a tie inside one 16-byte load
        x[2, -1] = x[2].max() + 1
        assert np.array_equal(gpu.argmax(gpu.asarray(x)[:, off:]), np.argmax(x[:, off:], axis=-1))
    cases = [  # temperature, top_k, top_p, min_p
        (0.0, 0, 1.0, 0.0), (0.8, 40, 0.9, 0.0), (1.2, 0, 0.95, 0.0), (1.0, 100, 1.0, 0.05), (0.7, 5, 0.5, 0.1)]
    same = total = 0
    for _ in range(40):
        u = rng.random(B)
        params = [np.asarray(c) for c in zip(*cases)]
        got = gpu.sample(lg, *params, u)
        want = cpu.sample(logits, *params, u)
        same += int((got == want).sum())
        total += B
        assert got[0] == np.argmax(logits[0])
        for b, (t, k, p, m) in enumerate(cases):  # every id is inside the filtered set
            if k:
                assert logits[b, got[b]] >= np.sort(logits[b])[-k]
    assert same / total > 0.95, f"GPU and NumPy samplers agree on {same}/{total} draws"


def test_unknown_pdl_kind_is_refused(gpu):
    """NTR_PDL names kernel kinds; a misspelt one is an error that says which, and the
    setting stays as it was."""
    saved = gpu.tuning.pdl_setting
    with pytest.raises(ValueError, match="bogus"):
        gpu.tuning.use_pdl("gemv,bogus")
    assert gpu.tuning.pdl_setting == saved


def test_constrain_matches_the_host_twin(gpu):
    """ops.constrain on the device: the bias added and the bitmask's cleared tokens at -inf,
    exactly as kernels/ops.py's constrain_logits (random rows, masks and biases, a vocabulary
    that is not a multiple of 32), and a greedy draw on the result picks an allowed token."""
    from kernels.ops import LogitBias, constrain_logits

    rng = np.random.default_rng()
    for B, V in ((4, 151936), (3, 1001)):
        logits = (rng.standard_normal((B, V)) * 3).astype(np.float32)
        bitmask = rng.integers(-2**31, 2**31, size=(B, (V + 31) // 32), dtype=np.int64).astype(np.int32)
        bitmask[1] = 0
        bitmask[1, 3] = 1 << 5  # row 1 allows token 101 only
        n = 50
        bias = LogitBias(rng.integers(0, B, n).astype(np.int32), rng.choice(V, n, replace=False).astype(np.int32),
                         rng.uniform(-100, 100, n).astype(np.float32))
        got = cupy.asnumpy(gpu.constrain(gpu.asarray(logits), bitmask, bias))
        want = constrain_logits(logits, bitmask, bias)
        assert np.array_equal(np.isinf(got), np.isinf(want))
        finite = np.isfinite(want)
        assert np.allclose(got[finite], want[finite], rtol=1e-6, atol=1e-5)
        ids = gpu.sample(gpu.constrain(gpu.asarray(logits), bitmask, bias), [0.0] * B, [0] * B, [1.0] * B,
                         [0.0] * B, [0.0] * B)
        assert np.array_equal(ids, np.argmax(want, axis=-1)) and ids[1] == 101
        allowed = np.isfinite(want)
        for t, k, p, m in ((0.8, 0, 0.9, 0.0), (1.5, 40, 1.0, 0.0), (1.0, 0, 1.0, 0.05)):  # draws: never a masked token
            for _ in range(10):
                ids = gpu.sample(gpu.constrain(gpu.asarray(logits), bitmask, bias), [t] * B, [k] * B, [p] * B, [m] * B,
                                 rng.random(B))
                assert allowed[np.arange(B), ids].all() and ids[1] == 101
        no_mask = cupy.asnumpy(gpu.constrain(gpu.asarray(logits), None, None))
        assert np.array_equal(no_mask, logits)
        padded = np.concatenate([np.zeros((B, 3), np.float32), logits], axis=1)  # rows of a strided view
        view = cupy.asnumpy(gpu.constrain(gpu.asarray(padded)[:, 3:], bitmask, bias))
        assert np.array_equal(np.isinf(view), np.isinf(want)) and np.allclose(view[finite], want[finite], rtol=1e-6,
                                                                              atol=1e-5)
