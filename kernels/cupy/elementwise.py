"""RMSNorm, SwiGLU/GeGLU and RoPE (kernels/cuda/misc.cu) and the lazy values that defer them.

rmsnorm()/swiglu() return Normed/Swiglu: the GEMV consuming one fuses it into its input (or
the quantizing pre-pass), the tensor-core product has it made in fp16 by the kernels here,
which also zero a stream-K product's output (zero_span). rope() returns Roped: attention
rotates q and k itself. GeGLU (Gemma) is computed at once, unfused.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from kernels.cupy.streams import ptr, sm_count
from kernels.cupy.values import Lazy, rows2, rows3


def zero_span(zero) -> tuple[tuple, int]:
    """misc.cu zero_span's arguments for a float32 array to zero (None: none), and the blocks
    that zero it at 1024 values each, at most 8 per SM."""
    n = 0 if zero is None else zero.size
    return (ptr(zero), np.int32(n)), min(-(-n // 1024), sm_count() * 8)


def rmsnorm(b, x, weight, eps, dtype, zero=None):
    """RMSNorm of x's rows into a new dtype array; zero: a contiguous float32 array the
    kernel also zeroes (misc.cu zero_span)."""
    x = rows2(x)
    T, K = x.shape
    out = cp.empty((T, K), dtype)
    if T:
        zargs, zblocks = zero_span(zero)
        b.launcher.launch("norm", b.k.get("misc.cu", "rmsnorm"), (max(T, zblocks),), (256,),
                          (x, np.int32(x.strides[0] // 4), weight, np.float32(eps), np.int32(K), out, np.int32(K),
                           np.int32(dtype == cp.float16), *zargs, np.int32(T)))
    return out


def glu(b, gu, dtype, zero=None, gelu=False):
    """silu(gate) * up (gelu: GELU-tanh(gate) * up) into a new dtype array; zero as in rmsnorm."""
    gu = rows2(gu)
    T, F = gu.shape[0], gu.shape[1] // 2
    out = cp.empty((T, F), dtype)
    if T and F:
        b.launcher.launch("norm", b.k.get("misc.cu", "glu"), (-(-F // 1024), T), (256,),
                          (gu, np.int32(gu.strides[0] // 4), np.int32(F), out, np.int32(F),
                           np.int32(dtype == cp.float16), *zero_span(zero)[0], np.int32(gelu)))
    return out


class Normed(Lazy):
    def __init__(self, ops, x, weight, eps):
        self.ops, self.x, self.weight, self.eps = ops, x, weight, float(eps)
        self.shape = x.shape

    def _compute(self):
        return rmsnorm(self.ops, self.x, self.weight, self.eps, cp.float32)


class Swiglu(Lazy):
    def __init__(self, ops, gate_up):
        self.ops, self.gu = ops, gate_up
        self.shape = (gate_up.shape[0], gate_up.shape[1] // 2)

    def _compute(self):
        return glu(self.ops, self.gu, cp.float32)


class Roped(Lazy):
    def __init__(self, ops, x, positions, inv_freq, neox):
        self.ops, self.x, self.positions, self.inv_freq, self.neox = ops, x, positions, inv_freq, bool(neox)
        self.shape = x.shape

    def _compute(self):
        x = rows3(self.x)
        T, heads, D = x.shape
        out = cp.empty((T, heads, D), cp.float32)
        if T:
            self.ops.k.get("misc.cu", "rope")(
                (T,), (128,), (x, np.int32(x.strides[0] // 4), self.positions, self.inv_freq, np.int32(heads),
                               np.int32(D), np.int32(self.neox), out))
        return out
