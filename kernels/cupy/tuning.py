"""The backend's benchmark switches, in one place (tools/bench_gpu.py flips them).

Read from the environment at import (they size how weights are laid out, so they hold for
the process): GEMV_MAX_T (NTR_GEMV_MAX_T) and Q8_ROWS (NTR_GEMV_INT8). Per backend, on its
`tuning` object: whether decode steps run as CUDA graphs, and what those graphs launch
(PDL kinds from NTR_PDL, segment branches, zeroing and rounding fused into other kernels);
changing any of the latter drops the captured graphs so the next decode step captures anew.
"""

from __future__ import annotations

import os

from kernels.quants import Q

# Tokens per product: up to GEMV_MAX_T the fp32 GEMV on the quantized blocks (measured: one
# token; its 4-token variant loses to the tensor cores from 2 tokens on); up to QMMA_MAX_T
# (kernels/cupy/products.py) tensor cores on the quantized blocks (batched decode); beyond,
# prefill-sized: dequantize to fp16 scratch and cuBLAS. Decode steps up to QMMA_MAX_T
# sequences run as CUDA graphs.
GEMV_MAX_T = int(os.environ.get("NTR_GEMV_MAX_T", 1))
# Formats whose products of up to 4 tokens run on integer activations with dp4a (quant_gemv_q8.cu
# gemv_q8), with the struct's RQ (rows per warp). NTR_GEMV_INT8=0 keeps them on the fp32 GEMV.
Q8_ROWS = {Q.Q4_K: 2, Q.Q6_K: 2, Q.Q5_0: 4, Q.Q8_0: 4} if os.environ.get("NTR_GEMV_INT8", "1") != "0" else {}
# launch kinds a decode graph may launch programmatically: 1-token GEMVs, their input
# quantizers, attention, the tensor-core products, and (norm) their fp16 RMSNorm/SwiGLU
# inputs and zeroed outputs
PDL_KINDS = ("gemv", "quantize", "attention", "qmma", "norm")


class Tuning:
    """One backend's switches. Setting branch_segments, zero_in_inputs, round_in_products or
    late_refills, or use_pdl, drops the backend's captured decode graphs (they launch differently)."""

    DROPS_GRAPHS = ("branch_segments", "zero_in_inputs", "round_in_products", "late_refills")

    def __init__(self, pdl_supported: bool, drop_graphs, graphs: bool = True):
        self._drop_graphs = drop_graphs
        self.graphs = graphs  # decode steps captured as CUDA graphs and replayed
        # and prompt passes whose shape repeats (steps.py), their pools within this many bytes:
        # what the engine's plan grants (Backend.allow_prompt_graphs); 0: prompts run eagerly
        self.prompt_graph_bytes = 0
        # a stacked weight's later segments on a graph branch beside the first (streams.py)
        self.branch_segments = True
        self.zero_in_inputs = True  # a stream-K product's output zeroed by its input's kernel (misc.cu)
        self.round_in_products = True  # 1-token residual products round their output (products.Product)
        # a streamed model's verifying pass leaves its slot refills to run beside the next draft
        # (kernels/layer_ring.py `late`); off: inside the pass, as every other pass has them
        self.late_refills = True
        # which kernels of the decode graph overlap their predecessor (kernels/launch.py):
        # NTR_PDL lists them (PDL_KINDS), 0 none; all by default. Measured on an H100
        # (docs/benchmarks.md): every kind gains or is neutral on every replica, once the
        # quantizers let the next product launch only after the previous one has finished.
        self.pdl_supported = pdl_supported
        self.use_pdl(os.environ.get("NTR_PDL", ",".join(PDL_KINDS)))

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self.DROPS_GRAPHS:
            self._drop_graphs()

    def use_pdl(self, kinds: str) -> None:
        """Which kernels the decode graphs launch programmatically, as NTR_PDL names them
        (comma-separated kinds, or 0); graphs captured before are dropped."""
        named = set() if kinds == "0" else set(kinds.split(","))
        if named - set(PDL_KINDS):
            raise ValueError(f"NTR_PDL: unknown kinds {sorted(named - set(PDL_KINDS))}; known: {', '.join(PDL_KINDS)}")
        self.pdl_setting = kinds
        self.pdl_kinds = named if self.pdl_supported else set()
        self._drop_graphs()
