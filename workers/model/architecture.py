"""The architecture table: each supported architecture declared once.

An entry names every GGUF tensor the transformer reads, the role it plays there, its shape
in the model's dimensions, and the RoPE style. The transformer loads weights by role, the
config checks a file's tensors against the same entry, and the synthetic model writer
writes them from it: adding an architecture is adding one entry.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str  # GGUF name; a layer's tensors are prefixed "blk.{i}."
    role: str  # what the transformer calls it
    shape: tuple[str, ...]  # dimension names (see Architecture.tensors), GGUF order [rows, cols]
    optional: bool = False  # may be absent: for layer tensors, absent in every layer or in none


@dataclass(frozen=True)
class Architecture:
    name: str
    # llama.cpp's converter permutes llama/mistral Q and K so that adjacent pairs rotate;
    # qwen2 keeps HF's half-split layout (NeoX style)
    rope_neox: bool
    model_tensors: tuple[TensorSpec, ...]
    layer_tensors: tuple[TensorSpec, ...]
    # The FFN's gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
    gate_activation: str = "silu"
    # Token embeddings are multiplied by sqrt(d_model) before the first layer.
    scaled_embeddings: bool = False
    # Sliding-window attention (None: none; the window is the file's
    # `{arch}.attention.sliding_window`): every global_every-th layer (1-based) attends to the
    # whole context, the others to the window only (0: every layer slides). Sliding layers rotate
    # with their own RoPE base when sliding_rope_base is set (no frequency scaling), global
    # layers with the file's.
    global_every: int | None = None
    sliding_rope_base: float | None = None
    # Models whose attention scale is 1/sqrt(d_model / n_heads) instead of 1/sqrt(head_dim),
    # by their layer count.
    d_model_scale_layers: tuple[int, ...] = ()

    def tensors(self, dims: dict[str, int], n_layers: int, present: set[str] | None = None
                ) -> Iterator[tuple[str, tuple[int, ...], int | None]]:
        """(GGUF name, shape, layer or None) of every tensor a model of these dimensions holds,
        in file order. present: the roles of optional tensors the model has (all when None)."""
        # A generator all the way down: n_layers comes from a file and is checked against it lazily.
        layers = itertools.chain([(None, self.model_tensors)], ((i, self.layer_tensors) for i in range(n_layers)))
        for layer, specs in layers:
            for spec in specs:
                if spec.optional and present is not None and spec.role not in present:
                    continue
                name = spec.name if layer is None else f"blk.{layer}.{spec.name}"
                yield name, tuple(dims[d] for d in spec.shape), layer

    def tensor_name(self, role: str, layer: int | None = None) -> str:
        """The GGUF name of the tensor with this role (in this layer)."""
        specs = self.model_tensors if layer is None else self.layer_tensors
        spec = next(s for s in specs if s.role == role)
        return spec.name if layer is None else f"blk.{layer}.{spec.name}"

    def has(self, role: str) -> bool:
        """Whether this architecture's layers hold a tensor with this role."""
        return any(s.role == role for s in self.layer_tensors)

    def sliding(self, layer: int) -> bool:
        """Whether `layer` attends to the sliding window only (llama.cpp's set_swa_pattern)."""
        n = self.global_every
        return n is not None and (n == 0 or layer % n < n - 1)


def dimensions(d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, ffn_dim: int, vocab: int) -> dict[str, int]:
    """The named dimensions the tables' shapes are written in."""
    return {"d_model": d_model, "q_dim": n_heads * head_dim, "kv_dim": n_kv_heads * head_dim,
            "ffn_dim": ffn_dim, "vocab": vocab, "head_dim": head_dim}


