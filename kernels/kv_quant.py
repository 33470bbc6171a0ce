"""RotateKV on the host: the NumPy twin of what attention.cu's quantized cache stores and reads.

Before a row is quantized it is transformed: a key is centred and scaled per channel,
(k - center) * scale, with the centre and scale the engine calibrates (workers/engine/
kv_calibration.py); then K and V rows are rotated by a normalized Walsh-Hadamard transform
(in blocks of `hadamard_block(head_dim)`), which spreads an outlier channel's energy over
the whole block, so a group's range is no longer set by one channel. Attention is unchanged
by it: the rotation is orthogonal (q is rotated alike), q / scale meets the scaled key, and
subtracting the same centre from every key shifts all of a query's scores equally, which
the softmax ignores. The transformed row is quantized asymmetrically per group: scale =
(max - min) / (2^bits - 1) and the minimum, both rounded to float16 first, code =
rint((x - min) / scale) clamped. The rotation is its own inverse, so reading a row back is
dequantizing, rotating again, then undoing the key's scale and centre. The butterflies run
in the order the kernel runs them (h = 1, 2, 4, ...), so both sides round the same sums.
"""

from __future__ import annotations

import numpy as np

from kernels.kv_layout import KVLayout, hadamard_block


def rotation_scale(head_dim: int) -> np.float32:
    """The normalization of the blocks' transform, 1/sqrt(block), as both sides multiply by it."""
    return np.float32(1.0 / np.sqrt(hadamard_block(head_dim)))


def hadamard(x: np.ndarray) -> np.ndarray:
    """x [..., D] rotated by the normalized Hadamard transform in blocks (float32)."""
    x = np.asarray(x, np.float32)
    D = x.shape[-1]
    hb = hadamard_block(D)
    lead = x.shape[:-1]
    h = 1
    while h < hb:
        pairs = x.reshape(*lead, D // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = np.stack([a + b, a - b], axis=-2).reshape(*lead, D)
        h *= 2
    return x * rotation_scale(D)


def transform(x: np.ndarray, center=None, scale=None) -> np.ndarray:
    """Rows x [..., n_kv_heads, head_dim] as computed -> in the cache's basis (float32)."""
    x = np.asarray(x, np.float32)
    if center is not None:
        x = (x - center) * scale
    return hadamard(x)


def untransform(y: np.ndarray, center=None, scale=None) -> np.ndarray:
    """transform's inverse: rows in the cache's basis -> as computed (up to nothing: the
    centre is added back, so the twin compares with exact attention directly)."""
    x = hadamard(y)
    return x if center is None else x / scale + center


def quantize_rows(r: np.ndarray, layout: KVLayout) -> np.ndarray:
    """Transformed rows r [..., head_dim] -> stored rows [..., row_bytes] uint8."""
    t, D, g = layout.type, layout.head_dim, layout.group
    r = np.asarray(r, np.float32)
    lead = r.shape[:-1]
    groups = r.reshape(*lead, D // g, g)
    qmax = np.float32(2 ** t.bits - 1)
    lo = groups.min(axis=-1).astype(np.float16)
    scale = ((groups.max(axis=-1) - groups.min(axis=-1)) / qmax).astype(np.float16)
    d, m = scale.astype(np.float32)[..., None], lo.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(d > 0, np.clip(np.rint((groups - m) / d), 0, qmax), 0).astype(np.uint8)
    bits = np.unpackbits(codes.reshape(*lead, D, 1), axis=-1, bitorder="little")[..., :t.bits]
    packed = np.packbits(bits.reshape(*lead, D * t.bits), axis=-1, bitorder="little")
    params = np.stack([scale, lo], axis=-1).reshape(*lead, -1).view(np.uint8)
    return np.concatenate([packed, params], axis=-1)


def dequantize_rows(rows: np.ndarray, layout: KVLayout) -> np.ndarray:
    """Stored rows [..., row_bytes] uint8 -> the rotated values [..., head_dim] float32."""
    t, D, g = layout.type, layout.head_dim, layout.group
    lead = rows.shape[:-1]
    bits = np.unpackbits(rows[..., :layout.code_bytes], axis=-1, bitorder="little").reshape(*lead, D, t.bits)
    codes = np.packbits(bits, axis=-1, bitorder="little").reshape(*lead, D // g, g).astype(np.float32)
    params = np.ascontiguousarray(rows[..., layout.code_bytes:]).view(np.float16).astype(np.float32)
    params = params.reshape(*lead, D // g, 2)
    return (params[..., 1:2] + codes * params[..., 0:1]).reshape(*lead, D)

