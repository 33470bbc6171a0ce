"""What the backend compiles: each CUDA module's exact source text (no CuPy needed here).

A module is one file of kernels/cuda/ with what it is built on prepended: common.cu for every
one, before it the constants the host reads too (kernel_constants.py), and for the quant
modules (compiled once per format, behind `#define QT <struct>`) quant_blocks.cuh and, for
the two GEMVs, quant_gemv.cuh. No #include: NVRTC then needs no
include path, and the prebuilt cubins (tools/bench_gpu.py --prebuild) are named by the sha1
of this same text (`cubin_name`), which `Kernels` looks for in $NTR_CUBIN_DIR.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from kernels.cupy import kernel_constants as kc
from kernels.quants import Q

CUDA_DIR = Path(__file__).resolve().parents[1] / "cuda"

# quant modules, compiled per format
GEMV = "quant_gemv.cu"  # float GEMV, 1 and 4 tokens (gemv_{1,4}_{mode})
GEMV_Q8 = "quant_gemv_q8.cu"  # dp4a GEMV (gemv_q8_{1,4}), gemv_q8_round, quantize_x_{mode}
DEQUANT = "quant_dequant.cu"  # dequant_rows
MMA = "quant_mma.cu"  # qmma_64, tensor cores at 2-64 tokens
QUANT_MODULES = (GEMV, GEMV_Q8, DEQUANT, MMA)
HEADERS = {
    GEMV: ("quant_blocks.cuh", "quant_gemv.cuh"),
    GEMV_Q8: ("quant_blocks.cuh", "quant_gemv.cuh"),
    DEQUANT: ("quant_blocks.cuh",),
    MMA: ("quant_blocks.cuh",),
}
# modules compiled once
ATTENTION = "attention.cu"
MISC = "misc.cu"  # rmsnorm, glu (swiglu, geglu), zero, rope, argmax_rows, sample_rows
QUANTIZE = "quantize.cu"  # quantize_q{2..6}_k: float32 rows -> K-quant blocks (--requant-streamed)

# each format's struct in quant_blocks.cuh
STRUCTS = {Q.Q4_0: "TQ4_0", Q.Q4_1: "TQ4_1", Q.Q5_0: "TQ5_0", Q.Q5_1: "TQ5_1", Q.Q8_0: "TQ8_0",
           Q.Q2_K: "TQ2_K", Q.Q3_K: "TQ3_K", Q.Q4_K: "TQ4_K", Q.Q5_K: "TQ5_K", Q.Q6_K: "TQ6_K",
           Q.F32: "TF32", Q.F16: "TF16", Q.BF16: "TBF16"}


@functools.cache
def _text(file: str) -> str:
    return (CUDA_DIR / file).read_text()


def quant_prefix(qtype) -> str:
    return f"#define QT {STRUCTS[qtype]}\n"


def module_source(file: str, prefix: str = "") -> str:
    """The text compiled for `file`: prefix, the constants the host defines for it
    (kernel_constants), common.cu, the file's headers, the file."""
    return prefix + _defines(file) + _text("common.cu") + "".join(_text(h) for h in HEADERS.get(file, ())) + _text(file)


def _defines(file: str) -> str:
    own = {GEMV: kc.GEMV_DEFINES, GEMV_Q8: kc.GEMV_DEFINES, MMA: kc.MMA_DEFINES, MISC: kc.MISC_DEFINES,
           QUANTIZE: kc.QUANTIZE_DEFINES}.get(file, {})
    return kc.define_lines({**kc.EVERY_MODULE, **own}) + (kc.attention_defines() if file == ATTENTION else "")


def cubin_name(src: str) -> str:
    return f"{hashlib.sha1(src.encode()).hexdigest()}.cubin"


def all_modules() -> list[tuple[str, str]]:
    """(file, prefix) of every module the backend may compile."""
    return [(f, quant_prefix(q)) for f in QUANT_MODULES for q in STRUCTS] + [(ATTENTION, ""), (MISC, ""), (QUANTIZE, "")]
