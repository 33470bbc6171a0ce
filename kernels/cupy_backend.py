"""CuPy backend: CUDA kernels (kernels/cuda/*.cu, compiled by NVRTC at first use and cached on
disk by CuPy) behind the ops interface.

Where the time goes and what this file does about it:
- Decode at batch 1 reads every weight byte once per token. Weights stay quantized in VRAM
  (ggml's bytes, regrouped into 16-byte-aligned planes per block field, see PLANES) and a
  GEMV decodes them in registers. RMSNorm and SwiGLU are fused into the GEMV that consumes
  them (rmsnorm()/swiglu() return lazy values), the residual add and the QKV bias into its
  epilogue (matmul_add), RoPE into attention (rope() is lazy too). For Q4_K, Q6_K, Q5_0 and
  Q8_0 (Q8_ROWS) a pre-pass quantizes the (normed, SwiGLU'd) input to 15-bit integers per 32
  values, stored as two int8 planes, and the GEMV takes integer dot products (dp4a) on the raw
  weight bytes, as llama.cpp's MMVQ does with int8 (quant_gemv_q8.cu says why 15 bits). Decode
  attention and the residual products (wo, down: a lazy Product) make that copy of their
  output themselves, so only down's SwiGLU input has a pre-pass of its own.
- A 0.5B model's decode step is ~150 small kernels: Python launching them would cost more
  than the GPU time, so run_step() captures the whole step in a CUDA graph per (batch,
  block-table width) and replays it; the step's token ids, positions and cache slots travel
  in one pinned buffer copied before each replay.
- Batched decode (2-64 sequences) runs on tensor cores straight from the quantized blocks
  (quant_mma.cu qmma). Prompts beyond that are matrix-bound: each weight is dequantized to an
  fp16 scratch buffer (a chunk of rows at a time, never kept) and multiplied by cuBLAS with
  fp32 accumulation and fp32 output.
- Sampling runs on the device (argmax, temperature, top-k, top-p, min-p): only ids leave it;
  greedy_step feeds a greedy step's ids to the next step without a trip through the host.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import cupy as cp
import cupyx
import numpy as np

try:
    from cupy.cuda import cublas
except ImportError:  # older layouts
    from cupy_backends.cuda.libs import cublas

from kernels.cupy.sources import DEQUANT, GEMV, GEMV_Q8, MMA, cubin_name, module_source, quant_prefix
from kernels.launch import PdlLauncher
from kernels.kv_layout import KVLayout
from kernels.ops import AttentionBatch, Backend, StepInputs, check_supported
from kernels.quants import Q, block_shape, dequantize

# Tokens per product: up to GEMV_MAX_T the fp32 GEMV on the quantized blocks (measured: one
# token; its 4-token variant loses to the tensor cores from 2 tokens on); up to QMMA_MAX_T
# tensor cores on the quantized blocks (batched decode); beyond, prefill-sized: dequantize to
# fp16 scratch and cuBLAS. Decode steps up to QMMA_MAX_T sequences run as CUDA graphs.
GEMV_MAX_T = int(os.environ.get("NTR_GEMV_MAX_T", 1))
QMMA_MAX_T = 64
QMMA_BM, QMMA_BK = 128, 128
XQ_RUN = 4096  # common.cu: bytes of a quantized activation row per 2048 values
QMMA_BLOCKS_PER_SM = 2  # quant_mma.cu MMA_BLOCKS_PER_SM
QMMA_SMEM = 2 * (QMMA_BM + QMMA_MAX_T) * QMMA_BK * 2  # two stages of the fp16 weight and x tiles
GEMV_WARPS = 4
# launch kinds a decode graph may launch programmatically: 1-token GEMVs, their input
# quantizers, attention, the tensor-core products, and (norm) their fp16 RMSNorm/SwiGLU
# inputs and zeroed outputs
PDL_KINDS = ("gemv", "quantize", "attention", "qmma", "norm")
DECODE_CHUNK = 64  # keys per flash-decoding split, staged at once (attention.cu DECODE_MAX_CHUNK)
MAXG = 8  # query heads per KV head the attention kernels hold
HEAD_DIMS = (64, 96, 128)
SCRATCH_ELEMS = 64 << 20  # fp16 dequantization scratch (128 MiB), reused by every product
LOG2E = 1.4426950408889634

# (byte offset, length) of each block field, in the order the kernel structs read them.
PLANES = {
    Q.Q4_0: [(2, 16), (0, 2)],
    Q.Q4_1: [(4, 16), (0, 4)],
    Q.Q5_0: [(6, 16), (2, 4), (0, 2)],
    Q.Q5_1: [(8, 16), (4, 4), (0, 4)],
    Q.Q8_0: [(2, 32), (0, 2)],
    Q.Q2_K: [(16, 64), (0, 16), (80, 4)],
    Q.Q3_K: [(32, 64), (0, 32), (96, 12), (108, 2)],
    Q.Q4_K: [(16, 128), (4, 12), (0, 4)],
    Q.Q5_K: [(48, 128), (16, 32), (4, 12), (0, 4)],
    Q.Q6_K: [(0, 128), (128, 64), (192, 16), (208, 2)],
}
FLOAT_TYPES = {Q.F32: 4, Q.F16: 2, Q.BF16: 2}
UNITS_PER_BLOCK = {Q.Q2_K: 2, Q.Q3_K: 2, Q.Q4_K: 4, Q.Q5_K: 4, Q.Q6_K: 4}  # the structs' UPB; others 1
# Planes whose per-unit piece spans several 16-byte chunks (count given) are interleaved in
# runs of 32 units, chunk-major: a warp reading 32 consecutive units loads whole lines.
INTERLEAVED = {Q.Q8_0: 2, Q.Q2_K: 2, Q.Q3_K: 2, Q.Q4_K: 2, Q.Q5_K: 2, Q.Q6_K: 2, Q.F32: 8, Q.F16: 4, Q.BF16: 4}
# Formats whose products of up to 4 tokens run on integer activations with dp4a (quant_gemv_q8.cu
# gemv_q8), with the struct's RQ (rows per warp). NTR_GEMV_INT8=0 keeps them on the fp32 GEMV.
Q8_ROWS = {Q.Q4_K: 2, Q.Q6_K: 2, Q.Q5_0: 4, Q.Q8_0: 4} if os.environ.get("NTR_GEMV_INT8", "1") != "0" else {}

# cuBLAS / CUDA enums (cublas_api.h, library_types.h)
_OP_N, _OP_T = 0, 1
_R_32F, _R_16F = 0, 2
_COMPUTE_32F = 68
_GEMM_DEFAULT = -1


_tls = threading.local()


def _on_stream(fn):
    """Run a public entry point on the backend's stream, whichever thread calls it (the
    serving worker runs forward passes on a thread of its own); nested calls skip the switch."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if getattr(_tls, "inside", False):
            return fn(self, *args, **kwargs)
        _tls.inside = True
        try:
            with self.stream:
                return fn(self, *args, **kwargs)
        finally:
            _tls.inside = False

    return wrapper


