"""How the CuPy backend lays a quantized weight out in VRAM, without CuPy: the planes per block
field that kernels/cupy/weights.py fills and kernels/cuda/quant_blocks.cuh reads, and their
sizes (what placement counts, on a machine without the GPU too: `ntr plan`).

GGUF blocks stay quantized, regrouped into 16-byte-aligned planes per block field (PLANES).
"""

from __future__ import annotations

from kernels.kv_layout import KVLayout, layout_for
from kernels.quants import Q, block_shape

# (byte offset, length) of each block field, in the order the kernel structs read them.
PLANES = {
    Q.Q4_0: [(2, 16), (0, 2)],
    Q.Q4_1: [(4, 16), (0, 4)],
    Q.Q5_0: [(6, 16), (2, 4), (0, 2)],
    Q.Q5_1: [(8, 16), (4, 4), (0, 4)],
    Q.Q8_0: [(2, 32), (0, 2)],
    Q.Q2_K: [(16, 64), (0, 16), (80, 4)],
    Q.Q3_K: [(32, 64), (0, 32), (96, 12), (108, 2)],
    Q.Q4_K: [(16, 128), (4, 12), (0, 4)],
    Q.Q5_K: [(48, 128), (16, 32), (4, 12), (0, 4)],
    Q.Q6_K: [(0, 128), (128, 64), (192, 16), (208, 2)],
}
FLOAT_TYPES = {Q.F32: 4, Q.F16: 2, Q.BF16: 2}
UNITS_PER_BLOCK = {Q.Q2_K: 2, Q.Q3_K: 2, Q.Q4_K: 4, Q.Q5_K: 4, Q.Q6_K: 4}  # the structs' UPB; others 1
# Planes whose per-unit piece spans several 16-byte chunks (count given) are interleaved in
# runs of 32 units, chunk-major: a warp reading 32 consecutive units loads whole lines.
INTERLEAVED = {Q.Q8_0: 2, Q.Q2_K: 2, Q.Q3_K: 2, Q.Q4_K: 2, Q.Q5_K: 2, Q.Q6_K: 2, Q.F32: 8, Q.F16: 4, Q.BF16: 4}


def plane_strides(qtype: Q, K: int) -> list[int]:
    """Bytes per row of each plane of a segment of this type: what make_segment allocates (and
    what a streamed layer's image holds)."""
    if qtype in FLOAT_TYPES:
        widths = [-(-K // 32) * 32 * FLOAT_TYPES[qtype]]
    else:
        widths = [K // block_shape(qtype)[0] * n for _, n in PLANES[qtype]]
    strides = []
    for i, w in enumerate(widths):
        if i == 0 and qtype in INTERLEAVED:
            c = INTERLEAVED[qtype]
            strides.append(-(-(w // (16 * c)) // 32) * 32 * c * 16)  # whole runs of 32 units
        else:
            strides.append(-(-w // 16) * 16)
    return strides


def matrix_planes(tensors) -> list[int]:
    """Bytes of each plane of stack(tensors), in order (consecutive parts of one type share a
    segment, so their planes)."""
    planes, i = [], 0
    while i < len(tensors):
        j = i
        while j + 1 < len(tensors) and tensors[j + 1].qtype == tensors[i].qtype:
            j += 1
        rows = sum(t.shape[0] for t in tensors[i:j + 1])
        planes += [rows * s for s in plane_strides(tensors[i].qtype, tensors[i].shape[-1])]
        i = j + 1
    return planes


# fp16 by default; the RotateKV types are read by attention.cu directly
KV_TYPES = ("f16", "q8", "q4", "q3", "q2")


# the device memory the driver reserves for kernels/cuda/quantize.cu's stack while it runs (ptxas:
# up to 5,968 bytes a thread; reserved for every thread the device can hold, 132 SMs x 2048 on an
# H100/H200), outside the pool, given back after (kernels/cupy/requant.py)
REQUANT_LOCAL_BYTES = 6144 * 2048 * 132


class CupySizes:
    """What the CuPy backend's weights and KV cache take, for sizing without a GPU (`ntr plan`);
    CupyBackend answers the same through these functions."""

    name = "cupy"
    requant_local_bytes = REQUANT_LOCAL_BYTES

    @staticmethod
    def matrix_nbytes(*tensors) -> int:
        return sum(matrix_planes(tensors))

    kv_types = KV_TYPES

    @staticmethod
    def kv_layout(n_kv_heads: int, head_dim: int, block_size: int, kv: str | None = None) -> KVLayout:
        return layout_for("cupy", KV_TYPES, n_kv_heads, head_dim, block_size, kv)
