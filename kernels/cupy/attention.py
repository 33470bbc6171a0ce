"""Paged attention (kernels/cuda/attention.cu) over the fp16 or RotateKV cache, RoPE fused.

A prefill (or a chunk of a long prompt) stores the step's keys and values (kv_store, or
kv_store_q for a RotateKV cache), then attends on the tensor cores, flash attention, a block
per 64 (query token, head) rows of a sequence and KV head (attn_prefill_D and
attn_prefill_qBITS_D; steps.prefill_row_tiles). A decode step (one
new token per sequence) is split-K flash decoding: each KV head read once per head group, its
keys dealt to splits of whole DECODE_CHUNK-key chunks (decode_splits), the scores and P.V of
the group on the tensor cores; it also
writes its output as the out-projection reads it (values.Attended): rounded into the dp4a
input layout for a 1-token step, in fp16 for the tensor cores at 2-64 sequences. Its scratch
lives in the step's device copies (DeviceStep.decode_scratch), inside a graph's memory pool.
A RotateKV cache (kernels/kv_layout.py) has its rows written by kv_store_q (a decode step's
too, just before the attention kernel, which then reads the new row like the others). Decode
rows that are one sequence's consecutive positions (a verifying pass: DeviceStep.step_from)
read each other's keys and values from the step, not from the cache their blocks fill; a
draft tree's leaf row reads its sequence's rows before its position so (DeviceStep.step_rows).
Head dims 64, 96, 128 and 256 (Gemma 3); where the kernels' shared arrays pass the 48 KiB a
block gets unasked (the prefill's from head_dim 96, and at 64 a RotateKV prefill's at 3 bits
and more; RotateKV decode's at 128; every kernel's at 256) they come as dynamic shared memory
(prefill_mma_smem, decode_smem: attention.cu's PrefillMmaShared and DecodeShared).
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from kernels.cupy.kernel_constants import (DEC_WARPS, DECODE_BLOCKS_PER_SM, DECODE_CHUNK, HEAD_DIMS, MAXG, PF_KEYS,
                                           PF_ROWS, PF_WARPS, QMMA_MAX_T, STATIC_SMEM_MAX, STORE_Q_WARPS, XQ_RUN)
from kernels.cupy.elementwise import Roped
from kernels.cupy.steps import make_step, prefill_row_tiles
from kernels.cupy.streams import ptr, sm_count
from kernels.cupy.tuning import GEMV_MAX_T
from kernels.cupy.values import Attended, rows3
from kernels.kv_layout import RING, KVRows
from kernels.kv_quant import rotation_scale
from kernels.ops import StepInputs

LOG2E = 1.4426950408889634


def _dynamic(nbytes: int) -> int:
    """A struct's bytes rounded up to its 16-byte alignment (sizeof); 0 where its arrays are
    static instead."""
    nbytes = -(-nbytes // 16) * 16
    return nbytes if nbytes > STATIC_SMEM_MAX else 0


def raw_row_max(D: int, bits: int) -> int:
    """attention.cu kv_raw_row_max: the most bytes a RotateKV row takes as stored (codes and a
    (scale, min) pair per 32 values at most); 0 for fp16."""
    return 0 if bits == 16 else D * bits // 8 + D // 8


def prefill_mma_smem(D: int, bits: int = 16) -> int:
    """attn_prefill_mma's dynamic shared memory (PrefillMmaShared<D, BITS>): a RotateKV tile's K
    and V rows as stored, the block's PF_ROWS q rows and two stages of K and V tiles of
    PF_KEYS[D] keys, fp16 rows padded to D + 8."""
    return _dynamic(2 * PF_KEYS[D] * raw_row_max(D, bits) + 2 * (PF_ROWS + 2 * 2 * PF_KEYS[D]) * (D + 8))


def decode_smem(D: int, bits: int = 16) -> int:
    """attn_decode's dynamic shared memory (DecodeShared<D, BITS>): fp32 q rows of MAXG heads and
    their padded fp16 copy, each warp's 16 x MAXG fp16 weights, the new k and v rows, a chunk's
    padded K and V rows (fp16), per key its cache row's offset, a RotateKV chunk's K and V rows
    as stored (codes and a (scale, min) pair per 32 values at most; 16 bytes for fp16), the
    last-split flag."""
    raw = 16 if bits == 16 else 2 * DECODE_CHUNK * raw_row_max(D, bits)
    return _dynamic(4 * MAXG * D + 2 * MAXG * (D + 8) + 2 * DEC_WARPS * 16 * MAXG + 2 * 2 * D
                    + 2 * 2 * DECODE_CHUNK * (D + 8) + 8 * DECODE_CHUNK + raw + 4)


def decode_splits(keys: int, pairs: int, D: int) -> int:
    """How many splits a decode step deals each (sequence, KV head) pair's `keys` (the table
    width's) to, in whole DECODE_CHUNK-key chunks: as many as one wave of the blocks the SMs
    hold at once. Fewer, longer splits than one per chunk: a split's fixed costs (its q, the
    table look-ups, its partial output written and merged) cost as much as a 4-bit chunk's
    bytes; more blocks than one wave leave a second wave's tail."""
    wave = DECODE_BLOCKS_PER_SM[D] * sm_count()
    return max(1, min(-(-keys // DECODE_CHUNK), wave // pairs))


def attention(b, q, k, v, k_cache: KVRows, v_cache: KVRows, step: StepInputs, scale, window=0):
    """Store k and v in the paged cache, then attention of q over each sequence's context
    (Backend.attention), only its last `window` keys where window > 0; RoPE of a Roped q or k
    applied on the way."""
    rope_q = isinstance(q, Roped)
    rope_k = isinstance(k, Roped)
    lazy = q if rope_q else (k if rope_k else None)
    qa = rows3(q.x if rope_q else q)
    ka = rows3(k.x if rope_k else k)
    va = rows3(v)
    T, H, D = qa.shape
    KVH = ka.shape[1]
    G = H // KVH
    if D not in HEAD_DIMS or G > MAXG:
        raise NotImplementedError(f"attention kernels support head_dim {HEAD_DIMS} and <= {MAXG} query heads per KV head")
    batch = step.batch
    # a step's device copies while run_step runs it; called eagerly, the batch uploaded now
    dev = step.dev if step.dev is not None else make_step(None, step.positions, batch)
    if lazy is not None:  # q and k are rotated at the same positions (the model's contract)
        positions, invf, neox = lazy.positions, lazy.inv_freq, lazy.neox
    else:
        positions, invf, neox = dev.positions, cp.zeros(1, cp.float64), False
    layout = k_cache.layout
    kc, vc = k_cache.rows, v_cache.rows
    bs = layout.block_size
    W = dev.tables.shape[1]
    batch.pool_of(k_cache)  # a sliding layer's cache without the sliding pool's tables is refused here
    # a sliding layer's rows are the sliding pool's: its own tables and slots, same width
    tables, slots = (dev.sliding_tables, dev.sliding_slots) if k_cache.sliding else (dev.tables, dev.slots)
    out = cp.empty((T, H * D), cp.float32)
    if T == 0:
        return out
    sq, sk, sv = (np.int32(a.strides[0] // 4) for a in (qa, ka, va))
    B = batch.num_seqs
    quantized = layout.type.quantized
    # a RotateKV cache: kernels named by its bits, q and the output rotated (hs = 1/sqrt(block))
    name = f"q{layout.type.bits}_{D}" if quantized else f"{D}"
    group, hs = np.int32(layout.group if quantized else 0), rotation_scale(D)
    ls = np.float32(scale * LOG2E * (hs if quantized else 1.0))
    # RotateKV: the step's transformed rows in fp16 (what its queries read unquantized), the key
    # scale q is divided by, the ring
    if quantized:
        scratch16 = cp.empty((2, T, KVH, D), cp.float16)
        b.launcher.launch("attention", b.k.get("attention.cu", f"kv_store_{name}"), (T, KVH), (32 * STORE_Q_WARPS,),
                          (ka, sk, va, sv, positions, invf, np.int32(rope_k), np.int32(neox), kc, vc, slots,
                           np.int32(KVH), group, hs, k_cache.center, k_cache.scale, scratch16[0], scratch16[1]))
        rot = (k_cache.scale, scratch16[0], scratch16[1], k_cache.recent, v_cache.recent, dev.recent,
               np.int32(k_cache.recent_window), np.int32(RING))
    else:
        rot = (*[ptr(None)] * 6, np.int32(0), np.int32(0))
    if T == B and int(batch.query_starts[-1]) == B:  # one new token per sequence
        max_splits = decode_splits(W * bs, B * KVH, D)
        scratch = dev.decode_scratch.get((B, KVH, max_splits, D))
        if scratch is None:
            scratch = (cp.empty((B * KVH * max_splits * MAXG * D,), cp.float32),
                       cp.empty((B * KVH * max_splits * MAXG * 2,), cp.float32),
                       cp.zeros((B * KVH,), cp.int32))
            dev.decode_scratch[(B, KVH, max_splits, D)] = scratch
        # the output also as the next product reads it: integers for a GEMV, fp16 for
        # the tensor cores
        gemv, mma = T <= GEMV_MAX_T, GEMV_MAX_T < T <= QMMA_MAX_T
        xq = cp.empty((T, -(-H * D // 2048) * XQ_RUN), cp.int8) if gemv else None
        ds = cp.empty((T, H * D // 32, 2), cp.float32) if gemv else None
        half = cp.empty((T, H * D), cp.float16) if mma else None
        smem = decode_smem(D, layout.type.bits if quantized else 16)
        b.launcher.launch("attention", b.k.get("attention.cu", f"attn_decode_{name}", dynamic_smem=smem),
                          (max_splits, KVH, B), (32 * DEC_WARPS,),
                          (qa, sq, ka, sk, va, sv, positions, invf, np.int32(rope_q), np.int32(rope_k),
                           np.int32(neox), kc, vc, tables, np.int32(W), dev.ctx, dev.step_from, dev.step_rows, slots,
                           np.int32(H), np.int32(KVH), np.int32(bs), ls, np.int32(window),
                           group, hs, *rot, *scratch,
                           np.int32(max_splits), out, ptr(half), ptr(xq), np.int32(xq.shape[1] if gemv else 0),
                           ptr(ds)), shared_mem=smem)
        return Attended(out, xq, ds, half)
    if not quantized:
        b.k.get("attention.cu", f"kv_store_{D}")(
            (T,), (128,), (ka, sk, va, sv, positions, invf, np.int32(rope_k), np.int32(neox), kc, vc,
                           slots, np.int32(KVH)))
    tiles = prefill_row_tiles(dev, batch, G)
    if len(tiles):
        smem = prefill_mma_smem(D, layout.type.bits if quantized else 16)
        b.k.get("attention.cu", f"attn_prefill_{name}", dynamic_smem=smem)(
            (len(tiles), KVH), (32 * PF_WARPS,),
            (qa, sq, positions, invf, np.int32(rope_q), np.int32(neox), kc, vc, tables, np.int32(W), dev.ctx,
             dev.qstarts, tiles, np.int32(H), np.int32(KVH), np.int32(bs), ls, np.int32(window),
             *((group, hs, *rot) if quantized else ()), out), shared_mem=smem)
    if not quantized:
        return out
    # the step's recent rows into the ring, now that its queries have read it
    b.k.get("attention.cu", f"kv_recent_{D}")(
        (T, KVH), (128,), (scratch16[0], scratch16[1], k_cache.recent, v_cache.recent, dev.positions, dev.qstarts,
                           dev.ctx, dev.recent, np.int32(B), np.int32(KVH), np.int32(RING)))
    return out
