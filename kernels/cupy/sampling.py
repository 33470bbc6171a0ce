"""Sampling on the device (kernels/cuda/misc.cu): argmax and temperature/top-k/top-p/min-p
draws per row, so that only ids leave the GPU; a grammar's token mask and logit bias applied
to the rows beside them (`constrain`), so that a constrained row's logits never leave it either;
a token's logprob and a row's top logprobs (`token_logprobs`), so that those leave it alone."""

from __future__ import annotations

import cupy as cp
import numpy as np

from kernels.cupy.kernel_constants import SAMPLE_THREADS, TOP_LOGPROBS_MAX
from kernels.cupy.values import rows2


# out = allowed ? x : -inf per element of [B, V], the bit read from the row's bitmask words
_MASKED = cp.ElementwiseKernel(
    "float32 x, raw int32 mask, int32 V, int32 W", "float32 out",
    """
    const int row = i / V, t = i % V;
    out = ((mask[row * W + (t >> 5)] >> (t & 31)) & 1) ? x : -__int_as_float(0x7f800000);
    """,
    "ntr_masked_logits")


def constrain(b, logits, bitmask, bias):
    """A new float32 [B, V] array on the device: logits with bias.values added at (bias.rows,
    bias.ids), then -inf where the uploaded bitmask [B, ceil(V / 32)] has a token's bit clear
    (kernels/ops.py `constrain_logits` is the host twin)."""
    x = rows2(logits)
    B, V = x.shape
    out = x.astype(cp.float32, order="C", copy=True)  # never the forward's own logits; rows contiguous
    if bias is not None and len(bias.rows):
        out[cp.asarray(bias.rows), cp.asarray(bias.ids)] += cp.asarray(bias.values)
    if bitmask is not None:
        mask = cp.asarray(np.ascontiguousarray(bitmask, np.int32))
        out = _MASKED(out, mask, np.int32(V), np.int32(mask.shape[1]))  # a new C-ordered array
    return out


def argmax_dev(b, logits):
    """Row-wise argmax of logits [B, V] as device int32 ids."""
    logits = rows2(logits)
    B, V = logits.shape
    out = cp.empty((B,), cp.int32)
    row_stride = np.int32(logits.strides[0] // 4)
    b.k.get("misc.cu", "argmax_rows")((B,), (SAMPLE_THREADS,), (logits, row_stride, np.int32(V), out))
    return out


def top2_dev(b, logits):
    """[2, B] device int32: each row's argmax, and the argmax of the row without it."""
    logits = rows2(logits)
    B, V = logits.shape
    out = cp.empty((2, B), cp.int32)
    b.k.get("misc.cu", "top2_rows")((B,), (SAMPLE_THREADS,), (logits, np.int32(logits.strides[0] // 4), np.int32(V),
                                                           np.int32(B), out))
    return out


def sample(b, logits, temperature, top_k, top_p, min_p, uniform) -> np.ndarray:
    """One id per row: temperature (0 = argmax), top-k (0 = off), top-p, min-p, and a
    uniform number in [0, 1) per row drawn by the caller's generator."""
    logits = rows2(logits)
    B, V = logits.shape
    params = np.concatenate([np.asarray(temperature, np.float32), np.asarray(top_p, np.float32),
                             np.asarray(min_p, np.float32), np.asarray(uniform, np.float32),
                             np.asarray(top_k, np.int32).view(np.float32)])
    dev = cp.asarray(params)
    t, p, m, u, k = (dev[i * B:(i + 1) * B] for i in range(5))
    out = cp.empty((B,), cp.int32)
    b.k.get("misc.cu", "sample_rows")(
        (B,), (SAMPLE_THREADS,), (logits, np.int32(logits.strides[0] // 4), np.int32(V), t, k.view(cp.int32), p, m, u,
                                  out))
    return cp.asnumpy(out, stream=b.stream)


def token_logprobs(b, logits, tokens, top_n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kernels/ops.py `token_logprobs` beside the logits (misc.cu `token_logprobs_rows`): one
    copy of B * (1 + 2 * top_n) numbers leaves the device (a perplexity pass's logits are
    ~1 GB, a 512-token scored prompt's 300 MB)."""
    x = rows2(logits)
    B, V = x.shape
    tokens = np.asarray(tokens, np.int32)
    if not 0 <= top_n <= min(V, TOP_LOGPROBS_MAX) or tokens.shape != (B,):
        raise ValueError(f"top_n must be in [0, {min(V, TOP_LOGPROBS_MAX)}] and one token a row, "
                         f"got {top_n} and {tokens.shape}")
    out = cp.empty((B, 1 + 2 * top_n), cp.float64)
    if B:
        b.k.get("misc.cu", "token_logprobs_rows")(
            (B,), (SAMPLE_THREADS,), (x, np.int32(x.strides[0] // 4), np.int32(V), cp.asarray(tokens),
                                      np.int32(top_n), out))
    host = cp.asnumpy(out, stream=b.stream)
    return host[:, 0].copy(), host[:, 1 + top_n:].astype(np.int64), host[:, 1:1 + top_n].copy()
