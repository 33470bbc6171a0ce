"""Quantizers: float32 rows -> the raw blocks `kernels.quants.dequantize` reads back.

Legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) without an importance vector are llama.cpp's
reference rounding, bit-exact with gguf-py's `gguf.quants.quantize`. With one (an importance
matrix's per-column mean squared activation), and for the K-quants always, each block's
scale is searched as llama.cpp's ggml-quants.c does (`make_qx_quants` for symmetric types,
`make_qkx2_quants` for types with a minimum): a few candidate scales per block, each
re-fitted by weighted least squares, the one with the least weighted squared error kept.
Every candidate is evaluated for all blocks of a chunk of rows at once (no per-block Python
loop); K-quants' sub-block scales are then quantized to their 4/6/8-bit codes against the
super-block's f16 scale and the values re-rounded to the scales as stored.

Without importance the weights are llama.cpp's reference ones (x^2 for symmetric searches,
sub-block RMS + |x| for Q4_K/Q5_K, |x| with absolute error for Q2_K); with importance
`imp[col] * sqrt(sigma2 + x^2)` (sigma2: the row's or super-block's mean square), as
llama.cpp's `quantize_row_*_impl` weight an imatrix.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import np_roundf

from kernels.quants import block_shape
from kernels.row_chunks import each_chunk

Q = GGMLQuantizationType
QK_K = 256
CHUNK_VALUES = 1 << 18  # values quantized per step: bounds the search's temporaries (~12 MB)
GROUP_MAX_EPS = 1e-15  # llama.cpp's: a block whose largest |x| is below this is all zeros


def quantize(values: np.ndarray, qtype: GGMLQuantizationType, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 values [rows, cols] -> raw blocks uint8 [rows, row_bytes] of qtype; importance:
    non-negative float [cols] (per input column), or None."""
    if qtype not in _QUANTIZERS:
        raise ValueError(f"cannot quantize to {getattr(qtype, 'name', qtype)}: supported "
                         f"{', '.join(t.name for t in _QUANTIZERS)}")
    x = np.asarray(values)
    if x.ndim != 2:
        raise ValueError(f"values must be [rows, cols], got shape {x.shape}")
    rows, cols = x.shape
    block, size = block_shape(qtype)
    if cols == 0 or cols % block:
        raise ValueError(f"row length {cols} is not a multiple of the {qtype.name} block of {block} values")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("values hold NaN or infinity")
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float32)
        if importance.shape != (cols,):
            raise ValueError(f"importance must have shape ({cols},) (one per column), got {importance.shape}")
        if not (np.isfinite(importance).all() and (importance >= 0).all()):
            raise ValueError("importance must be finite and non-negative")
    out = np.empty((rows, cols // block * size), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // cols)

    def chunk(r: int) -> None:  # rows are quantized independently: the chunks run on a thread pool
        out[r:r + step] = _QUANTIZERS[qtype](x[r:r + step], importance).reshape(-1, out.shape[1])

    each_chunk(rows, step, chunk)
    return out


# --- shared pieces ---------------------------------------------------------------------------

def _f16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bytes [..., 2] of v as float16, v as that float16 reads back in float32)."""
    h = np.asarray(v, dtype=np.float32).astype(np.float16)
    return h[..., None].view(np.uint8), h.astype(np.float32)


def _weights(x: np.ndarray, importance: np.ndarray | None, group: int, factor: float) -> np.ndarray | None:
    """llama.cpp's imatrix weighting imp * sqrt(sigma2 + x^2) of x [rows, cols], sigma2 = factor
    times the mean square over `group` values (1x a row for legacy types, 2x a super-block for K-quants)."""
    if importance is None:
        return None
    rows, cols = x.shape
    g = x.reshape(rows, cols // group, group)
    sigma2 = (g * g).mean(axis=-1, keepdims=True) * factor
    return (importance.reshape(cols // group, group) * np.sqrt(sigma2 + g * g)).reshape(rows, cols)


def _symmetric(x: np.ndarray, w: np.ndarray, nmax: int, steps: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants over blocks x [n, B] with weights w: (scale [n], levels int [n, B] in
    [-nmax, nmax-1]) minimising sum w (x - scale*l)^2 over iscale = -(nmax + 0.1 s)/max, |s| <= steps."""
    i_amax = np.abs(x).argmax(axis=-1)[:, None]
    vmax = np.take_along_axis(x, i_amax, axis=-1)[:, 0]
    live = np.abs(vmax) >= GROUP_MAX_EPS
    safe_max = np.where(live, vmax, 1.0)
    best = np.full(len(x), -np.inf, dtype=np.float32)
    scale = np.zeros(len(x), dtype=np.float32)
    levels = np.zeros(x.shape, dtype=np.int32)
    for s in range(-steps, steps + 1):
        iscale = -(nmax + np.float32(0.1) * s) / safe_max
        lv = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        sumlx = (w * x * lv).sum(axis=-1)
        suml2 = (w * lv * lv).sum(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(suml2 > 0, sumlx * sumlx / suml2, -np.inf)
            better = live & (score > best)
            scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, 1), scale)
        best = np.where(better, score, best)
        levels = np.where(better[:, None], lv.astype(np.int32), levels)
    return scale.astype(np.float32), levels


