"""Lazy values: what an op returns when the kernel that reads it can compute it on the fly.

RMSNorm and SwiGLU are fused into the product that consumes them (norms.Normed, norms.Swiglu),
RoPE into attention (norms.Roped), and a 1-token residual product runs only once its reader
is known (products.Product); decode attention's output carries the copy the next product
reads (Attended). Anything else reading such a value materializes it once. Each lazy value
lives beside the kernel that computes it; here are their base and the readers every op uses.
"""

from __future__ import annotations

import cupy as cp


class Lazy:
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


class Attended(Lazy):
    """Decode attention's output rows with the copy the next product reads, made by the same
    kernel: for a dp4a GEMV the integers xq, ds (as quantize_x lays them out), for the
    tensor-core product an fp16 copy (half); copies no product of that many tokens reads
    are None (beyond QMMA_MAX_T sequences, both)."""

    def __init__(self, value, xq=None, ds=None, half=None):
        self._value, self.xq, self.ds, self.half = value, xq, ds, half
        self.shape = value.shape


def materialize(x):
    return x.materialize() if isinstance(x, Lazy) else x


def rows3(x):
    """x [T, heads, D] float32 whose [heads, D] part is contiguous (row stride free)."""
    x = materialize(x)
    if x.dtype != cp.float32:
        x = x.astype(cp.float32)
    if x.strides[2] != 4 or x.strides[1] != x.shape[2] * 4 or x.strides[0] % 4:
        x = cp.ascontiguousarray(x)
    return x


def rows2(x):
    """x [T, K] float32 with unit stride along K."""
    x = materialize(x)
    if x.dtype != cp.float32:
        x = x.astype(cp.float32)
    if x.ndim != 2 or x.strides[1] != 4 or x.strides[0] % 4:
        x = cp.ascontiguousarray(x.reshape(x.shape[0], -1))
    return x


def epilogue_operand(y):
    """Split the addend of a fused product into (bias [out] or None, residual rows or None,
    residual row stride in floats)."""
    if y is None:
        return None, None, 0
    y = materialize(y)
    if y.ndim == 1:
        return y, None, 0
    res = rows2(y)
    return None, res, res.strides[0] // 4
