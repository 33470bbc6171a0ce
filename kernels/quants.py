"""Quantization formats the engine accepts, and their reference dequantization.

`gguf.quants` (the GGUF project's own NumPy code) is the reference: the CPU backend runs on
its output and every GPU dequantizing kernel is checked against it.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import _type_traits as _gguf_block_types
from gguf.quants import dequantize as _gguf_dequantize

from kernels.row_chunks import each_chunk

Q = GGMLQuantizationType
SUPPORTED_QTYPES = frozenset({
    Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
})


def block_shape(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(values per block, bytes per block)."""
    return GGML_QUANT_SIZES[qtype]


# Rows a task of the thread pool dequantizes. gguf's own dequantize calls its block code 16
# rows at a time, and loading the default model spent about half its time in Python between
# those calls (docs/benchmarks.md, "CPU").
ROWS_PER_TASK = 512


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, out: np.ndarray | None = None) -> np.ndarray:
    """Raw bytes shaped (..., row_bytes) -> float32 values shaped (..., row_len), written into
    out when given. A block format's rows go to gguf's block code ROWS_PER_TASK at a time on a
    thread pool (`row_chunks`): each block's values are gguf's, whatever the grouping."""
    if qtype not in SUPPORTED_QTYPES:
        raise ValueError(f"unsupported quantization type {qtype.name}")
    raw = np.asarray(raw)
    values_per_block, bytes_per_block = block_shape(qtype)
    shape = (*raw.shape[:-1], raw.shape[-1] // bytes_per_block * values_per_block)
    if out is not None and (out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous):
        raise ValueError(f"dequantize: out must be contiguous float32 of shape {shape}, got {out.dtype} {out.shape}")
    block = _gguf_block_types.get(qtype)
    if block is None:  # F32, F16, BF16: one elementwise conversion
        values = raw.view(np.float32) if qtype == Q.F32 else _gguf_dequantize(raw, qtype)
        if out is None:
            return np.ascontiguousarray(values, dtype=np.float32)
        out[...] = values
        return out
    out = np.empty(shape, np.float32) if out is None else out
    rows, out_rows = raw.reshape(-1, raw.shape[-1]), out.reshape(-1, shape[-1])
    block.init_grid()  # once, before any thread reads it

    def task(start: int) -> None:
        out_rows[start:start + ROWS_PER_TASK] = block.dequantize_rows(rows[start:start + ROWS_PER_TASK])

    each_chunk(len(rows), ROWS_PER_TASK, task)
    return out
