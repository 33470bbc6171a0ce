"""The attention kernels' constants that the host reads too (launch shapes, shared-memory
sizes, the RotateKV types' groups and clipping ratios): defined here once, and handed to
kernels/cuda/attention.cu as #defines prepended to its text (sources.module_source), so the
two sides cannot disagree. No CuPy here: the ahead-of-time build reads it without a GPU."""

from __future__ import annotations

from kernels.kv_layout import KV_TYPES
from kernels.kv_quant import CLIP_RATIOS

MAXG = 8  # query heads per KV head the attention kernels hold
ATT_WARPS = 4  # query tokens of a RotateKV prefill block, a warp each
DEC_WARPS = 8  # warps of a decode block: a warp per 16-key tile of the chunk and half of the dims
DECODE_CHUNK = 64  # keys a decode block stages in shared memory at once
# warps of a RotateKV store block: a warp per (row, group, clipping ratio), so a 4- or 3-bit
# row's search runs in one round
STORE_Q_WARPS = 10
PF_WARPS = 4  # warps of an fp16 prefill block, 16 query rows each
PF_ROWS = 16 * PF_WARPS  # query rows (token, head) of an fp16 prefill block
STATIC_SMEM_MAX = 48 * 1024  # shared arrays past it are dynamic (the most a block gets unasked)
# decode blocks an SM holds: at head_dim <= 128 registers capped to 80 for 3 (the shared arrays
# would allow 5, but 48 or 64 registers spill the staging's loads in flight and the chunk loop's
# softmax state, measured slower); at 256 no cap (1)
DECODE_BLOCKS_PER_SM = {64: 3, 96: 3, 128: 3, 256: 1}
# keys of an fp16 prefill block's K and V tiles: head dim 256 takes 32, its 16 x 256 fp32
# accumulator being 128 registers a lane
PF_KEYS = {64: 64, 96: 64, 128: 64, 256: 32}


def _by(arg: str, table: dict) -> str:
    """A macro body choosing table[arg] (a constant expression in C)."""
    return "".join(f"({arg}) == {k} ? {v} : " for k, v in table.items()) + "0"


def defines() -> str:
    """The #defines attention.cu is compiled behind."""
    scalars = {"MAXG": MAXG, "ATT_WARPS": ATT_WARPS, "DEC_WARPS": DEC_WARPS, "DECODE_CHUNK": DECODE_CHUNK,
               "STORE_Q_WARPS": STORE_Q_WARPS, "PF_WARPS": PF_WARPS, "PF_ROWS": PF_ROWS,
               "STATIC_SMEM_MAX": STATIC_SMEM_MAX, "N_CLIP": len(CLIP_RATIOS)}
    groups = {t.bits: t.group for t in KV_TYPES.values() if t.quantized}
    lines = [f"#define {k} {v}" for k, v in scalars.items()]
    lines += [f"#define DEC_BLOCKS(D) ({_by('D', DECODE_BLOCKS_PER_SM)})",
              f"#define PF_KEYS(D) ({_by('D', PF_KEYS)})",
              f"#define KV_TYPE_GROUP(BITS) ({_by('BITS', groups)})",
              # the ratios r and 2r, each rounded once to float32 (as kernels/kv_quant.py rounds them)
              f"#define CLIP_RATIOS {', '.join(f'{r!r}f' for r in CLIP_RATIOS)}",
              f"#define CLIP2_RATIOS {', '.join(f'{2 * r!r}f' for r in CLIP_RATIOS)}"]
    return "\n".join(lines) + "\n"