@functools.cache
def _sm_count() -> int:
    return cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())["multiProcessorCount"]


def _ptr(a) -> np.uint64:
    return np.uint64(0 if a is None else a.data.ptr)


def _zero_span(zero) -> tuple[tuple, int]:
    """misc.cu zero_span's arguments for a float32 array to zero (None: none), and the blocks
    that zero it at 1024 values each, at most 8 per SM."""
    n = 0 if zero is None else zero.size
    return (_ptr(zero), np.int32(n)), min(-(-n // 1024), _sm_count() * 8)


class Kernels:
    """The CUDA modules, compiled at first use (CuPy caches the binaries on disk)."""

    def __init__(self):
        self._modules: dict[str, cp.RawModule] = {}
        self._functions: dict[tuple[str, str], cp.RawKernel] = {}

    def _module(self, file: str, prefix: str = "") -> cp.RawModule:
        key = file + prefix
        if key not in self._modules:
            src = module_source(file, prefix)
            # $NTR_CUBIN_DIR may hold these sources compiled ahead of time by nvcc
            # (tools/bench_gpu.py --prebuild), named by the source's hash: no NVRTC wait.
            cubin = Path(os.environ.get("NTR_CUBIN_DIR", "/nonexistent")) / cubin_name(src)
            if cubin.exists():
                self._modules[key] = cp.RawModule(path=str(cubin))
            else:
                self._modules[key] = cp.RawModule(code=src, options=("-std=c++17",))
        return self._modules[key]

    def get(self, file: str, name: str, prefix: str = "") -> cp.RawKernel:
        key = (file + prefix, name)
        if key not in self._functions:
            self._functions[key] = self._module(file, prefix).get_function(name)
        return self._functions[key]

    def quant(self, file: str, qtype, name: str) -> cp.RawKernel:
        """Kernel `name` of quant module `file` (kernels/cupy/sources.py) built for qtype."""
        return self.get(file, name, quant_prefix(qtype))


@dataclass
class Segment:
    """Consecutive output rows of one quant type: the planes of their blocks."""

    qtype: Q
    row0: int  # first output row in the stacked weight
    rows: int
    K: int
    nb: int  # blocks per row (32-value blocks for the float types)
    planes: list  # cupy uint8 [rows, stride] each
    strides: list[int]
    _args: tuple | None = None
    gemv_args: tuple = ()
    gemv_split: int = 1
    kernels: dict = field(default_factory=dict)

    def plane_args(self, row: int = 0) -> tuple:
        if row == 0 and self._args is not None:
            return self._args
        ptrs = [np.uint64(p.data.ptr + row * s) for p, s in zip(self.planes, self.strides)]
        ptrs += [np.uint64(0)] * (4 - len(ptrs))
        strides = [np.int32(s) for s in self.strides] + [np.int32(0)] * (4 - len(self.strides))
        if row == 0:
            self._args = (*ptrs, *strides)
            self.gemv_args = (*self._args, np.int32(self.rows), np.int32(self.nb), np.int32(self.K))
            self.gemv_split = self.ksplit
        return (*ptrs, *strides)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.planes)

    @property
    def rows_per_warp(self) -> int:
        return Q8_ROWS.get(self.qtype) or (2 if self.qtype == Q.F32 else 4)  # the struct's RQ or R

    @property
    def ksplit(self) -> int:
        """Warps sharing a GEMV row group: more only while the rows alone leave the SMs short
        of warps (~16 each), and each warp keeps a run of 32 units per row."""
        runs = -(-self.nb * UNITS_PER_BLOCK.get(self.qtype, 1) // 32)
        groups = -(-self.rows // self.rows_per_warp)
        ks = 1
        while ks < 4 and groups * ks < 132 * 16 and runs >= 2 * ks:
            ks *= 2
        return ks


@dataclass
class QMatrix:
    """A prepared weight [rows, K]: Q, K and V (or gate and up) stacked, each part kept quantized."""

    segments: list[Segment]
    rows: int
    K: int

    @property
    def qmma(self) -> bool:
        """The tensor-core kernel takes it: block formats, K in whole 128-value steps."""
        return self.K % QMMA_BK == 0 and all(s.qtype not in FLOAT_TYPES for s in self.segments)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.K)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)


class _Lazy:
    """A value some kernel can compute on the fly; anything else materializes it once."""

    _value = None

    def materialize(self):
        if self._value is None:
            self._value = self._compute()
        return self._value

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def __getitem__(self, idx):
        return self.materialize()[idx]


class Normed(_Lazy):
    def __init__(self, ops, x, weight, eps):
        self.ops, self.x, self.weight, self.eps = ops, x, weight, float(eps)
        self.shape = x.shape

    def _compute(self):
        return self.ops._rmsnorm(self.x, self.weight, self.eps, cp.float32)


class Swiglu(_Lazy):
    def __init__(self, ops, gate_up):
        self.ops, self.gu = ops, gate_up
        self.shape = (gate_up.shape[0], gate_up.shape[1] // 2)

    def _compute(self):
        return self.ops._swiglu(self.gu, cp.float32)


class Attended(_Lazy):
    """Decode attention's output rows with the copy the next product reads, made by the same
    kernel: for a dp4a GEMV the integers xq, ds (as quantize_x lays them out), for the
    tensor-core product an fp16 copy (half); copies no product of that many tokens reads
    are None (beyond QMMA_MAX_T sequences, both)."""

    def __init__(self, value, xq=None, ds=None, half=None):
        self._value, self.xq, self.ds, self.half = value, xq, ds, half
        self.shape = value.shape


class Product(_Lazy):
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
            self.ops._gemv(self.x, self.w, self.y, out)
        return out


class Roped(_Lazy):
    def __init__(self, ops, x, positions, inv_freq, neox):
        self.ops, self.x, self.positions, self.inv_freq, self.neox = ops, x, positions, inv_freq, bool(neox)
        self.shape = x.shape

    def _compute(self):
        x = _rows3(self.x)
        T, heads, D = x.shape
        out = cp.empty((T, heads, D), cp.float32)
        if T:
            self.ops.k.get("misc.cu", "rope")(
                (T,), (128,), (x, np.int32(x.strides[0] // 4), self.positions, self.inv_freq, np.int32(heads),
                               np.int32(D), np.int32(self.neox), out))
        return out


def _materialize(x):
    return x.materialize() if isinstance(x, _Lazy) else x


def _rows3(x):
    """x [T, heads, D] float32 whose [heads, D] part is contiguous (row stride free)."""
    x = _materialize(x)
    if x.dtype != cp.float32:
        x = x.astype(cp.float32)
    if x.strides[2] != 4 or x.strides[1] != x.shape[2] * 4 or x.strides[0] % 4:
        x = cp.ascontiguousarray(x)
    return x


def _rows2(x):
    """x [T, K] float32 with unit stride along K."""
    x = _materialize(x)
    if x.dtype != cp.float32:
        x = x.astype(cp.float32)
    if x.ndim != 2 or x.strides[1] != 4 or x.strides[0] % 4:
        x = cp.ascontiguousarray(x.reshape(x.shape[0], -1))
    return x


def _epilogue_operand(y):
    """Split the addend of a fused product into (bias [out] or None, residual rows or None,
    residual row stride in floats)."""
    if y is None:
        return None, None, 0
    y = _materialize(y)
    if y.ndim == 1:
        return y, None, 0
    res = _rows2(y)
    return None, res, res.strides[0] // 4


@dataclass
class _Step:
    """Device copies of one step's host-side metadata (`StepInputs.dev` while the step runs)."""

    tokens: cp.ndarray
    positions: cp.ndarray
    slots: cp.ndarray
    ctx: cp.ndarray
    qstarts: cp.ndarray
    tables: cp.ndarray
    tiles: cp.ndarray | None
    logit_rows: cp.ndarray | None = None  # int64 rows of the flat batch that get logits (None: all)
    decode_scratch: dict = field(default_factory=dict)


class _Graph:
    """A captured decode step for B sequences and block tables of width W."""

    def __init__(self, B: int, W: int):
        self.B, self.W = B, W
        self.sizes = [B, B, B, B, B + 1, B * W]  # tokens, positions, slots, ctx, qstarts, tables
        self.host = cupyx.empty_pinned((sum(self.sizes),), np.int32)
        self.dev = cp.empty((sum(self.sizes),), cp.int32)
        self.copied = cp.cuda.Event(disable_timing=True)
        self.pool = cp.cuda.MemoryPool()
        self.graph = None
        self.out = self.ids = None

    def views(self, a):
        out, off = [], 0
        for n in self.sizes:
            out.append(a[off:off + n])
            off += n
        out[-1] = out[-1].reshape(self.B, self.W)
        return out

    def pack(self, tokens, positions, batch):
        self.copied.synchronize()  # the previous step's copy has left the buffer
        tok, pos, slots, ctx, qs, tables = self.views(self.host)
        tok[:] = tokens
        pos[:] = positions
        slots[:] = batch.slot_mapping
        ctx[:] = batch.context_lens
        qs[:] = batch.query_starts
        tables.fill(0)
        w = batch.block_tables.shape[1]
        tables[:, :w] = np.maximum(batch.block_tables, 0)


class CupyBackend(Backend):
    name = "cupy"
    dtype = cp.float32
    kv_dtype = np.float16
    device_sampling = True  # the engine may call sample()/argmax() on device logits

    def __init__(self, vram_limit: int | None = None, graphs: bool = True):
        limit = vram_limit if vram_limit is not None else int(float(os.environ.get("NTR_VRAM_LIMIT_GB", "0")) * 2**30)
        if limit:
            cp.get_default_memory_pool().set_limit(size=limit)
        self.stream = cp.cuda.Stream(non_blocking=True)  # every kernel, copy and graph is ordered on it
        self.k = Kernels()
        self.graphs = graphs
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._loaded: dict = {}
        self._invf: dict = {}
        self._last_pos = None
        self._last_graph = None
        self._graph_max_t = QMMA_MAX_T  # lowered to GEMV_MAX_T by a weight cuBLAS would take
        self._scratch = None
        self._pinned = [cupyx.empty_pinned((32 << 20,), np.uint8) for _ in range(2)]
        self._pinned_free = [cp.cuda.Event(disable_timing=True) for _ in range(2)]
        self._turn = 0
        # greedy_step: two pinned buffers its ids' copies alternate in (a step's ids are read
        # before the step after next is started)
        self._ids_host = [cupyx.empty_pinned((QMMA_MAX_T,), np.int32) for _ in range(2)]
        self._ids_copied = [cp.cuda.Event(disable_timing=True) for _ in range(2)]
        self._ids_turn = 0
        self._one = np.ones(1, np.float32)
        self._zero = np.zeros(1, np.float32)
        # which kernels of the decode graph overlap their predecessor (kernels/launch.py):
        # NTR_PDL lists them (PDL_KINDS), 0 none; all by default. Measured on an H100
        # (docs/benchmarks.md): every kind gains or is neutral on every replica, once the
        # quantizers let the next product launch only after the previous one has finished.
        self.pdl_supported = int(cp.cuda.Device().compute_capability[:-1]) >= 9
        self._pdl_launch = PdlLauncher() if self.pdl_supported else None
        self._capturing = False
        self.branch_segments = True
        self.zero_in_inputs = True  # a stream-K product's output zeroed by its input's kernel (misc.cu)
        self.round_in_products = True  # 1-token residual products round their output (Product)
        self._side = cp.cuda.Stream(non_blocking=True)
        self._fork, self._join = cp.cuda.Event(disable_timing=True), cp.cuda.Event(disable_timing=True)
        self.use_pdl(os.environ.get("NTR_PDL", ",".join(PDL_KINDS)))

    def use_pdl(self, kinds: str) -> None:
        """Which kernels the decode graphs launch programmatically, as NTR_PDL names them
        (comma-separated kinds, or 0); graphs captured before are dropped."""
        named = set() if kinds == "0" else set(kinds.split(","))
        if named - set(PDL_KINDS):
            raise ValueError(f"NTR_PDL: unknown kinds {sorted(named - set(PDL_KINDS))}; known: {', '.join(PDL_KINDS)}")
        self.pdl_setting = kinds
        self.pdl_kinds = named if self.pdl_supported else set()
        self.drop_graphs()

    def drop_graphs(self) -> None:
        """Forget the captured decode graphs, so the next decode step captures anew: after a
        setting that changes what they launch (use_pdl, branch_segments, zero_in_inputs,
        round_in_products)."""
        self._graphs.clear()
        self._last_graph = None

    # --- weights -------------------------------------------------------------
    def _upload(self, dst: cp.ndarray, src: np.ndarray) -> None:
        """Host bytes (the mmap) -> device through two pinned buffers, copies overlapping reads."""
        src = np.ascontiguousarray(src).reshape(-1).view(np.uint8)
        chunk = self._pinned[0].nbytes
        for off in range(0, src.nbytes, chunk):
            i = self._turn
            self._turn ^= 1
            self._pinned_free[i].synchronize()
            n = min(chunk, src.nbytes - off)
            np.copyto(self._pinned[i][:n], src[off:off + n])
            dst[off:off + n].data.copy_from_host_async(self._pinned[i].ctypes.data, n, self.stream)
            self._pinned_free[i].record(self.stream)

    def _segment(self, tensors, row0: int) -> Segment:
        qtype, K = tensors[0].qtype, tensors[0].shape[-1]
        rows = sum(t.shape[0] for t in tensors)
        row_bytes = tensors[0].data.shape[-1]
        raw = cp.empty((rows, row_bytes), cp.uint8)
        r = 0
        for t in tensors:
            self._upload(raw[r:r + t.shape[0]].reshape(-1), t.data)
            r += t.shape[0]
        if qtype in FLOAT_TYPES:
            nb = -(-K // 32)
            first = cp.zeros((rows, nb * 32 * FLOAT_TYPES[qtype]), cp.uint8)
            first[:, :row_bytes] = raw
            fields = [first]
        else:
            block, size = block_shape(qtype)
            nb = K // block
            raw3 = raw.reshape(rows, nb, size)
            fields = [raw3[:, :, off:off + n].reshape(rows, nb * n) for off, n in PLANES[qtype]]
        planes, strides = [], []
        for i, f in enumerate(fields):
            if i == 0 and qtype in INTERLEAVED:
                c = INTERLEAVED[qtype]
                units = f.shape[1] // (16 * c)
                padded = -(-units // 32) * 32
                plane = cp.zeros((rows, padded * c * 16), cp.uint8)
                plane[:, :f.shape[1]] = f
                plane = cp.ascontiguousarray(plane.reshape(rows, padded // 32, 32, c, 16).transpose(0, 1, 3, 2, 4))
                plane = plane.reshape(rows, -1)
            else:
                plane = cp.zeros((rows, -(-f.shape[1] // 16) * 16), cp.uint8)
                plane[:, :f.shape[1]] = f
            planes.append(plane)
            strides.append(plane.shape[1])
        del raw
        seg = Segment(qtype, row0, rows, K, nb, planes, strides)
        seg.plane_args()
        return seg

    @_on_stream
    def load_matrix(self, *tensors) -> QMatrix:
        for t in tensors:
            check_supported(t)
        K = tensors[0].shape[-1]
        if any(t.shape[-1] != K or len(t.shape) != 2 for t in tensors):
            raise ValueError("stacked matrices must be 2-D with the same input size")
        key = tuple(id(t.data) for t in tensors)
        hit = self._loaded.get(key)
        if hit is not None and all(a is t.data for a, t in zip(hit[0], tensors)):
            return hit[1]  # tied embeddings: one copy for the table and the output
        segments, row0, i = [], 0, 0
        while i < len(tensors):  # consecutive parts of one type share a launch
            j = i
            while j + 1 < len(tensors) and tensors[j + 1].qtype == tensors[i].qtype:
                j += 1
            seg = self._segment(tensors[i:j + 1], row0)
            segments.append(seg)
            row0 += seg.rows
            i = j + 1
        w = QMatrix(segments, row0, K)
        self._loaded[key] = ([t.data for t in tensors], w)  # the views pin the ids
        self._graph_max_t = min(self._graph_max_t, QMMA_MAX_T if w.qmma else GEMV_MAX_T)
        return w

    @_on_stream
    def load_vector(self, *tensors):
        for t in tensors:
            check_supported(t)
        return cp.asarray(np.concatenate([dequantize(t.data, t.qtype).reshape(-1) for t in tensors]).astype(np.float32))

    def load_embedding(self, tensor) -> QMatrix:
        return self.load_matrix(tensor)

    # --- host <-> device -------------------------------------------------------
    @_on_stream
    def asarray(self, x):
        return cp.asarray(x)

    @_on_stream
    def to_numpy(self, x):
        return cp.asnumpy(_materialize(x), stream=self.stream)

    def _i32(self, a: np.ndarray) -> cp.ndarray:
        return cp.asarray(np.ascontiguousarray(a, dtype=np.int32))

    def _inv_freq(self, inv_freq) -> cp.ndarray:
        key = id(inv_freq)
        hit = self._invf.get(key)
        if hit is None or hit[0] is not inv_freq:
            hit = self._invf[key] = (inv_freq, cp.asarray(np.asarray(inv_freq, dtype=np.float64)))
        return hit[1]

    # --- compute ------------------------------------------------------------------
    @_on_stream
    def embedding(self, table: QMatrix, step: StepInputs):
        ids_dev = step.dev.tokens if step.dev is not None else self._i32(step.tokens)
        T = len(ids_dev)
        out = cp.empty((T, table.K), cp.float32)
        self._dequant(table.segments[0], out, ids=ids_dev, n_out=T, f16=False)
        return out

    def _dequant(self, seg: Segment, out, ids=None, n_out=None, row=0, f16=False):
        n_out = seg.rows if n_out is None else n_out
        block = 32 if seg.qtype in FLOAT_TYPES else block_shape(seg.qtype)[0]
        total = n_out * seg.nb * block // 8  # one thread per 8 values
        grid = max(1, min(-(-total // 256), 132 * 16))
        self.k.quant(DEQUANT, seg.qtype, "dequant_rows")(
            (grid,), (256,), (*seg.plane_args(row), np.int32(seg.rows - row), np.int32(seg.nb), np.int32(seg.K),
                              _ptr(ids), np.int32(n_out), out, np.int32(out.strides[0] // out.itemsize),
                              np.int32(f16)))

    @_on_stream
    def matmul(self, x, w: QMatrix):
        return self._matmul(x, w, None)

    @_on_stream
    def matmul_add(self, x, w: QMatrix, y):
        return self._matmul(x, w, y)

    def _matmul(self, x, w: QMatrix, y):
        T = x.shape[0]
        if x.shape[-1] != w.K:
            raise ValueError(f"matmul: x has {x.shape[-1]} features, the weight {w.K}")
        seg = w.segments[0]
        # a block of the rounding kernel per 32 outputs, each on an SM of its own: measured on
        # an H100, 70B's 8192 outputs (two blocks per SM, Q6_K's registers allow one) ran its
        # down product 8% slower than a GEMV and a quantizer
        if T == 1 and self.round_in_products and len(w.segments) == 1 and seg.qtype in Q8_ROWS \
                and w.rows % 32 == 0 and w.rows // 32 <= _sm_count():
            return Product(self, x, w, y)
        out = cp.empty((T, w.rows), cp.float32)
        if T == 0:
            return out
        if T <= GEMV_MAX_T:
            self._gemv(x, w, y, out)
        elif T <= QMMA_MAX_T and w.qmma:
            self._qmma(x, w, y, out)
        else:
            self._gemm(x, w, out)
            if y is not None:
                out += _materialize(y)
        return out

    def _float_input(self, x, w: QMatrix):
        """A GEMV's input as its kernels read it: (rows, mode, norm weight, eps), mode 1 with
        the RMSNorm and 2 with the SwiGLU still to apply (quant_gemv.cuh's MODE)."""
        T, K = x.shape[0], w.K
        aligned = lambda a: a.strides[-1] == 4 and a.strides[0] % 16 == 0 and a.data.ptr % 16 == 0  # noqa: E731
        # float formats' rows are padded to whole 32-value blocks, and their GEMV reads x (and a
        # norm weight, SwiGLU's up half) that far: such an x is copied into zero-padded rows
        pad = K % 32 != 0 and any(seg.qtype in FLOAT_TYPES for seg in w.segments)
        if not pad and isinstance(x, Normed) and aligned(_rows2(x.x)) and x.weight.data.ptr % 16 == 0:
            return _rows2(x.x), 1, x.weight, x.eps
        if not pad and isinstance(x, Swiglu) and aligned(_rows2(x.gu)):
            return _rows2(x.gu), 2, None, 0.0
        src = _rows2(x)
        kp = -(-K // 32) * 32 if pad else K
        if kp != K or not aligned(src):
            padded = cp.zeros((T, kp), cp.float32)
            padded[:, :K] = src
            src = padded
        return src, 0, None, 0.0

    def _made_integer_input(self, x):
        """The integer copy of a 1-token product's input where the kernel computing x makes
        it: decode attention (Attended), or a Product read through an RMSNorm, run now so that
        it rounds its output. -> (xq, ds, ss or None, eps) or None."""
        if isinstance(x, Attended) and x.xq is not None:
            return x.xq, x.ds, None, 0.0
        if isinstance(x, Normed) and isinstance(x.x, Product) and x.x._value is None:
            return self._round(x.x, x.weight, x.eps)
        return None

    def _round(self, p: Product, nw, eps: float):
        """Run p, the residual stream before an RMSNorm with weight nw, so that it also rounds
        nw * its output for the product reading it (quant_gemv_q8.cu gemv_q8_round).
        -> (xq, ds, ss, eps) as _made_integer_input."""
        w, n = p.w, p.w.rows  # n: the next product's K
        seg = w.segments[0]
        if isinstance(p.x, Attended) and p.x.xq is not None:
            xq, ds = p.x.xq, p.x.ds
        else:  # the kernel takes no 1/rms of its own input: a Product before p runs plainly
            src, mode, xnw, xeps = self._float_input(p.x, w)
            xq, ds = self._quantize_x(seg.qtype, src, w.K, mode, xnw, xeps)
        bias, res, _ = _epilogue_operand(p.y)
        out = cp.empty(p.shape, cp.float32)
        yq = cp.empty((1, -(-n // 2048) * XQ_RUN), cp.int8)
        yds = cp.empty((1, n // 32, 2), cp.float32)
        yss = cp.empty((n // 32,), cp.float32)
        fn = seg.kernels.get("gemv_q8_round")
        if fn is None:
            fn = seg.kernels["gemv_q8_round"] = self.k.quant(GEMV_Q8, seg.qtype, "gemv_q8_round")
        # 1024 threads (fewer where a format's registers do not allow as many), in whole groups
        # of the rw warps that cover the block's 32 rows for a run of 8 units (a thread takes
        # the struct's RQ rows), no more groups than the rows have runs: the block has an SM
        # of its own (see _matmul), and its loads in flight set its speed
        blocks, runs, rw = n // 32, -(-seg.nb * UNITS_PER_BLOCK.get(seg.qtype, 1) // 8), 8 // Q8_ROWS[seg.qtype]
        warps = max(rw, min(fn.max_threads_per_block // 32 // rw, runs) * rw)
        self._launch("gemv", fn, (blocks,), (32 * warps,),
                     (*seg.plane_args(), np.int32(seg.nb), xq, ds, out, _ptr(bias), _ptr(res), nw, yq, yds, yss))
        p._value, p.rounded = out, (yq, yds, yss)
        return yq, yds, yss, eps

    def _gemv(self, x, w: QMatrix, y, out):
        T, K = x.shape[0], w.K
        q8 = next((seg for seg in w.segments if seg.qtype in Q8_ROWS), None)
        made = self._made_integer_input(x) if q8 is not None else None
        src, mode, nw, eps = None, 0, None, 0.0
        if made is None or any(seg.qtype not in Q8_ROWS for seg in w.segments):
            src, mode, nw, eps = self._float_input(x, w)
        if made is not None:
            xq, ds, xss, xeps = made
        elif q8 is not None:  # one integer copy of the input serves every dp4a segment and token chunk
            xq, ds = self._quantize_x(q8.qtype, src, K, mode, nw, eps)
            xss, xeps = None, 0.0
        bias, res, sr = _epilogue_operand(y)
        so = out.strides[0] // 4
        with self._segment_branch(w) as branch:
            for t0 in range(0, T, 4):
                tc = min(4, T - t0)
                nt = 1 if tc == 1 else 4
                for i, seg in enumerate(w.segments):
                    name = f"gemv_q8_{nt}" if seg.qtype in Q8_ROWS else f"gemv_{nt}_{mode}"
                    fn = seg.kernels.get(name)
                    if fn is None:
                        fn = seg.kernels[name] = self.k.quant(GEMV_Q8 if seg.qtype in Q8_ROWS else GEMV, seg.qtype, name)
                    if seg.qtype in Q8_ROWS:
                        x_args = (np.uint64(xq.data.ptr + t0 * xq.shape[1]), np.int32(xq.shape[1]),
                                  np.uint64(ds.data.ptr + t0 * K // 4), np.int32(K // 32), _ptr(xss),
                                  np.float32(xeps), np.int32(tc))
                    else:
                        sx = src.strides[0] // 4
                        x_args = (np.uint64(src.data.ptr + t0 * sx * 4), np.int32(sx), np.int32(tc), _ptr(nw),
                                  np.float32(eps))
                    rows_per_block = GEMV_WARPS // seg.gemv_split * seg.rows_per_warp
                    col = seg.row0 * 4
                    grid, block = (-(-seg.rows // rows_per_block),), (GEMV_WARPS * 32,)
                    args = (*seg.gemv_args, *x_args, np.uint64(out.data.ptr + t0 * so * 4 + col), np.int32(so),
                            np.uint64(bias.data.ptr + col) if bias is not None else np.uint64(0),
                            np.uint64(res.data.ptr + t0 * sr * 4 + col) if res is not None else np.uint64(0),
                            np.int32(sr), np.int32(seg.gemv_split))
                    self._launch("gemv", fn, grid, block, args, side=branch and i > 0)

    @contextlib.contextmanager
    def _segment_branch(self, w: QMatrix):
        """Yields whether a product's segments after the first launch with side=True: while a
        graph is captured they run on a branch beside the first (8B's V rows in Q6_K beside
        Q4_K Q and K), since they need only the input, not each other's output."""
        branch = self._capturing and self.branch_segments and len(w.segments) > 1
        if branch:
            self._fork.record(self.stream)
            self._side.wait_event(self._fork)
        yield branch
        if branch:
            self._join.record(self._side)
            self.stream.wait_event(self._join)

    def _launch(self, kind: str, fn, grid, block, args, shared_mem: int = 0, side: bool = False) -> None:
        """fn on the stream (side: on the graph branch _segment_branch opened); while a decode
        graph is captured, with programmatic dependent launch if `kind` is enabled: only for
        kernels that pdl_wait() before touching their inputs and outputs."""
        if side:
            with self._side:
                fn(grid, block, args, shared_mem=shared_mem)
        elif self._capturing and kind in self.pdl_kinds:
            self._pdl_launch(fn, grid, block, args, self.stream, shared_mem)
        else:
            fn(grid, block, args, shared_mem=shared_mem)

    def _quantize_x(self, qtype, src, K: int, mode: int, nw, eps: float):
        """The product's input (plain, RMSNorm'd or SwiGLU'd per mode) as integers per 32 values:
        xq [T, XQ_RUN bytes per 2048 values] (each block's 32 high and 32 low int8s, in the
        order of common.cu's xq_chunk) and ds [T, K/32] = (scale, sum of the block's integers);
        NumPy twin: numpy_backend.quantize_q8_input."""
        T, runs = src.shape[0], -(-K // 2048)
        xq = cp.empty((T, runs * XQ_RUN), cp.int8)
        ds = cp.empty((T, K // 32, 2), cp.float32)
        self._launch("quantize", self.k.quant(GEMV_Q8, qtype, f"quantize_x_{mode}"), (runs, T), (256,),
                     (src, np.int32(src.strides[0] // 4), np.int32(K), _ptr(nw), np.float32(eps), xq,
                      np.int32(xq.shape[1]), ds, np.int32(K // 32)))
        return xq, ds

    def _fp16_input(self, x, zero=None):
        """x for the tensor cores, and whether the kernel that made it also zeroed `zero`."""
        if isinstance(x, Attended) and x.half is not None:
            return x.half, False
        if isinstance(x, Normed):
            return self._rmsnorm(x.x, x.weight, x.eps, cp.float16, zero), zero is not None
        if isinstance(x, Swiglu):
            return self._swiglu(x.gu, cp.float16, zero), zero is not None
        return cp.ascontiguousarray(_materialize(x), dtype=cp.float16), False

    def _qmma(self, x, w: QMatrix, y, out):
        T, K = x.shape[0], w.K
        bias, res, sr = _epilogue_operand(y)
        steps = K // QMMA_BK
        launches, zero = [], False
        for seg in w.segments:  # as many blocks as run at once, >= 2 steps each (quant_mma.cu: stream-K)
            total = -(-seg.rows // QMMA_BM) * steps
            grid = min(_sm_count() * QMMA_BLOCKS_PER_SM, -(-total // 2))
            starts = np.arange(1, grid, dtype=np.int64) * total // grid
            zero |= bool((starts % steps).any())  # a tile shared by blocks: atomic adds
            launches.append((seg, grid))
        x16, zeroed = self._fp16_input(x, out if zero and self.zero_in_inputs else None)
        if zero and not zeroed:
            args, blocks = _zero_span(out)
            self._launch("norm", self.k.get("misc.cu", "zero"), (max(1, blocks),), (256,), args)
        so = out.strides[0] // 4
        with self._segment_branch(w) as branch:
            for i, (seg, grid) in enumerate(launches):
                fn = seg.kernels.get("qmma")
                if fn is None:
                    fn = seg.kernels["qmma"] = self.k.quant(MMA, seg.qtype, "qmma_64")
                    fn.max_dynamic_shared_size_bytes = QMMA_SMEM
                col = seg.row0 * 4
                self._launch("qmma", fn, (grid, -(-T // 64)), (256,),
                             (*seg.gemv_args, x16, np.int32(x16.strides[0] // 2), np.int32(T),
                              np.uint64(out.data.ptr + col), np.int32(so),
                              np.uint64(bias.data.ptr + col) if bias is not None else np.uint64(0),
                              np.uint64(res.data.ptr + col) if res is not None else np.uint64(0), np.int32(sr)),
                             shared_mem=QMMA_SMEM, side=branch and i > 0)

    def _gemm(self, x, w: QMatrix, out):
        """Tensor-core path: fp16 input, each weight chunk dequantized to scratch, cuBLAS fp32 out."""
        T, K, N = x.shape[0], w.K, w.rows
        x16, _ = self._fp16_input(x)
        if self._scratch is None:
            self._scratch = cp.empty((SCRATCH_ELEMS,), cp.float16)
        chunk = max(1, SCRATCH_ELEMS // K)
        handle = cp.cuda.device.get_cublas_handle()
        for seg in w.segments:
            for r in range(0, seg.rows, chunk):
                rc = min(chunk, seg.rows - r)
                wt = self._scratch[:rc * K].reshape(rc, K)
                self._dequant(seg, wt, row=r, n_out=rc, f16=True)
                cublas.gemmEx(
                    handle, _OP_T, _OP_N, rc, T, K, self._one.ctypes.data, wt.data.ptr, _R_16F, K,
                    x16.data.ptr, _R_16F, K, self._zero.ctypes.data, out.data.ptr + (seg.row0 + r) * 4, _R_32F, N,
                    _COMPUTE_32F, _GEMM_DEFAULT)

    def _rmsnorm(self, x, weight, eps, dtype, zero=None):
        """RMSNorm of x's rows into a new dtype array; zero: a contiguous float32 array the
        kernel also zeroes (misc.cu zero_span)."""
        x = _rows2(x)
        T, K = x.shape
        out = cp.empty((T, K), dtype)
        if T:
            zargs, zblocks = _zero_span(zero)
            self._launch("norm", self.k.get("misc.cu", "rmsnorm"), (max(T, zblocks),), (256,),
                         (x, np.int32(x.strides[0] // 4), weight, np.float32(eps), np.int32(K), out, np.int32(K),
                          np.int32(dtype == cp.float16), *zargs, np.int32(T)))
        return out

    def _swiglu(self, gu, dtype, zero=None):
        """silu(gate) * up into a new dtype array; zero as in _rmsnorm."""
        gu = _rows2(gu)
        T, F = gu.shape[0], gu.shape[1] // 2
        out = cp.empty((T, F), dtype)
        if T and F:
            self._launch("norm", self.k.get("misc.cu", "swiglu"), (-(-F // 1024), T), (256,),
                         (gu, np.int32(gu.strides[0] // 4), np.int32(F), out, np.int32(F),
                          np.int32(dtype == cp.float16), *_zero_span(zero)[0]))
        return out

    def rmsnorm(self, x, weight, eps):
        return Normed(self, x if isinstance(x, Product) else _materialize(x), weight, eps)

    def swiglu(self, gate_up):
        return Swiglu(self, _materialize(gate_up))

    @_on_stream
    def rope(self, x, step: StepInputs, inv_freq, neox):
        positions = step.positions
        if step.dev is not None:
            pos = step.dev.positions
        elif self._last_pos is not None and self._last_pos[0] is positions:  # q then k: one upload
            pos = self._last_pos[1]
        else:
            pos = self._i32(positions)
            self._last_pos = (positions, pos)
        return Roped(self, _materialize(x), pos, self._inv_freq(inv_freq), neox)

    @_on_stream
    def add(self, a, b):
        return _materialize(a) + _materialize(b)

    # --- attention ------------------------------------------------------------------
    @_on_stream
    def new_kv_cache(self, num_blocks, layout: KVLayout):
        shape = (num_blocks, layout.block_size, layout.n_kv_heads, layout.head_dim)
        return cp.zeros(shape, layout.dtype), cp.zeros(shape, layout.dtype)

    def _make_step(self, tokens, positions, batch: AttentionBatch) -> _Step:
        """Upload a step's metadata in one copy (eager path)."""
        T = len(batch.slot_mapping)
        B = batch.num_seqs
        starts = batch.query_starts.astype(np.int64)
        tiles = [np.stack([np.full(len(r), b), r], 1) for b in range(B)
                 for r in [np.arange(starts[b], starts[b + 1], 4)] if len(r)]
        tiles = np.concatenate(tiles).astype(np.int32) if tiles else np.zeros((0, 2), np.int32)
        tables = np.maximum(batch.block_tables, 0).astype(np.int32)
        tok = np.zeros(T, np.int32) if tokens is None else np.asarray(tokens, np.int32)
        pos = np.zeros(T, np.int32) if positions is None else np.asarray(positions, np.int32)
        parts = [tok, pos, batch.slot_mapping, batch.context_lens, batch.query_starts, tables.reshape(-1),
                 tiles.reshape(-1)]
        flat = np.concatenate([np.asarray(p, np.int32).reshape(-1) for p in parts])
        dev = cp.asarray(flat)
        views, off = [], 0
        for p in parts:
            views.append(dev[off:off + p.size])
            off += p.size
        return _Step(views[0], views[1], views[2], views[3], views[4], views[5].reshape(tables.shape),
                     views[6].reshape(-1, 2))

    @_on_stream
    def attention(self, q, k, v, k_cache, v_cache, step: StepInputs, scale):
        rope_q = isinstance(q, Roped)
        rope_k = isinstance(k, Roped)
        lazy = q if rope_q else (k if rope_k else None)
        qa = _rows3(q.x if rope_q else q)
        ka = _rows3(k.x if rope_k else k)
        va = _rows3(v)
        T, H, D = qa.shape
        KVH = ka.shape[1]
        G = H // KVH
        if D not in HEAD_DIMS or G > MAXG:
            raise NotImplementedError(f"attention kernels support head_dim {HEAD_DIMS} and <= {MAXG} query heads per KV head")
        batch = step.batch
        # a step's device copies while run_step runs it; called eagerly, the batch uploaded now
        dev = step.dev if step.dev is not None else self._make_step(None, None, batch)
        if lazy is not None:  # q and k are rotated at the same positions (the model's contract)
            positions, invf, neox = lazy.positions, lazy.inv_freq, lazy.neox
        else:
            positions, invf, neox = dev.positions, cp.zeros(1, cp.float64), False
        bs = k_cache.shape[1]
        W = dev.tables.shape[1]
        out = cp.empty((T, H * D), cp.float32)
        if T == 0:
            return out
        sq, sk, sv = (np.int32(a.strides[0] // 4) for a in (qa, ka, va))
        B = batch.num_seqs
        ls = np.float32(scale * LOG2E)
        if T == B and int(batch.query_starts[-1]) == B:  # one new token per sequence
            max_splits = -(-W * bs // DECODE_CHUNK)
            scratch = dev.decode_scratch.get((B, KVH, max_splits, D))
            if scratch is None:
                scratch = (cp.empty((B * KVH * max_splits * MAXG * D,), cp.float32),
                           cp.empty((B * KVH * max_splits * MAXG * 2,), cp.float32),
                           cp.zeros((B * KVH,), cp.int32))
                dev.decode_scratch[(B, KVH, max_splits, D)] = scratch
            # the output also as the next product reads it: integers for a GEMV, fp16 for
            # the tensor cores
            gemv, mma = T <= GEMV_MAX_T, GEMV_MAX_T < T <= QMMA_MAX_T
            xq = cp.empty((T, -(-H * D // 2048) * XQ_RUN), cp.int8) if gemv else None
            ds = cp.empty((T, H * D // 32, 2), cp.float32) if gemv else None
            half = cp.empty((T, H * D), cp.float16) if mma else None
            self._launch("attention", self.k.get("attention.cu", f"attn_decode_{D}"), (max_splits, KVH, B), (256,),
                         (qa, sq, ka, sk, va, sv, positions, invf, np.int32(rope_q), np.int32(rope_k),
                          np.int32(neox), k_cache, v_cache, dev.tables, np.int32(W), dev.ctx, dev.slots,
                          np.int32(H), np.int32(KVH), np.int32(bs), np.int32(DECODE_CHUNK), ls, *scratch,
                          np.int32(max_splits), out, _ptr(half), _ptr(xq), np.int32(xq.shape[1] if gemv else 0),
                          _ptr(ds)))
            return Attended(out, xq, ds, half)
        else:
            self.k.get("attention.cu", f"kv_store_{D}")(
                (T,), (128,), (ka, sk, va, sv, positions, invf, np.int32(rope_k), np.int32(neox), k_cache, v_cache,
                               dev.slots, np.int32(KVH)))
            tiles = dev.tiles
            if tiles is None or len(tiles) == 0:
                return out
            self.k.get("attention.cu", f"attn_prefill_{D}")(
                (len(tiles), KVH), (128,),
                (qa, sq, positions, invf, np.int32(rope_q), np.int32(neox), k_cache, v_cache, dev.tables,
                 np.int32(W), dev.ctx, dev.qstarts, tiles, np.int32(H), np.int32(KVH), np.int32(bs), ls, out))
        return out

    # --- one model step, captured and replayed for decode -------------------------------
    @_on_stream
    def logit_input(self, x, step: StepInputs):
        if step.logit_rows is None:
            return x
        rows = step.dev.logit_rows if step.dev is not None else cp.asarray(np.asarray(step.logit_rows, np.int64))
        return x[rows]

    @_on_stream
    def run_step(self, forward, step: StepInputs, kv_caches, feed=None):
        """feed: device ids to take as the step's tokens (a decode step; greedy_step)."""
        batch, logit_rows = step.batch, step.logit_rows
        T, B = len(step.tokens), batch.num_seqs
        decode = T == B and int(batch.query_starts[-1]) == B
        all_rows = logit_rows is None or (len(logit_rows) == T and np.array_equal(logit_rows, np.arange(T)))
        if self.graphs and decode and all_rows and T <= self._graph_max_t:
            return self._graph_step(forward, step, kv_caches, feed)
        if feed is not None:
            step = replace(step, tokens=cp.asnumpy(feed, stream=self.stream).astype(step.tokens.dtype))
        step.dev = self._make_step(step.tokens, step.positions, batch)
        step.dev.logit_rows = None if logit_rows is None else cp.asarray(np.asarray(logit_rows, np.int64))
        try:
            return _materialize(forward(step, kv_caches))
        finally:
            step.dev = None

    def _graph_step(self, forward, step: StepInputs, kv_caches, feed=None):
        tokens, positions, batch = step.tokens, step.positions, step.batch
        B = batch.num_seqs
        W = max(16, 1 << int(batch.block_tables.shape[1] - 1).bit_length())
        g = self._graphs.get((B, W))
        if g is None:
            g = self._graphs[(B, W)] = _Graph(B, W)
        g.pack(tokens, positions, batch)
        g.dev.data.copy_from_host_async(g.host.ctypes.data, g.host.nbytes, self.stream)
        g.copied.record(self.stream)
        if feed is not None:  # over the host's placeholders, in stream order
            g.views(g.dev)[0][:] = feed
        if g.graph is not None:
            g.graph.launch(self.stream)
            self._last_graph = g
            return g.out
        tok, pos, slots, ctx, qs, tables = g.views(g.dev)
        padded = AttentionBatch(query_starts=batch.query_starts, context_lens=batch.context_lens,
                                block_tables=np.zeros((B, W), np.int32), slot_mapping=batch.slot_mapping)
        # the captured step reads the graph's device buffers; logits for every row
        captured = StepInputs(tokens, positions, padded, None, _Step(tok, pos, slots, ctx, qs, tables, None))
        try:
            with cp.cuda.using_allocator(g.pool.malloc):
                out = _materialize(forward(captured, kv_caches))  # runs the step, warms the pool
                self.stream.begin_capture()
                self._capturing = True
                try:
                    g.out = _materialize(forward(captured, kv_caches))
                    g.ids = self._argmax_dev(g.out)  # greedy ids come with the replay: no extra launch
                finally:
                    self._capturing = False
                    g.graph = self.stream.end_capture()
        finally:
            captured.dev = None
        return out

    @_on_stream
    def greedy_step(self, forward, step: StepInputs, kv_caches, fed):
        """The step fed from the previous one's ids on the device (its graph's argmax, or the
        argmax after an eager step), its own ids copied to pinned memory behind it: the
        returned function waits only for that copy, and no host round trip stands between
        two steps."""
        feed = self._fed_ids(step.batch.num_seqs) if fed else None
        out = self.run_step(forward, step, kv_caches, feed)
        g = self._last_graph
        ids = g.ids if g is not None and out is g.out else self._argmax_dev(out)
        self._greedy_ids = ids
        self._ids_turn ^= 1
        host, done = self._ids_host[self._ids_turn], self._ids_copied[self._ids_turn]
        B = len(ids)
        if host.size < B:
            host = self._ids_host[self._ids_turn] = cupyx.empty_pinned((B,), np.int32)
        host = host[:B]
        ids.data.copy_to_host_async(host.ctypes.data, B * 4, self.stream)
        done.record(self.stream)

        def get():
            done.synchronize()
            return host.copy()

        return get

    # --- sampling on the device ---------------------------------------------------------
    @_on_stream
    def argmax(self, logits) -> np.ndarray:
        g = self._last_graph
        if g is not None and logits is g.out:
            return cp.asnumpy(g.ids, stream=self.stream)
        return cp.asnumpy(self._argmax_dev(logits), stream=self.stream)

    def _argmax_dev(self, logits):
        logits = _rows2(logits)
        B, V = logits.shape
        out = cp.empty((B,), cp.int32)
        self.k.get("misc.cu", "argmax_rows")((B,), (1024,), (logits, np.int32(logits.strides[0] // 4), np.int32(V), out))
        return out

    @_on_stream
    def sample(self, logits, temperature, top_k, top_p, min_p, uniform) -> np.ndarray:
        """One id per row: temperature (0 = argmax), top-k (0 = off), top-p, min-p, and a
        uniform number in [0, 1) per row drawn by the caller's generator."""
        logits = _rows2(logits)
        B, V = logits.shape
        params = np.concatenate([np.asarray(temperature, np.float32), np.asarray(top_p, np.float32),
                                 np.asarray(min_p, np.float32), np.asarray(uniform, np.float32),
                                 np.asarray(top_k, np.int32).view(np.float32)])
        dev = cp.asarray(params)
        t, p, m, u, k = (dev[i * B:(i + 1) * B] for i in range(5))
        out = cp.empty((B,), cp.int32)
        self.k.get("misc.cu", "sample_rows")(
            (B,), (1024,), (logits, np.int32(logits.strides[0] // 4), np.int32(V), t, k.view(cp.int32), p, m, u, out))
        return cp.asnumpy(out, stream=self.stream)
