"""Quantization formats the engine accepts, and their reference dequantization.

`gguf.quants.dequantize` (the GGUF project's own NumPy code) is the reference: the CPU
backend runs on its output and every GPU dequantizing kernel is checked against it.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize

Q = GGMLQuantizationType
SUPPORTED_QTYPES = frozenset({
    Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
})


def block_shape(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(values per block, bytes per block)."""
    return GGML_QUANT_SIZES[qtype]


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Raw bytes shaped (..., row_bytes) -> float32 values shaped (..., row_len)."""
    if qtype not in SUPPORTED_QTYPES:
        raise ValueError(f"unsupported quantization type {qtype.name}")
    if qtype == Q.F32:
        return np.asarray(raw).view(np.float32)
    return np.ascontiguousarray(_gguf_dequantize(np.asarray(raw), qtype), dtype=np.float32)