def _affine(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
            mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants over blocks x [n, B]: (scale [n], mn [n] >= 0, levels [n, B] in [0, nmax])
    with x ~ scale*l - mn; candidates iscale = (nmax + rmin + rdelta*i)/(max - min), each refit by
    weighted least squares of scale and min (min kept <= 0); error w*|d| if mad else w*d^2."""
    vmin = np.minimum(x.min(axis=-1), 0)
    vmax = x.max(axis=-1)
    span = vmax - vmin
    live = span > 0
    span = np.where(live, span, 1)
    err = (lambda d: w * np.abs(d)) if mad else (lambda d: w * d * d)
    sum_w, sum_x = w.sum(axis=-1), (w * x).sum(axis=-1)

    scale = np.where(live, span / nmax, 0).astype(np.float32)
    mn = vmin.astype(np.float32)
    levels = np.clip(np.rint((nmax / span)[:, None] * (x - vmin[:, None])), 0, nmax)
    best = err(scale[:, None] * levels + mn[:, None] - x).sum(axis=-1)
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + nmax) / span
        lv = np.clip(np.rint(iscale[:, None] * (x - vmin[:, None])), 0, nmax)
        sum_l, sum_l2, sum_xl = (w * lv).sum(axis=-1), (w * lv * lv).sum(axis=-1), (w * lv * x).sum(axis=-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = live & (det > 0)
        det = np.where(ok, det, 1)
        s = (sum_w * sum_xl - sum_x * sum_l) / det
        m = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = m > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(pos, np.where(sum_l2 > 0, sum_xl / np.where(sum_l2 > 0, sum_l2, 1), 0), s)
        m = np.where(pos, 0, m)
        cur = err(s[:, None] * lv + m[:, None] - x).sum(axis=-1)
        better = ok & (cur < best)
        best = np.where(better, cur, best)
        scale = np.where(better, s, scale)
        mn = np.where(better, m, mn)
        levels = np.where(better[:, None], lv, levels)
    return scale.astype(np.float32), (-mn).astype(np.float32), levels.astype(np.int32)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0xF) | (hi.astype(np.uint8) << 4)


def _bits(q: np.ndarray, bit: int) -> np.ndarray:
    """Bit `bit` of each of 32 values [n, 32] packed little-endian into 4 bytes [n, 4]."""
    return np.packbits(((q >> bit) & 1).astype(np.uint8), axis=-1, bitorder="little")


def _crumbs(q: np.ndarray) -> np.ndarray:
    """2-bit values [n, 128] -> [n, 32] bytes: byte l holds q[l], q[l+32], q[l+64], q[l+96]."""
    q = q.astype(np.uint8) & 3
    return q[:, 0:32] | q[:, 32:64] << 2 | q[:, 64:96] << 4 | q[:, 96:128] << 6


# --- legacy types: blocks of 32 ---------------------------------------------------------------

def _legacy_blocks(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 32)


def _q8_0(x, importance):
    b = _legacy_blocks(x)  # llama.cpp ignores an imatrix for Q8_0: the rounding is already fine
    d = np.abs(b).max(axis=-1, keepdims=True) / 127
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    q = np_roundf(b * inv)  # C's roundf (halves away from zero), as quantize_row_q8_0_ref
    return np.concatenate([_f16(d[:, 0])[0], q.astype(np.int8).view(np.uint8)], axis=-1)


def _symmetric_legacy(x, importance, nmax):
    """Q4_0 (nmax 8) / Q5_0 (nmax 16): levels l + nmax of d * l, d = max / -nmax by reference."""
    b = _legacy_blocks(x)
    if importance is None:
        i_amax = np.abs(b).argmax(axis=-1)[:, None]
        d = np.take_along_axis(b, i_amax, axis=-1) / -nmax
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, 0, 1 / d)
        q = np.clip(np.trunc(b * inv + np.float32(nmax + 0.5)), 0, 2 * nmax - 1).astype(np.uint8)
        d = d[:, 0]
    else:
        d, lv = _symmetric(b, _legacy_blocks(_weights(x, importance, x.shape[1], 1.0)), nmax)
        q = (lv + nmax).astype(np.uint8)
    parts = [_f16(d)[0]]
    if nmax == 16:
        parts.append(_bits(q, 4))
    parts.append(_nibbles(q[:, :16], q[:, 16:]))
    return np.concatenate(parts, axis=-1)


def _affine_legacy(x, importance, nmax):
    """Q4_1 (nmax 15) / Q5_1 (nmax 31): d * l + m, m the block minimum by reference."""
    b = _legacy_blocks(x)
    if importance is None:
        lo, hi = b.min(axis=-1, keepdims=True), b.max(axis=-1, keepdims=True)
        d = (hi - lo) / nmax
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, 0, 1 / d)
        q = np.clip(np.trunc((b - lo) * inv + np.float32(0.5)), 0, nmax).astype(np.uint8)
        d, m = d[:, 0], lo[:, 0]
    else:
        d, mn, lv = _affine(b, _legacy_blocks(_weights(x, importance, x.shape[1], 1.0)), nmax, -0.9, 0.05, 36)
        q, m = lv.astype(np.uint8), -mn
    parts = [_f16(d)[0], _f16(m)[0]]
    if nmax == 31:
        parts.append(_bits(q, 4))
    parts.append(_nibbles(q[:, :16], q[:, 16:]))
    return np.concatenate(parts, axis=-1)


# --- K-quants: super-blocks of 256 ------------------------------------------------------------

def _super(x: np.ndarray, importance: np.ndarray | None, sub: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(super-blocks [n, 256], their sub-blocks [n * 256/sub, sub], importance weights alike or None)."""
    s = x.reshape(-1, QK_K)
    w = _weights(x, importance, QK_K, 2.0)
    return s, s.reshape(-1, sub), None if w is None else w.reshape(-1, sub)


def _unsigned_scales(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-block scales [n, k] >= 0 -> (codes [n, k] in [0, 2^bits - 1], the f16 super scale [n] as stored)."""
    top = (1 << bits) - 1
    vmax = values.max(axis=-1)
    with np.errstate(divide="ignore"):
        inv = np.where(vmax > 0, top / vmax, 0)
    codes = np.clip(np.rint(inv[:, None] * values), 0, top)
    return codes.astype(np.uint8), _f16(np.where(vmax > 0, vmax / top, 0))[1]


def _reround(x: np.ndarray, step: np.ndarray, offset: np.ndarray | None, lo: int, hi: int) -> np.ndarray:
    """Levels of x [n, k, sub] to the stored sub-block steps [n, k] (offset: the minimum added back)."""
    shifted = x if offset is None else x + offset[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        lv = np.where(step[..., None] != 0, np.rint(shifted / step[..., None]), 0)
    return np.clip(lv, lo, hi).astype(np.int32)


def _refit(x: np.ndarray, w: np.ndarray | None, codes: np.ndarray, d: np.ndarray, mcodes: np.ndarray | None,
           dm: np.ndarray | None, lo: int, hi: int, rounds: int = 2):
    """Super-block scales refitted to the levels: with the sub-block codes [n, k] fixed, the f16
    d (and dmin) are re-solved by weighted least squares over x [n, k, sub] and the levels
    re-rounded, kept per super-block where the error drops. llama.cpp's reference stops at the
    rounded scales; this wins back part of what rounding the scales to a few bits lost.
    -> (d, dm, levels [n, k, sub])."""
    w = np.ones_like(x) if w is None else w.reshape(x.shape)
    c = codes.astype(np.float32)[..., None]
    m = None if mcodes is None else mcodes.astype(np.float32)[..., None]

    def levels_err(d, dm):
        step = d[:, None] * codes
        off = None if m is None else dm[:, None] * mcodes
        L = _reround(x, step, off, lo, hi)
        y = step[..., None] * L - (0 if off is None else off[..., None])
        return L, (w * (y - x) ** 2).sum(axis=(1, 2))

    L, best = levels_err(d, dm)
    for _ in range(rounds):
        a = c * L
        with np.errstate(divide="ignore", invalid="ignore"):
            if m is None:
                d_new = (w * a * x).sum(axis=(1, 2)) / (w * a * a).sum(axis=(1, 2))
                dm_new = dm
            else:
                b = np.broadcast_to(m, x.shape)
                saa, sab, sbb = ((w * p * q).sum(axis=(1, 2)) for p, q in ((a, a), (a, b), (b, b)))
                sax, sbx = (w * a * x).sum(axis=(1, 2)), (w * b * x).sum(axis=(1, 2))
                det = saa * sbb - sab * sab
                d_new = (sax * sbb - sab * sbx) / det
                dm_new = _f16(np.nan_to_num((sax * sab - sbx * saa) / det))[1]
        d_new = _f16(np.nan_to_num(d_new))[1]
        L_new, err = levels_err(d_new, dm_new)
        better = err < best
        best = np.where(better, err, best)
        d = np.where(better, d_new, d)
        if m is not None:
            dm = np.where(better, dm_new, dm)
        L = np.where(better[:, None, None], L_new, L)
    return d, dm, L


def _q2_k(x, importance):
    s, sub, w = _super(x, importance, 16)
    n = len(s)
    if w is None:
        scale, mn, _ = _affine(sub, np.abs(sub), 3, -0.5, 0.1, 15, mad=True)
    else:
        scale, mn, _ = _affine(sub, w, 3, -0.9, 0.05, 36)
    sc, d = _unsigned_scales(scale.reshape(n, 16), 4)
    mc, m = _unsigned_scales(mn.reshape(n, 16), 4)
    d, m, L = _refit(s.reshape(n, 16, 16), w, sc, d, mc, m, 0, 3)
    L = L.reshape(n, QK_K)
    qs = np.concatenate([_crumbs(L[:, 0:128]), _crumbs(L[:, 128:256])], axis=-1)
    return np.concatenate([sc | (mc << 4), qs, _f16(d)[0], _f16(m)[0]], axis=-1)


def _signed_scales(scale: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-block scales [n, k] of either sign -> (codes [n, k] in [-top, top-1] with the largest
    |scale| at -top, the f16 super scale [n] as stored)."""
    i_amax = np.abs(scale).argmax(axis=-1)[:, None]
    vmax = np.take_along_axis(scale, i_amax, axis=-1)[:, 0]
    with np.errstate(divide="ignore"):
        inv = np.where(vmax != 0, -top / vmax, 0)
    codes = np.clip(np.rint(inv[:, None] * scale), -top, top - 1)
    return codes, _f16(np.where(inv != 0, 1 / np.where(inv != 0, inv, 1), 0))[1]


def _q3_k(x, importance):
    s, sub, w = _super(x, importance, 16)
    n = len(s)
    scale, _ = _symmetric(sub, sub * sub if w is None else w, 4)
    codes, d = _signed_scales(scale.reshape(n, 16), 32)
    d, _, L = _refit(s.reshape(n, 16, 16), w, codes, d, None, None, -4, 3)
    L = L.reshape(n, QK_K) + 4
    hmask = np.zeros((n, 32), dtype=np.uint8)
    for j in range(8):
        hmask |= ((L[:, 32 * j:32 * j + 32] >> 2) & 1).astype(np.uint8) << j
    qs = np.concatenate([_crumbs(L[:, 0:128]), _crumbs(L[:, 128:256])], axis=-1)
    codes = (codes + 32).astype(np.uint8)
    lo, hi = codes & 0xF, codes >> 4
    packed = np.concatenate([lo[:, 0:8] | (lo[:, 8:16] << 4),
                             hi[:, 0:4] | hi[:, 4:8] << 2 | hi[:, 8:12] << 4 | hi[:, 12:16] << 6], axis=-1)
    return np.concatenate([hmask, qs, packed, _f16(d)[0]], axis=-1)


def _q45_k(x, importance, nmax):
    """Q4_K (nmax 15) / Q5_K (nmax 31): 8 sub-blocks of 32 with 6-bit scales and mins."""
    s, sub, w = _super(x, importance, 32)
    n = len(s)
    if w is None:
        search_w = np.sqrt((sub * sub).mean(axis=-1, keepdims=True)) + np.abs(sub)
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
    else:
        search_w, (rmin, rdelta, nstep) = w, (-0.9, 0.05, 36)
    scale, mn, _ = _affine(sub, search_w, nmax, rmin, rdelta, nstep)
    sc, d = _unsigned_scales(scale.reshape(n, 8), 6)
    mc, m = _unsigned_scales(mn.reshape(n, 8), 6)
    d, m, L = _refit(s.reshape(n, 8, 32), w, sc, d, mc, m, 0, nmax)
    L = L.reshape(n, 4, 2, 32)
    packed = np.concatenate([sc[:, 0:4] | (sc[:, 4:8] >> 4) << 6, mc[:, 0:4] | (mc[:, 4:8] >> 4) << 6,
                             (sc[:, 4:8] & 0xF) | (mc[:, 4:8] & 0xF) << 4], axis=-1)
    qs = _nibbles(L[:, :, 0], L[:, :, 1]).reshape(n, 128)
    parts = [_f16(d)[0], _f16(m)[0], packed]
    if nmax == 31:
        hi = (L >> 4).astype(np.uint8)  # bit 2i from chunk i's first 32 values, 2i+1 from its second
        qh = np.zeros((n, 32), dtype=np.uint8)
        for i in range(4):
            qh |= hi[:, i, 0] << (2 * i) | hi[:, i, 1] << (2 * i + 1)
        parts.append(qh)
    return np.concatenate(parts + [qs], axis=-1)


def _q6_k(x, importance):
    s, sub, w = _super(x, importance, 16)
    n = len(s)
    scale, _ = _symmetric(sub, sub * sub if w is None else w, 32)
    codes, d = _signed_scales(scale.reshape(n, 16), 128)
    d, _, L = _refit(s.reshape(n, 16, 16), w, codes, d, None, None, -32, 31)
    L = (L + 32).reshape(n, QK_K)
    ql, qh = [], []
    for h in (0, 128):
        a, b, c, e = (L[:, h + 32 * k:h + 32 * k + 32] for k in range(4))
        ql += [_nibbles(a, c), _nibbles(b, e)]
        qh.append(_crumbs(L[:, h:h + 128] >> 4))
    return np.concatenate(ql + qh + [codes.astype(np.int8).view(np.uint8), _f16(d)[0]], axis=-1)


_QUANTIZERS = {
    Q.Q4_0: lambda x, imp: _symmetric_legacy(x, imp, 8),
    Q.Q4_1: lambda x, imp: _affine_legacy(x, imp, 15),
    Q.Q5_0: lambda x, imp: _symmetric_legacy(x, imp, 16),
    Q.Q5_1: lambda x, imp: _affine_legacy(x, imp, 31),
    Q.Q8_0: _q8_0,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: lambda x, imp: _q45_k(x, imp, 15),
    Q.Q5_K: lambda x, imp: _q45_k(x, imp, 31),
    Q.Q6_K: _q6_k,
}
QUANTIZABLE = frozenset(_QUANTIZERS)
