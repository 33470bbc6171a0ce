"""Requantization on the GPU (`--requant-streamed`): a matrix's source blocks uploaded and
dequantized to float32 by the product kernels' dequantizer (quant_dequant.cu), then quantized
to the new type by kernels/cuda/quantize.cu, row chunks at a time; the raw blocks stay on the
device for the segment that load_matrix builds from them (and a streamed layer's image then
takes its planes back to the host)."""

from __future__ import annotations

import ctypes
import functools

import cupy as cp
import numpy as np

from kernels.cupy.kernel_constants import QUANTIZE_THREADS
from kernels.cupy.products import dequant
from kernels.cupy.sources import QUANTIZE
from kernels.cupy.weights import stack
from kernels.quants import Q, block_shape
from kernels.requantized import DEVICE_CHUNK_VALUES, Blocks, Requantized

KERNELS = {Q.Q2_K: "quantize_q2_k", Q.Q3_K: "quantize_q3_k", Q.Q4_K: "quantize_q4_k", Q.Q5_K: "quantize_q5_k",
           Q.Q6_K: "quantize_q6_k"}


def quantize_rows(b, x: cp.ndarray, qtype: Q, out: cp.ndarray) -> None:
    """float32 rows x [rows, K] (contiguous, K a multiple of 256) -> their raw blocks in out
    [rows, K/256 * block bytes] (uint8, contiguous), on the backend's stream."""
    n_super = x.size // 256
    grid = max(1, min(-(-n_super // QUANTIZE_THREADS), 1 << 16))
    b.k.get(QUANTIZE, KERNELS[qtype])((grid,), (QUANTIZE_THREADS,), (x, np.int64(n_super), out))


def requantize(b, t: Requantized) -> Blocks:
    """t's raw blocks, on the device where quantize.cu has the type, else from the host twin."""
    rows, K = t.shape
    if t.qtype not in KERNELS or K % 256:
        return t.on_host()
    block, size = block_shape(t.qtype)
    out = cp.empty((rows, K // block * size), cp.uint8)
    seg = stack(b.upload, [t.source]).segments[0]
    step = max(1, min(rows, DEVICE_CHUNK_VALUES // K))
    x = cp.empty((step, K), cp.float32)
    stack_limit = _stack_limit()
    for r in range(0, rows, step):
        n = min(step, rows - r)
        dequant(b, seg, x[:n], n_out=n, row=r)
        quantize_rows(b, x[:n], t.qtype, out[r:r + n])
    b.stream.synchronize()
    # the quantizers' stacks (~6 KB a thread) made the driver reserve local memory for every
    # thread the device holds (~1.5 GB on an H200, outside the pool, kept until the limit is
    # set): give it back
    _set_stack_limit(stack_limit)
    return Blocks(t.name, t.qtype, t.shape, out)


CU_LIMIT_STACK_SIZE = 0


@functools.cache
def _driver():
    return ctypes.CDLL("libcuda.so.1")


def _stack_limit() -> int:
    value = ctypes.c_size_t()
    _check(_driver().cuCtxGetLimit(ctypes.byref(value), CU_LIMIT_STACK_SIZE), "cuCtxGetLimit")
    return value.value


def _set_stack_limit(nbytes: int) -> None:
    _check(_driver().cuCtxSetLimit(CU_LIMIT_STACK_SIZE, ctypes.c_size_t(nbytes)), "cuCtxSetLimit")


def _check(result: int, call: str) -> None:
    if result != 0:
        raise RuntimeError(f"{call} failed with CUresult {result}")
