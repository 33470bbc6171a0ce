"""The CUDA kernels' constants that the host reads too (launch shapes, tile and chunk sizes,
shared memory, the RotateKV types' groups and clipping ratios): defined here once and handed
to each module's text as #defines (sources.module_source), so what the host computes from
them and what the kernels are compiled with cannot disagree. No CuPy here: the ahead-of-time
build (sources.py) reads it without a GPU."""

from __future__ import annotations

from kernels.kv_layout import KV_TYPES
from kernels.kv_quant import CLIP_RATIOS
from kernels.quantize import QK_K

# --- every module (common.cu) ---------------------------------------------------------------
XQ_RUN = 4096  # bytes of an integer activation row (the dp4a GEMV's input) per 2048 values

# --- the products (quant_gemv.cuh, quant_mma.cu) ----------------------------------------------
GEMV_WARPS = 4  # warps of a GEMV block
QMMA_BM = 128  # weight rows of a tensor-core product's tile
QMMA_MAX_T = 64  # tokens the tensor-core product takes: its tile's width
QMMA_BK = 128  # values of K per step of the tensor-core product
QMMA_BLOCKS_PER_SM = 2  # its blocks an SM holds (96 KB of shared memory each)

# --- sampling (misc.cu), requantization (quantize.cu) ------------------------------------------
SAMPLE_THREADS = 1024  # threads of a sampling or argmax block, one block a row
TOP_LOGPROBS_MAX = 20  # top logprobs a row token_logprobs_rows finds (OpenAI's most)
QUANTIZE_THREADS = 64  # threads of a requantizing block, one thread a super-block

# --- attention (attention.cu) -----------------------------------------------------------------
HEAD_DIMS = (64, 96, 128, 256)  # the head sizes attention.cu instantiates its kernels for
MAXG = 8  # query heads per KV head the attention kernels hold
DEC_WARPS = 8  # warps of a decode block: a warp per 16-key tile of the chunk and half of the dims
DECODE_CHUNK = 64  # keys a decode block stages in shared memory at once
# warps of a RotateKV store block: a warp per (row, group, clipping ratio), so a 4- or 3-bit
# row's search runs in one round
STORE_Q_WARPS = 10
PF_WARPS = 4  # warps of a prefill block, 16 query rows each
PF_ROWS = 16 * PF_WARPS  # query rows (token, head) of a prefill block
STATIC_SMEM_MAX = 48 * 1024  # shared arrays past it are dynamic (the most a block gets unasked)
# decode blocks an SM holds: at head_dim <= 128 registers capped to 80 for 3 (the shared arrays
# would allow 5, but 48 or 64 registers spill the staging's loads in flight and the chunk loop's
# softmax state, measured slower); at 256 no cap (1)
DECODE_BLOCKS_PER_SM = {64: 3, 96: 3, 128: 3, 256: 1}
# keys of a prefill block's K and V tiles: head dim 256 takes 32, its 16 x 256 fp32
# accumulator being 128 registers a lane
PF_KEYS = {64: 64, 96: 64, 128: 64, 256: 32}


def _by(arg: str, table: dict) -> str:
    """A macro body choosing table[arg] (a constant expression in C)."""
    return "".join(f"({arg}) == {k} ? {v} : " for k, v in table.items()) + "0"


# the #defines of each module besides every module's (sources.module_source)
EVERY_MODULE = {"XQ_RUN": XQ_RUN}
GEMV_DEFINES = {"GEMV_WARPS": GEMV_WARPS}
MMA_DEFINES = {"MMA_BM": QMMA_BM, "MMA_BN": QMMA_MAX_T, "MMA_BK": QMMA_BK, "MMA_BLOCKS_PER_SM": QMMA_BLOCKS_PER_SM}
MISC_DEFINES = {"SAMPLE_THREADS": SAMPLE_THREADS, "TOP_LOGPROBS_MAX": TOP_LOGPROBS_MAX}
QUANTIZE_DEFINES = {"QK": QK_K, "QUANTIZE_THREADS": QUANTIZE_THREADS}


def attention_defines() -> str:
    """The #defines attention.cu is compiled behind."""
    scalars = {"MAXG": MAXG, "DEC_WARPS": DEC_WARPS, "DECODE_CHUNK": DECODE_CHUNK,
               "STORE_Q_WARPS": STORE_Q_WARPS, "PF_WARPS": PF_WARPS, "PF_ROWS": PF_ROWS,
               "STATIC_SMEM_MAX": STATIC_SMEM_MAX, "N_CLIP": len(CLIP_RATIOS)}
    groups = {t.bits: t.group for t in KV_TYPES.values() if t.quantized}
    return define_lines(scalars) + "".join(line + "\n" for line in (
        f"#define EACH_HEAD_DIM(X) {' '.join(f'X({d})' for d in HEAD_DIMS)}",
        f"#define DEC_BLOCKS(D) ({_by('D', DECODE_BLOCKS_PER_SM)})",
        f"#define PF_KEYS(D) ({_by('D', PF_KEYS)})",
        f"#define KV_TYPE_GROUP(BITS) ({_by('BITS', groups)})",
        # the ratios r and 2r, each rounded once to float32 (as kernels/kv_quant.py rounds them)
        f"#define CLIP_RATIOS {', '.join(f'{r!r}f' for r in CLIP_RATIOS)}",
        f"#define CLIP2_RATIOS {', '.join(f'{2 * r!r}f' for r in CLIP_RATIOS)}"))


def define_lines(values: dict) -> str:
    return "".join(f"#define {k} {v}\n" for k, v in values.items())
