"""Weights in VRAM: GGUF blocks kept quantized, regrouped into planes per block field.

Decode at batch 1 reads every weight byte once per token, so weights stay quantized in VRAM
(ggml's bytes, regrouped into 16-byte-aligned planes per block field, kernels/cupy/planes.py) and the
products decode them in registers (kernels/cuda/quant_blocks.cuh reads these planes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cupy as cp
import cupyx
import numpy as np

from kernels.cupy.kernel_constants import QMMA_BK
from kernels.cupy.planes import FLOAT_TYPES, INTERLEAVED, PLANES, UNITS_PER_BLOCK, plane_strides
from kernels.cupy.streams import sm_count
from kernels.cupy.tuning import Q8_ROWS
from kernels.quants import Q, block_shape

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
        while ks < 4 and groups * ks < sm_count() * 16 and runs >= 2 * ks:
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


class Uploader:
    """Host bytes (the mmap) -> device through two pinned buffers, copies overlapping reads."""

    def __init__(self, stream):
        self.stream = stream
        self._pinned = [cupyx.empty_pinned((32 << 20,), np.uint8) for _ in range(2)]
        self._pinned_free = [cp.cuda.Event(disable_timing=True) for _ in range(2)]
        self._turn = 0

    def __call__(self, dst: cp.ndarray, src) -> None:
        if isinstance(src, cp.ndarray):  # blocks made on the device (kernels/cupy/requant.py)
            dst[:src.nbytes] = cp.ascontiguousarray(src).reshape(-1).view(cp.uint8)
            return
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


LOAD_CHUNK_BYTES = 16 << 20  # a matrix's bytes regrouped this many at a time: a load needs little room beside its planes


def make_segment(upload: Uploader | None, tensors, row0: int, alloc=None) -> Segment:
    """Consecutive parts of one quant type uploaded into their planes, LOAD_CHUNK_BYTES of rows
    at a time; alloc(shape): each plane's zeroed uint8 device array, in plane order (new
    memory if None; a streamed layer's are carved from its slot). upload None (and no alloc):
    the planes made on the host, in pinned memory that the kernels read through the link."""
    xp = np if upload is None else cp
    qtype, K = tensors[0].qtype, tensors[0].shape[-1]
    rows = sum(t.shape[0] for t in tensors)
    row_bytes = tensors[0].data.shape[-1]
    nb = -(-K // 32) if qtype in FLOAT_TYPES else K // block_shape(qtype)[0]
    strides = plane_strides(qtype, K)
    new = alloc or (lambda shape: xp.zeros(shape, xp.uint8))
    planes = [new((rows, stride)) for stride in strides]
    step = max(1, LOAD_CHUNK_BYTES // row_bytes)
    r = 0
    for t in tensors:
        data = t.data.reshape(t.shape[0], row_bytes)
        for a in range(0, t.shape[0], step):
            b = min(a + step, t.shape[0])
            if upload is None:
                raw = data[a:b]
            else:
                raw = cp.empty((b - a, row_bytes), cp.uint8)
                upload(raw.reshape(-1), data[a:b])
            _fill_planes(xp, planes, raw, r + a, qtype, nb)
        r += t.shape[0]
    if upload is None:
        planes = [mapped(p) for p in planes]
    seg = Segment(qtype, row0, rows, K, nb, planes, strides)
    seg.plane_args()
    return seg


def _fill_planes(xp, planes: list, raw, r0: int, qtype: Q, nb: int) -> None:
    """Rows r0.. of each plane from raw blocks [n, row bytes]: each block field into its plane
    (the first interleaved in runs of 32 units, chunk-major, where the format is)."""
    n = raw.shape[0]
    if qtype in FLOAT_TYPES:
        fields = [raw]
    else:
        raw3 = raw.reshape(n, nb, block_shape(qtype)[1])
        fields = [raw3[:, :, off:off + size].reshape(n, nb * size) for off, size in PLANES[qtype]]
    for i, (f, plane) in enumerate(zip(fields, planes)):
        dst = plane[r0:r0 + n]
        if i == 0 and qtype in INTERLEAVED:
            c = INTERLEAVED[qtype]
            padded = xp.zeros(dst.shape, xp.uint8)
            padded[:, :f.shape[1]] = f
            dst.reshape(n, -1, c, 32, 16)[...] = padded.reshape(n, -1, 32, c, 16).transpose(0, 1, 3, 2, 4)
        else:
            dst[:, :f.shape[1]] = f


def mapped(a: np.ndarray) -> cp.ndarray:
    """a copied into pinned host memory, as a device array over it: with unified addressing a
    kernel reads pinned host memory at its own address, each load crossing the link."""
    pinned = cupyx.empty_pinned(a.shape, a.dtype)
    pinned[...] = a
    memory = cp.cuda.UnownedMemory(pinned.ctypes.data, pinned.nbytes, pinned, cp.cuda.Device().id)
    return cp.ndarray(a.shape, a.dtype, cp.cuda.MemoryPointer(memory, 0))


def stack(upload: Uploader | None, tensors, alloc=None) -> QMatrix:
    """Parts [out_i, K] stacked into one weight; consecutive parts of one type share a segment
    (and a launch). upload None: in pinned host memory; alloc: where the planes go (`make_segment`)."""
    K = tensors[0].shape[-1]
    segments, row0, i = [], 0, 0
    while i < len(tensors):  # consecutive parts of one type share a launch
        j = i
        while j + 1 < len(tensors) and tensors[j + 1].qtype == tensors[i].qtype:
            j += 1
        seg = make_segment(upload, tensors[i:j + 1], row0, alloc)
        segments.append(seg)
        row0 += seg.rows
        i = j + 1
    return QMatrix(segments, row0, K)
