"""ggml's CPU arithmetic, emulated on the NumPy backend (tools/ggml_cpu_arithmetic.py runs it).

llama.cpp's CPU backend does not compute in float32 throughout where our NumPy reference does.
Three places round, each one a part that can be switched on alone:

- `q8`: a product with a quantized weight first quantizes each input row to its type's
  vec_dot_type (ggml-cpu.c type_traits_cpu): Q8_0 for the 32-value types (Q4_0, Q5_0, Q8_0),
  Q8_1 for Q4_1 / Q5_1, Q8_K for the K-quants; an F16 weight's input becomes float16. The
  integer dot products that follow are exact, so rounding the input and multiplying by the
  dequantized weight in float32 gives ggml's product up to float32 summation order.
- `kv16`: K and V cached as float16, and in attention (ops.cpp mul_mat with an F16 src0, the
  non-flash path) the query converted to float16 before QK^T and the softmax weights to
  float16 before P.V.
- `gelu16`: GEGLU's GELU read from ggml's float16 table (vec.h ggml_vec_geglu_f32 under
  GGML_GELU_FP16).

The rounding follows the x86 build llama.cpp's reference was made with (AVX2/AVX512):
quantize_row_q8_0 / q8_1 there multiply by 127/amax and round to nearest even; q8_K is the
reference quantize_row_q8_K_ref, whose nearest_int also rounds to nearest even.
"""

from __future__ import annotations

import numpy as np

from kernels.numpy_backend import NumpyBackend
from kernels.quants import Q

PARTS = ("q8", "kv16", "gelu16")
QK8_0 = 32  # values per Q8_0 / Q8_1 block (fp16 scale)
QK_K = 256  # values per Q8_K block (float32 scale)


def round_q8_0(x: np.ndarray) -> np.ndarray:
    """x [..., K] (K % 32 == 0) as ggml's x86 quantize_row_q8_0 leaves it, dequantized: per 32
    values d = amax / 127 stored as float16, q = round-half-even(x * (127 / amax)); -> d16 * q."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(*x.shape[:-1], -1, QK8_0)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inv)
    d16 = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    return (q * d16).reshape(x.shape)


def round_q8_k(x: np.ndarray) -> np.ndarray:
    """x [..., K] (K % 256 == 0) as ggml's quantize_row_q8_K_ref leaves it, dequantized: per 256
    values, with max the first value of the largest magnitude (sign kept), iscale = -127 / max,
    q = nearest_int(iscale * x) (round-half-even), d = 1 / iscale kept in float32; -> d * q.
    |iscale * x| <= 127, so ggml's MIN(127, q) never clips."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(*x.shape[:-1], -1, QK_K)
    first = np.argmax(np.abs(blocks), axis=-1)[..., None]  # argmax: the first, as ggml's strict >
    peak = np.take_along_axis(blocks, first, axis=-1)
    with np.errstate(divide="ignore"):
        iscale = np.where(peak != 0, np.float32(-127) / peak, np.float32(0)).astype(np.float32)
        d = np.where(peak != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * iscale)
    return (q * d).reshape(x.shape)


