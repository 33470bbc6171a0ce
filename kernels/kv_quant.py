"""RotateKV on the host: the NumPy twin of what attention.cu's quantized cache stores and reads.

Before a row is quantized it is transformed: a key is centred and scaled per channel,
(k - center) * scale, with the centre and scale the engine calibrates (workers/engine/
kv_calibration.py); then K and V rows are rotated by a normalized Walsh-Hadamard transform
(in blocks of `hadamard_block(head_dim)`), which spreads an outlier channel's energy over
the whole block, so a group's range is no longer set by one channel. Attention is unchanged
by it: the rotation is orthogonal (q is rotated alike), q / scale meets the scaled key, and
subtracting the same centre from every key shifts all of a query's scores equally, which
the softmax ignores. The transformed row is quantized asymmetrically per group, its range
clipped where that lowers the group's squared error: for each ratio r of CLIP_RATIOS the range
[mid - r * half, mid + r * half] of the group's (min + max) / 2 and (max - min) / 2 gives
scale = 2 r half / (2^bits - 1) and its minimum, both rounded to float16 first, codes =
rint((x - minimum) / scale) clamped; the ratio with the least summed squared error is kept
(the first of equals). The error is summed as the kernel's warp sums it: each of 32 lanes
over values lane, lane + 32, ..., then a butterfly. The rotation is its own inverse, so reading a row back is
dequantizing, rotating again, then undoing the key's scale and centre. The butterflies run
in the order the kernel runs them (h = 1, 2, 4, ...), so both sides round the same sums.
"""

from __future__ import annotations

import functools

import numpy as np

from kernels.kv_layout import CODE_ORDER, KVLayout, hadamard_block


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


@functools.cache
def hadamard_matrix(head_dim: int) -> np.ndarray:
    """The normalized transform as a [head_dim, head_dim] float32 matrix (symmetric, its own
    inverse): x @ it equals hadamard(x) up to the order of the sums."""
    return hadamard(np.eye(head_dim, dtype=np.float32))


def untransform(y: np.ndarray, center=None, scale=None) -> np.ndarray:
    """transform's inverse: rows in the cache's basis -> as computed (up to nothing: the
    centre is added back, so the twin compares with exact attention directly). Reading a
    whole context back every step, it multiplies by the matrix (one product, ~20x the
    butterflies' speed); only the rows quantized must be rounded as the kernel rounds them."""
    y = np.asarray(y, np.float32)
    x = y @ hadamard_matrix(y.shape[-1])
    return x if center is None else x / scale + center


CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6)  # attention.cu kv_store_q's CLIP and CLIP2 (2r)
LANES = 32


def warp_sum(e: np.ndarray) -> np.ndarray:
    """e [..., g] summed in float32 as a warp does: lanes over values lane, lane + 32, ..., then
    the butterfly (each lane adds the lane o apart, o = 16 .. 1; every lane ends equal)."""
    lanes = e.reshape(*e.shape[:-1], -1, LANES)
    acc = lanes[..., 0, :]
    for j in range(1, lanes.shape[-2]):
        acc = acc + lanes[..., j, :]
    idx = np.arange(LANES)
    for o in (16, 8, 4, 2, 1):
        acc = acc + acc[..., idx ^ o]
    return acc[..., 0]


def quantize_rows(r: np.ndarray, layout: KVLayout) -> np.ndarray:
    """Transformed rows r [..., head_dim] -> stored rows [..., row_bytes] uint8. Every ratio
    is tried at once (a leading axis), then the first of least error kept per group."""
    t, D, g = layout.type, layout.head_dim, layout.group
    r = np.asarray(r, np.float32)
    lead = r.shape[:-1]
    groups = r.reshape(*lead, D // g, g)
    qmax = np.float32(2 ** t.bits - 1)
    mn, mx = groups.min(axis=-1), groups.max(axis=-1)
    mid, half = (mx + mn) / np.float32(2), (mx - mn) / np.float32(2)
    axis = (len(CLIP_RATIOS),) + (1,) * mid.ndim
    ratio = np.array(CLIP_RATIOS, np.float32).reshape(axis)
    ratio2 = np.array([2 * x for x in CLIP_RATIOS], np.float32).reshape(axis)  # 2r rounded once, as CLIP2
    lo = (mid - ratio * half).astype(np.float16)  # [ratios, ..., groups]
    scale = (ratio2 * half / qmax).astype(np.float16)
    d, m = scale.astype(np.float32)[..., None], lo.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(d > 0, np.clip(np.rint((groups - m) / d), 0, qmax), 0).astype(np.float32)
    err = warp_sum(np.square((m + codes * d) - groups))
    pick, least = np.zeros(mid.shape, np.intp), err[0]
    for k in range(1, len(CLIP_RATIOS)):  # a later ratio only where strictly better
        better = err[k] < least
        pick, least = np.where(better, k, pick), np.where(better, err[k], least)
    lo, scale = (np.take_along_axis(a, pick[None], 0)[0] for a in (lo, scale))
    codes = np.take_along_axis(codes, pick[None, ..., None], 0)[0].astype(np.uint8)
    packed = _pack(codes.reshape(*lead, D // 8, 8)[..., CODE_ORDER[t.bits]], t.bits)
    params = np.stack([scale, lo], axis=-1).reshape(*lead, -1).view(np.uint8)
    return np.concatenate([packed, params], axis=-1)


def _pack(slots: np.ndarray, bits: int) -> np.ndarray:
    """Codes by slot [..., words, 8] -> packed [..., words * bits] uint8 (_slots' inverse)."""
    lead = slots.shape[:-2]
    if bits == 8:
        return slots.reshape(*lead, -1)
    word = np.zeros(slots.shape[:-1], np.uint32)
    for k in range(8):
        word |= slots[..., k].astype(np.uint32) << (bits * k)
    return np.stack([(word >> (8 * j)) & 255 for j in range(bits)], axis=-1).astype(np.uint8).reshape(*lead, -1)


def _slots(code_bytes: np.ndarray, bits: int) -> np.ndarray:
    """Packed codes [..., code_bytes] -> the code in each slot [..., D] uint8: each word of 8
    codes (`bits` bytes, little-endian) as one integer, its fields taken by shifts."""
    if bits == 8:
        return code_bytes
    lead = code_bytes.shape[:-1]
    b = code_bytes.reshape(*lead, -1, bits).astype(np.uint32)
    word = b[..., 0]
    for j in range(1, bits):
        word = word | (b[..., j] << (8 * j))
    fields = [(word >> (bits * k)) & ((1 << bits) - 1) for k in range(8)]
    return np.stack(fields, axis=-1).astype(np.uint8).reshape(*lead, -1)


def dequantize_rows(rows: np.ndarray, layout: KVLayout) -> np.ndarray:
    """Stored rows [..., row_bytes] uint8 -> the rotated values [..., head_dim] float32."""
    t, D, g = layout.type, layout.head_dim, layout.group
    lead = rows.shape[:-1]
    slots = _slots(rows[..., :layout.code_bytes], t.bits).reshape(*lead, D // 8, 8)
    codes = slots[..., np.argsort(CODE_ORDER[t.bits])].reshape(*lead, D // g, g).astype(np.float32)
    params = np.ascontiguousarray(rows[..., layout.code_bytes:]).view(np.float16).astype(np.float32)
    params = params.reshape(*lead, D // g, 2)
    return (params[..., 1:2] + codes * params[..., 0:1]).reshape(*lead, D)