_EMBEDDING_AND_HEAD = (
    TensorSpec("token_embd.weight", "embed", ("vocab", "d_model")),
    TensorSpec("output_norm.weight", "output_norm", ("d_model",)),
    TensorSpec("output.weight", "output", ("vocab", "d_model"), optional=True),  # absent: tied to token_embd
)
_DECODER_LAYER = (
    TensorSpec("attn_norm.weight", "attn_norm", ("d_model",)),
    TensorSpec("attn_q.weight", "wq", ("q_dim", "d_model")),
    TensorSpec("attn_k.weight", "wk", ("kv_dim", "d_model")),
    TensorSpec("attn_v.weight", "wv", ("kv_dim", "d_model")),
    TensorSpec("attn_q.bias", "bq", ("q_dim",), optional=True),
    TensorSpec("attn_k.bias", "bk", ("kv_dim",), optional=True),
    TensorSpec("attn_v.bias", "bv", ("kv_dim",), optional=True),
    TensorSpec("attn_output.weight", "wo", ("d_model", "q_dim")),
    TensorSpec("ffn_norm.weight", "ffn_norm", ("d_model",)),
    TensorSpec("ffn_gate.weight", "w_gate", ("ffn_dim", "d_model")),
    TensorSpec("ffn_up.weight", "w_up", ("ffn_dim", "d_model")),
    TensorSpec("ffn_down.weight", "w_down", ("d_model", "ffn_dim")),
)


# Gemma 3: pre- and post-norms around attention and the FFN, and Q/K RMSNorm per head. Its
# norm weights already hold Gemma's `1 + w` (llama.cpp's converter adds the one).
_GEMMA3_LAYER = (
    *_DECODER_LAYER[:4],
    TensorSpec("attn_q_norm.weight", "q_norm", ("head_dim",)),
    TensorSpec("attn_k_norm.weight", "k_norm", ("head_dim",)),
    TensorSpec("attn_output.weight", "wo", ("d_model", "q_dim")),
    TensorSpec("post_attention_norm.weight", "post_attn_norm", ("d_model",)),
    *_DECODER_LAYER[8:],
    TensorSpec("post_ffw_norm.weight", "post_ffn_norm", ("d_model",)),
)


def optional_roles(qkv_bias: bool, tied_embeddings: bool) -> set[str]:
    """The optional tensors a model has: Q/K/V biases, and an output head unless it is tied to
    the embedding."""
    return ({"bq", "bk", "bv"} if qkv_bias else set()) | (set() if tied_embeddings else {"output"})


ARCHITECTURES = {
    arch.name: arch for arch in (
        Architecture("llama", rope_neox=False, model_tensors=_EMBEDDING_AND_HEAD, layer_tensors=_DECODER_LAYER),
        # Mistral 7B v0.1's every layer sees the last `mistral.attention.sliding_window` keys
        # where the file gives that key (later versions dropped the window)
        Architecture("mistral", rope_neox=False, model_tensors=_EMBEDDING_AND_HEAD, layer_tensors=_DECODER_LAYER,
                     global_every=0),
        Architecture("qwen2", rope_neox=True, model_tensors=_EMBEDDING_AND_HEAD, layer_tensors=_DECODER_LAYER),
        # What llama.cpp hard-codes for gemma3 rather than reads from the file (src/llama-model.cpp,
        # load_hparams: LLM_ARCH_GEMMA3; src/models/gemma3.cpp): set_swa_pattern(6) (layers 5,
        # 11, ... are global), rope_freq_base_train_swa = 10000 with scale 1, f_attention_scale
        # 1/sqrt(n_embd / n_head) for the 27B (62 layers) and 1/sqrt(head_dim) otherwise;
        # LLAMA_ROPE_TYPE_NEOX (llama_model_rope_type); the GELU-tanh gate (LLM_FFN_GELU,
        # LLM_FFN_PAR) and the sqrt(n_embd) embedding scale are in its graph.
        Architecture("gemma3", rope_neox=True, model_tensors=_EMBEDDING_AND_HEAD, layer_tensors=_GEMMA3_LAYER,
                     gate_activation="gelu_tanh", scaled_embeddings=True, global_every=6,
                     sliding_rope_base=10000.0, d_model_scale_layers=(62,)),
    )
}
