"""The products x @ W.T on quantized weights, by tokens per product, and dequantized rows.

- 1 token (T <= GEMV_MAX_T): a GEMV decodes the blocks in registers (quant_gemv.cu). For
  Q4_K, Q6_K, Q5_0 and Q8_0 (Q8_ROWS) a pre-pass quantizes the (normed, SwiGLU'd) input to
  15-bit integers per 32 values, stored as two int8 planes, and the GEMV takes integer dot
  products (dp4a) on the raw weight bytes, as llama.cpp's MMVQ does with int8
  (quant_gemv_q8.cu says why 15 bits). Decode attention and the residual products (wo, down:
  a lazy Product) make that copy of their output themselves, so only down's SwiGLU input has
  a pre-pass of its own. The residual add and the QKV bias go into the product's epilogue.
- Batched decode (2-64 sequences) runs on tensor cores straight from the quantized blocks
  (quant_mma.cu qmma). Prompts beyond that are matrix-bound: each weight is dequantized to an
  fp16 scratch buffer (a chunk of rows at a time, never kept) and multiplied by cuBLAS with
  fp32 accumulation and fp32 output.
The functions take the backend (its kernels, launcher and tuning).
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from kernels.cupy import elementwise
from kernels.cupy.cublas import Gemm
from kernels.cupy.elementwise import Normed, Swiglu, zero_span
from kernels.cupy.kernel_constants import GEMV_WARPS, QMMA_BK, QMMA_BLOCKS_PER_SM, QMMA_BM, QMMA_MAX_T, XQ_RUN
from kernels.cupy.sources import DEQUANT, GEMV, GEMV_Q8, MMA
from kernels.cupy.streams import ptr, sm_count
from kernels.cupy.tuning import GEMV_MAX_T, Q8_ROWS
from kernels.cupy.values import Attended, Lazy, epilogue_operand, materialize, rows2
from kernels.cupy.planes import FLOAT_TYPES, UNITS_PER_BLOCK
from kernels.cupy.weights import QMatrix, Segment
from kernels.quants import block_shape

QMMA_SMEM = 2 * (QMMA_BM + QMMA_MAX_T) * QMMA_BK * 2  # two stages of the fp16 weight and x tiles
SCRATCH_ELEMS = 64 << 20  # fp16 dequantization scratch (128 MiB), reused by every product

# cuBLAS / CUDA enums (cublas_api.h, library_types.h)
_OP_N, _OP_T = 0, 1
_R_32F, _R_16F = 0, 2
_COMPUTE_32F = 68
_GEMM_DEFAULT = -1
_ONE = np.ones(1, np.float32)  # cuBLAS alpha and beta, read from the host
_ZERO = np.zeros(1, np.float32)


class Product(Lazy):
    """A 1-token product not run yet (matmul at T = 1, one dp4a format, whole 32-value blocks of
    outputs): the product reading it picks how it runs. Read through an RMSNorm by another
    dp4a product, it also rounds its output for that product (quant_gemv_q8.cu gemv_q8_round), so no
    quantizer kernel runs between the two; read any other way, it runs plainly."""

    def __init__(self, ops, x, w: QMatrix, y):
        self.ops, self.x, self.w, self.y = ops, x, w, y
        self.shape = (1, w.rows)
        self.rounded = None  # (xq, ds, ss): the rounded copy, once made

    def _compute(self):
        out = cp.empty(self.shape, cp.float32)
        with self.ops.stream:
            gemv(self.ops, self.x, self.w, self.y, out)
        return out


def dequant(b, seg: Segment, out, ids=None, n_out=None, row=0, f16=False):
    n_out = seg.rows if n_out is None else n_out
    block = 32 if seg.qtype in FLOAT_TYPES else block_shape(seg.qtype)[0]
    total = n_out * seg.nb * block // 8  # one thread per 8 values
    grid = max(1, min(-(-total // 256), sm_count() * 16))  # a grid-stride loop: at most 16 blocks an SM
    b.k.quant(DEQUANT, seg.qtype, "dequant_rows")(
        (grid,), (256,), (*seg.plane_args(row), np.int32(seg.rows - row), np.int32(seg.nb), np.int32(seg.K),
                          ptr(ids), np.int32(n_out), out, np.int32(out.strides[0] // out.itemsize),
                          np.int32(f16)))


def matmul(b, x, w: QMatrix, y):
    T = x.shape[0]
    if x.shape[-1] != w.K:
        raise ValueError(f"matmul: x has {x.shape[-1]} features, the weight {w.K}")
    seg = w.segments[0]
    # a block of the rounding kernel per 32 outputs, each on an SM of its own: measured on
    # an H100, 70B's 8192 outputs (two blocks per SM, Q6_K's registers allow one) ran its
    # down product 8% slower than a GEMV and a quantizer
    if T == 1 and b.tuning.round_in_products and len(w.segments) == 1 and seg.qtype in Q8_ROWS \
            and w.rows % 32 == 0 and w.rows // 32 <= sm_count():
        return Product(b, x, w, y)
    out = cp.empty((T, w.rows), cp.float32)
    if T == 0:
        return out
    if T <= GEMV_MAX_T:
        gemv(b, x, w, y, out)
    elif T <= QMMA_MAX_T and w.qmma:
        qmma(b, x, w, y, out)
    else:
        gemm(b, x, w, out)
        if y is not None:
            out += materialize(y)
    return out


def float_input(b, x, w: QMatrix):
    """A GEMV's input as its kernels read it: (rows, mode, norm weight, eps), mode 1 with
    the RMSNorm and 2 with the SwiGLU still to apply (quant_gemv.cuh's MODE)."""
    T, K = x.shape[0], w.K
    aligned = lambda a: a.strides[-1] == 4 and a.strides[0] % 16 == 0 and a.data.ptr % 16 == 0  # noqa: E731
    # float formats' rows are padded to whole 32-value blocks, and their GEMV reads x (and a
    # norm weight, SwiGLU's up half) that far: such an x is copied into zero-padded rows
    pad = K % 32 != 0 and any(seg.qtype in FLOAT_TYPES for seg in w.segments)
    if not pad and isinstance(x, Normed) and aligned(rows2(x.x)) and x.weight.data.ptr % 16 == 0:
        return rows2(x.x), 1, x.weight, x.eps
    if not pad and isinstance(x, Swiglu) and aligned(rows2(x.gu)):
        return rows2(x.gu), 2, None, 0.0
    src = rows2(x)
    kp = -(-K // 32) * 32 if pad else K
    if kp != K or not aligned(src):
        padded = cp.zeros((T, kp), cp.float32)
        padded[:, :K] = src
        src = padded
    return src, 0, None, 0.0


def made_integer_input(b, x):
    """The integer copy of a 1-token product's input where the kernel computing x makes
    it: decode attention (Attended), or a Product read through an RMSNorm, run now so that
    it rounds its output. -> (xq, ds, ss or None, eps) or None."""
    if isinstance(x, Attended) and x.xq is not None:
        return x.xq, x.ds, None, 0.0
    if isinstance(x, Normed) and isinstance(x.x, Product) and x.x._value is None:
        return round_product(b, x.x, x.weight, x.eps)
    return None


def round_product(b, p: Product, nw, eps: float):
    """Run p, the residual stream before an RMSNorm with weight nw, so that it also rounds
    nw * its output for the product reading it (quant_gemv_q8.cu gemv_q8_round).
    -> (xq, ds, ss, eps) as _made_integer_input."""
    w, n = p.w, p.w.rows  # n: the next product's K
    seg = w.segments[0]
    if isinstance(p.x, Attended) and p.x.xq is not None:
        xq, ds = p.x.xq, p.x.ds
    else:  # the kernel takes no 1/rms of its own input: a Product before p runs plainly
        src, mode, xnw, xeps = float_input(b, p.x, w)
        xq, ds = quantize_x(b, seg.qtype, src, w.K, mode, xnw, xeps)
    bias, res, _ = epilogue_operand(p.y)
    out = cp.empty(p.shape, cp.float32)
    yq = cp.empty((1, -(-n // 2048) * XQ_RUN), cp.int8)
    yds = cp.empty((1, n // 32, 2), cp.float32)
    yss = cp.empty((n // 32,), cp.float32)
    fn = seg.kernels.get("gemv_q8_round")
    if fn is None:
        fn = seg.kernels["gemv_q8_round"] = b.k.quant(GEMV_Q8, seg.qtype, "gemv_q8_round")
    # 1024 threads (fewer where a format's registers do not allow as many), in whole groups
    # of the rw warps that cover the block's 32 rows for a run of 8 units (a thread takes
    # the struct's RQ rows), no more groups than the rows have runs: the block has an SM
    # of its own (see _matmul), and its loads in flight set its speed
    blocks, runs, rw = n // 32, -(-seg.nb * UNITS_PER_BLOCK.get(seg.qtype, 1) // 8), 8 // Q8_ROWS[seg.qtype]
    warps = max(rw, min(fn.max_threads_per_block // 32 // rw, runs) * rw)
    b.launcher.launch("gemv", fn, (blocks,), (32 * warps,),
                      (*seg.plane_args(), np.int32(seg.nb), xq, ds, out, ptr(bias), ptr(res), nw, yq, yds, yss))
    p._value, p.rounded = out, (yq, yds, yss)
    return yq, yds, yss, eps


def gemv(b, x, w: QMatrix, y, out):
    T, K = x.shape[0], w.K
    q8 = next((seg for seg in w.segments if seg.qtype in Q8_ROWS), None)
    made = made_integer_input(b, x) if q8 is not None else None
    src, mode, nw, eps = None, 0, None, 0.0
    if made is None or any(seg.qtype not in Q8_ROWS for seg in w.segments):
        src, mode, nw, eps = float_input(b, x, w)
    if made is not None:
        xq, ds, xss, xeps = made
    elif q8 is not None:  # one integer copy of the input serves every dp4a segment and token chunk
        xq, ds = quantize_x(b, q8.qtype, src, K, mode, nw, eps)
        xss, xeps = None, 0.0
    bias, res, sr = epilogue_operand(y)
    so = out.strides[0] // 4
    with b.launcher.segment_branch(w) as branch:
        for t0 in range(0, T, 4):
            tc = min(4, T - t0)
            nt = 1 if tc == 1 else 4
            for i, seg in enumerate(w.segments):
                name = f"gemv_q8_{nt}" if seg.qtype in Q8_ROWS else f"gemv_{nt}_{mode}"
                fn = seg.kernels.get(name)
                if fn is None:
                    fn = seg.kernels[name] = b.k.quant(GEMV_Q8 if seg.qtype in Q8_ROWS else GEMV, seg.qtype, name)
                if seg.qtype in Q8_ROWS:
                    x_args = (np.uint64(xq.data.ptr + t0 * xq.shape[1]), np.int32(xq.shape[1]),
                              np.uint64(ds.data.ptr + t0 * K // 4), np.int32(K // 32), ptr(xss),
                              np.float32(xeps), np.int32(tc))
                else:
                    sx = src.strides[0] // 4
                    x_args = (np.uint64(src.data.ptr + t0 * sx * 4), np.int32(sx), np.int32(tc), ptr(nw),
                              np.float32(eps))
                rows_per_block = GEMV_WARPS // seg.gemv_split * seg.rows_per_warp
                col = seg.row0 * 4
                grid, block = (-(-seg.rows // rows_per_block),), (GEMV_WARPS * 32,)
                args = (*seg.gemv_args, *x_args, np.uint64(out.data.ptr + t0 * so * 4 + col), np.int32(so),
                        np.uint64(bias.data.ptr + col) if bias is not None else np.uint64(0),
                        np.uint64(res.data.ptr + t0 * sr * 4 + col) if res is not None else np.uint64(0),
                        np.int32(sr), np.int32(seg.gemv_split))
                b.launcher.launch("gemv", fn, grid, block, args, side=branch and i > 0)


def quantize_x(b, qtype, src, K: int, mode: int, nw, eps: float):
    """The product's input (plain, RMSNorm'd or SwiGLU'd per mode) as integers per 32 values:
    xq [T, XQ_RUN bytes per 2048 values] (each block's 32 high and 32 low int8s, in the
    order of common.cu's xq_chunk) and ds [T, K/32] = (scale, sum of the block's integers);
    NumPy twin: numpy_backend.quantize_q8_input."""
    T, runs = src.shape[0], -(-K // 2048)
    xq = cp.empty((T, runs * XQ_RUN), cp.int8)
    ds = cp.empty((T, K // 32, 2), cp.float32)
    b.launcher.launch("quantize", b.k.quant(GEMV_Q8, qtype, f"quantize_x_{mode}"), (runs, T), (256,),
                      (src, np.int32(src.strides[0] // 4), np.int32(K), ptr(nw), np.float32(eps), xq,
                       np.int32(xq.shape[1]), ds, np.int32(K // 32)))
    return xq, ds


def fp16_input(b, x, zero=None):
    """x for the tensor cores, and whether the kernel that made it also zeroed `zero`."""
    if isinstance(x, Attended) and x.half is not None:
        return x.half, False
    if isinstance(x, Normed):
        return elementwise.rmsnorm(b, x.x, x.weight, x.eps, cp.float16, zero), zero is not None
    if isinstance(x, Swiglu):
        return elementwise.glu(b, x.gu, cp.float16, zero), zero is not None
    return cp.ascontiguousarray(materialize(x), dtype=cp.float16), False


def qmma(b, x, w: QMatrix, y, out):
    T, K = x.shape[0], w.K
    bias, res, sr = epilogue_operand(y)
    steps = K // QMMA_BK
    launches, zero = [], False
    for seg in w.segments:  # as many blocks as run at once, >= 2 steps each (quant_mma.cu: stream-K)
        total = -(-seg.rows // QMMA_BM) * steps
        grid = min(sm_count() * QMMA_BLOCKS_PER_SM, -(-total // 2))
        starts = np.arange(1, grid, dtype=np.int64) * total // grid
        zero |= bool((starts % steps).any())  # a tile shared by blocks: atomic adds
        launches.append((seg, grid))
    x16, zeroed = fp16_input(b, x, out if zero and b.tuning.zero_in_inputs else None)
    if zero and not zeroed:
        args, blocks = zero_span(out)
        b.launcher.launch("norm", b.k.get("misc.cu", "zero"), (max(1, blocks),), (256,), args)
    so = out.strides[0] // 4
    with b.launcher.segment_branch(w) as branch:
        for i, (seg, grid) in enumerate(launches):
            fn = seg.kernels.get("qmma")
            if fn is None:
                fn = seg.kernels["qmma"] = b.k.quant(MMA, seg.qtype, "qmma_64")
                fn.max_dynamic_shared_size_bytes = QMMA_SMEM
            col = seg.row0 * 4
            b.launcher.launch("qmma", fn, (grid, -(-T // QMMA_MAX_T)), (256,),
                              (*seg.gemv_args, x16, np.int32(x16.strides[0] // 2), np.int32(T),
                               np.uint64(out.data.ptr + col), np.int32(so),
                               np.uint64(bias.data.ptr + col) if bias is not None else np.uint64(0),
                               np.uint64(res.data.ptr + col) if res is not None else np.uint64(0), np.int32(sr)),
                              shared_mem=QMMA_SMEM, side=branch and i > 0)


def gemm(b, x, w: QMatrix, out):
    """Tensor-core path: fp16 input, each weight chunk dequantized to scratch, cuBLAS fp32 out."""
    T, K, N = x.shape[0], w.K, w.rows
    x16, _ = fp16_input(b, x)
    if b.gemm_scratch is None:
        b.gemm_scratch = cp.empty((SCRATCH_ELEMS,), cp.float16)
    chunk = max(1, SCRATCH_ELEMS // K)
    if b.gemm is None:
        b.gemm = Gemm()
    for seg in w.segments:
        for r in range(0, seg.rows, chunk):
            rc = min(chunk, seg.rows - r)
            wt = b.gemm_scratch[:rc * K].reshape(rc, K)
            dequant(b, seg, wt, row=r, n_out=rc, f16=True)
            b.gemm(
                _OP_T, _OP_N, rc, T, K, _ONE.ctypes.data, wt.data.ptr, _R_16F, K,
                x16.data.ptr, _R_16F, K, _ZERO.ctypes.data, out.data.ptr + (seg.row0 + r) * 4, _R_32F, N,
                _COMPUTE_32F, _GEMM_DEFAULT)
