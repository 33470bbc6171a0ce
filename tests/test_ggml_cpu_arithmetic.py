"""tools/ggml_cpu_emulation.py's roundings against independent references: Q8_0 against the
gguf package's NumPy quantizer (ggml's reference quantize_row_q8_0), Q8_K (which gguf does not
ship) against its closed form on crafted blocks, the float16 GELU table against GELU computed
directly on float16-representable inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from ggml_cpu_emulation import geglu_f16_table, gelu_table_f16, round_q8_0, round_q8_k  # noqa: E402


def test_q8_0_matches_gguf_away_from_ties():
    """gguf's Q8_0 is ggml's scalar reference: x * (1 / d), ties away from zero. The x86 quantizer
    we emulate multiplies by 127 / amax and rounds ties to even, so the two agree wherever
    x * 127 / amax is not within float32 noise of a half-integer."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 1024)) * rng.uniform(0.01, 30, (64, 1))).astype(np.float32)
    theirs = dequantize(quantize(x, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    ours = round_q8_0(x)
    blocks = x.reshape(64, -1, 32)
    scaled = blocks * (127 / np.abs(blocks).max(axis=-1, keepdims=True))
    near_tie = (np.abs(np.abs(scaled - np.floor(scaled)) - 0.5) < 1e-4).reshape(x.shape)
    assert near_tie.mean() < 1e-3
    np.testing.assert_array_equal(ours[~near_tie], theirs[~near_tie])
    assert np.abs(ours - x).max() > 0  # it does round


def test_q8_0_ties_round_to_even_with_an_fp16_scale():
    """amax 127 makes the multiplier exactly 1: 2.5 -> 2 and 3.5 -> 4 (the AVX path's
    _MM_ROUND_NEAREST), where gguf's reference rounds 2.5 away to 3; d = 1 stored as float16."""
    block = np.zeros(32, np.float32)
    block[:4] = [127, 2.5, 3.5, -2.5]
    np.testing.assert_array_equal(round_q8_0(block)[:4], [127, 2, 4, -2])
    theirs = dequantize(quantize(block[None], GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)[0]
    np.testing.assert_array_equal(theirs[:4], [127, 3, 4, -3])
    # d = 0.1 / 127 is not a float16: the values come back as multiples of the float16 d
    small = np.linspace(-0.1, 0.1, 32, dtype=np.float32)
    d16 = np.float32(np.float16(np.float32(0.1) / np.float32(127)))
    q = round_q8_0(small) / d16
    np.testing.assert_allclose(q, np.rint(q), atol=1e-4)
    assert np.abs(q).max() == 127


def test_q8_k_closed_form():
    """Multiples of a power-of-two scale s with a peak of +-127 s come back exactly, whichever
    sign the peak has (d = 1 / (-127 / peak) is -s or s); one block of 256 values each."""
    rng = np.random.default_rng(1)
    k = rng.integers(-126, 127, (2, 256)).astype(np.float32)
    k[0, 17], k[1, 200] = 127, -127
    x = k * np.float32(0.25)
    np.testing.assert_array_equal(round_q8_k(x), x)
    np.testing.assert_array_equal(round_q8_k(np.zeros((1, 256), np.float32)), 0)


def test_q8_k_rounds_half_to_even_per_256_block():
    """Peak 127 (iscale -1): 2.5 -> 2, 3.5 -> 4, -0.5 -> 0 (ggml's nearest_int, ties to even); the
    second block has its own scale: peak 254 -> d 2, so 3 -> 1.5 -> 2 -> 4."""
    x = np.zeros(512, np.float32)
    x[:4] = [127, 2.5, 3.5, -0.5]
    x[256:258] = [254, 3]
    out = round_q8_k(x)
    np.testing.assert_array_equal(out[:4], [127, 2, 4, 0])
    np.testing.assert_array_equal(out[256:258], [254, 4])


def gelu_f64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_gelu_table_on_fp16_inputs():
    """Every float16 in (-10, 10): the table holds GELU rounded to float16, except where ggml's
    float32 evaluation lands across a rounding boundary (under 1%): there within one float16
    step, or within 2.5e-7 below x = -4, where float32's 1 + tanh cancels (ggml's table too)."""
    table = gelu_table_f16()
    x16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    x = x16.astype(np.float32)
    inside = np.isfinite(x) & (x > -10) & (x < 10)
    direct = gelu_f64(x[inside]).astype(np.float16).astype(np.float32)
    got = geglu_f16_table(x[inside], np.ones(inside.sum(), np.float32), table)
    differ = got != direct
    assert differ.mean() < 0.01, differ.mean()
    # one float16 step, the larger of the two's where they sit either side of a power of two
    step = np.maximum(*(np.abs(np.spacing(v.astype(np.float16))).astype(np.float32) for v in (got, direct)))
    cancels = x[inside] < -4
    assert np.all(np.abs(got - direct)[differ] <= np.where(cancels, np.maximum(step, 2.5e-7), step)[differ])


def test_geglu_thresholds_and_fp16_input():
    """gate <= -10 -> 0, gate >= 10 -> gate * up (no table), and a gate between two float16s
    reads the nearest one's entry, times up in float32."""
    table = gelu_table_f16()
    gate = np.array([-10.0, -12.0, 10.0, 11.5, 1.0 + 2.0 ** -12, 1.0 + 3 * 2.0 ** -12], np.float32)
    up = np.array([3.0, 3.0, 3.0, 0.5, 2.0, 2.0], np.float32)
    out = geglu_f16_table(gate, up, table)
    assert out[0] == 0 and out[1] == 0
    assert out[2] == 30.0 and out[3] == 5.75
    at_one = np.float32(np.float16(gelu_f64(np.array([1.0]))[0]))
    above_one = np.float32(np.float16(gelu_f64(np.array([1.0 + 2.0 ** -10]))[0]))
    assert out[4] == 2 * at_one  # 1 + 2^-12 rounds down to 1.0 in float16
    assert out[5] == 2 * above_one  # 1 + 3 * 2^-12 rounds up to 1 + 2^-10