def round_f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16, round to nearest even (ggml's GGML_FP32_TO_BF16; no NaN inputs here),
    back to float32."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


# The input rounding of a product with each weight type: its vec_dot_type's quantizer (None:
# F32, the input as is). Q8_1's values are Q8_0's (same d, same rounding); its block sum
# s = fp16(d * sum(q)), which the Q4_1 / Q5_1 dot products use for the weights' minimum, is not
# emulated (neither model here has those types).
INPUT_ROUNDING = {
    Q.Q4_0: round_q8_0, Q.Q5_0: round_q8_0, Q.Q8_0: round_q8_0, Q.Q4_1: round_q8_0, Q.Q5_1: round_q8_0,
    Q.Q2_K: round_q8_k, Q.Q3_K: round_q8_k, Q.Q4_K: round_q8_k, Q.Q5_K: round_q8_k, Q.Q6_K: round_q8_k,
    Q.F16: round_f16, Q.BF16: round_bf16, Q.F32: None,
}


def gelu_table_f16() -> np.ndarray:
    """ggml_table_gelu_f16 as float32: for each of the 65536 float16 bit patterns f,
    fp16(gelu(f)) with gelu evaluated in float32 as vec.h writes it,
    0.5f*x*(1.0f + tanhf(SQRT_2_OVER_PI*x*(1.0f + GELU_COEF_A*x*x))) (tanhf: correctly rounded)."""
    f = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    s, a, half, one = np.float32(0.79788456080286535587989211986876), np.float32(0.044715), np.float32(0.5), np.float32(1)
    with np.errstate(invalid="ignore", over="ignore"):
        inner = (s * f) * (one + (a * f) * f)
        t = np.tanh(inner.astype(np.float64)).astype(np.float32)
        gelu = (half * f) * (one + t)
    return gelu.astype(np.float16).astype(np.float32)


def geglu_f16_table(gate: np.ndarray, up: np.ndarray, table: np.ndarray) -> np.ndarray:
    """ggml_vec_geglu_f32 under GGML_GELU_FP16: gate <= -10 -> 0, gate >= 10 -> gate * up, else
    table[fp16 bits of gate] * up."""
    gate, up = np.asarray(gate, np.float32), np.asarray(up, np.float32)
    looked_up = table[gate.astype(np.float16).view(np.uint16)] * up
    return np.where(gate <= -10, np.float32(0), np.where(gate >= 10, gate * up, looked_up)).astype(np.float32)


class GgmlCpuBackend(NumpyBackend):
    """The NumPy backend with the chosen parts of ggml's CPU arithmetic. Pair "kv16" with an
    Engine(kv_type="f16") cache: this backend rounds q and the softmax weights, the cache K and V."""

    name = "numpy-ggml-cpu"

    def __init__(self, parts=PARTS):
        super().__init__()
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown emulation parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
        self.parts = frozenset(parts)
        self.gelu_table = gelu_table_f16() if "gelu16" in self.parts else None
        # each loaded matrix's row ranges by weight type: (w, [(row_start, row_end, qtype)]);
        # w is held so that its id stays its own
        self.segments: dict[int, tuple[np.ndarray, list[tuple[int, int, Q]]]] = {}

    def load_matrix(self, *tensors):
        w = super().load_matrix(*tensors)
        rows, start = [], 0
        for t in tensors:
            rows.append((start, start + t.shape[0], t.qtype))
            start += t.shape[0]
        self.segments[id(w)] = (w, rows)
        return w

    def matmul(self, x, w):
        if "q8" not in self.parts:
            return super().matmul(x, w)
        held, rows = self.segments[id(w)]
        assert held is w, "a matrix this backend did not load"
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
        for start, end, qtype in rows:
            rounding = INPUT_ROUNDING[qtype]
            out[:, start:end] = (x if rounding is None else rounding(x)) @ w[start:end].T
        return out

    def geglu(self, gate_up):
        if "gelu16" not in self.parts:
            return super().geglu(gate_up)
        gate, up = np.split(gate_up, 2, axis=-1)
        return geglu_f16_table(gate, up, self.gelu_table)

    def attention(self, q, k, v, k_cache, v_cache, step, scale, window=0):
        if "kv16" not in self.parts:
            return super().attention(q, k, v, k_cache, v_cache, step, scale, window)
        if k_cache.layout.type.name != "f16":
            raise ValueError("kv16 emulates llama.cpp's float16 KV cache: build the Engine with kv_type='f16'")
        # llama.cpp scales Gemma's q before QK^T (and Qwen's scores in soft_max), we scale the
        # scores: the same only when the scale is a power of two, as it is for both models here
        if np.log2(scale) != np.round(np.log2(scale)):
            raise ValueError(f"attention scale {scale} is not a power of two: q's float16 rounding would differ")
        return super().attention(round_f16(q), k, v, k_cache, v_cache, step, scale, window)

    def attention_weights(self, probs):
        return round_f16(probs) if "kv16" in self.parts else probs
