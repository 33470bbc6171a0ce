"""Model hyper-parameters from GGUF metadata, and the check of every tensor against them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kernels.quants import SUPPORTED_QTYPES
from workers.model.architecture import ARCHITECTURES, Architecture, dimensions, optional_roles
from workers.model.gguf_file import GGUFError, GGUFFile, shown_value


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_neox: bool
    inv_freq: np.ndarray  # [head_dim / 2], scaling and llama3 frequency factors applied
    tied_embeddings: bool
    qkv_bias: bool
    attn_scale: float  # multiplies q.k
    embed_scale: float  # multiplies the token embeddings
    sliding_window: int  # keys a sliding layer's query sees, itself included (0: no sliding layers)
    sliding_inv_freq: np.ndarray | None  # sliding layers' RoPE frequencies (None: inv_freq)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "ModelConfig":
        path, md, arch = gguf.path, gguf.metadata, gguf.architecture
        if arch not in ARCHITECTURES:
            raise GGUFError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")

        def get(key: str, default=None, kind=int):
            # Every number is checked for its type and range here, where it is read: a header
            # field can hold any GGUF type (a float32 infinity, a string, an array).
            value = md.get(f"{arch}.{key}", default)
            if value is None:
                raise GGUFError(f"{path}: metadata key {arch}.{key} is missing")
            shown = shown_value(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise GGUFError(f"{path}: metadata {arch}.{key} = {shown} is not a single number")
            if kind is int and not isinstance(value, int):
                raise GGUFError(f"{path}: metadata {arch}.{key} = {shown} is not an integer")
            if not math.isfinite(value):
                raise GGUFError(f"{path}: metadata {arch}.{key} = {shown} is not a finite number")
            value = kind(value)
            if value <= 0:
                raise GGUFError(f"{path}: metadata {arch}.{key} = {value} must be positive")
            return value

        if any(name.endswith("_exps.weight") for name in gguf.tensors):
            raise GGUFError(f"{path}: mixture-of-experts models are not supported")
        table = ARCHITECTURES[arch]
        n_layers = get("block_count")
        # Before anything loops over the layers: each one needs its own tensors in this file.
        layer_tensors = sum(not spec.optional for spec in table.layer_tensors)
        if n_layers * layer_tensors > len(gguf.tensors):
            raise GGUFError(f"{path}: metadata {arch}.block_count = {n_layers} is more layers than "
                            f"the file's {len(gguf.tensors)} tensors hold")
        d_model, n_heads = get("embedding_length"), get("attention.head_count")
        head_dim = get("attention.key_length", d_model // n_heads)
        if get("attention.value_length", head_dim) != head_dim:
            raise GGUFError(f"{path}: key and value head sizes differ")
        if get("rope.dimension_count", head_dim) != head_dim:
            raise GGUFError(f"{path}: partial rotary embeddings are not supported")
        n_kv_heads = get("attention.head_count_kv", n_heads)
        if n_heads % n_kv_heads:
            raise GGUFError(f"{path}: {n_heads} heads are not a multiple of {n_kv_heads} KV heads")

        def matches(key: str, value: int, role: str, layer: int | None, axis: int) -> None:
            # The sizes the RoPE table is built from, against the tensors they describe: a
            # header cannot make it allocate more than the file holds.
            name = table.tensor_name(role, layer)
            tensor = gguf.tensors.get(name)
            if tensor is None:
                raise GGUFError(f"{path}: tensor {name!r} is missing")
            if tensor.shape[axis] != value:
                raise GGUFError(f"{path}: metadata {arch}.{key} = {md.get(f'{arch}.{key}')} does not match "
                                f"tensor {name!r} of shape {tensor.shape}")

        matches("embedding_length", d_model, "embed", None, -1)
        head_key = "attention.key_length" if f"{arch}.attention.key_length" in md else "attention.head_count"
        matches(head_key, n_heads * head_dim, "wq", 0, 0)
        embd = gguf.tensors[table.tensor_name("embed")]

        inv_freq = get("rope.freq_base", 10000.0, float) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        scaling = md.get(f"{arch}.rope.scaling.type", "none")
        if not isinstance(scaling, str):
            raise GGUFError(f"{path}: metadata {arch}.rope.scaling.type = {shown_value(scaling)} is not a string")
        if scaling == "linear":
            inv_freq = inv_freq / get("rope.scaling.factor", kind=float)
        elif scaling != "none":
            raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported (none, linear, llama3 factors)")
        if "rope_freqs.weight" in gguf.tensors:  # llama3-style per-frequency factors
            factors = gguf.tensors["rope_freqs.weight"]
            if factors.shape != (head_dim // 2,) or factors.qtype.name != "F32":
                raise GGUFError(f"{path}: tensor 'rope_freqs.weight' must be F32 of shape ({head_dim // 2},)")
            inv_freq = inv_freq / factors.data.view(np.float32).astype(np.float64)

        sliding_window, sliding_inv_freq = 0, None
        # an architecture whose every layer may slide (Mistral) has a window only where the file
        # gives one; one with global layers between sliding ones (Gemma 3) always has
        if table.global_every is not None and (table.global_every or f"{arch}.attention.sliding_window" in md):
            sliding_window = get("attention.sliding_window")
            if table.sliding_rope_base is not None:
                sliding_inv_freq = table.sliding_rope_base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        attn_scale = 1.0 / math.sqrt((d_model / n_heads) if n_layers in table.d_model_scale_layers else head_dim)

        config = cls(
            arch=arch,
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            ffn_dim=get("feed_forward_length"),
            vocab_size=get("vocab_size", embd.shape[0]),
            context_length=get("context_length", 2048),
            rms_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float),
            rope_neox=table.rope_neox,
            inv_freq=inv_freq,
            tied_embeddings=table.tensor_name("output") not in gguf.tensors,
            qkv_bias=table.has("bq") and table.tensor_name("bq", 0) in gguf.tensors,
            attn_scale=attn_scale,
            embed_scale=math.sqrt(d_model) if table.scaled_embeddings else 1.0,
            sliding_window=sliding_window,
            sliding_inv_freq=sliding_inv_freq,
        )
        config.check_tensors(gguf)
        return config

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    def window(self, layer: int) -> int:
        """The attention window of `layer` (0: the whole context)."""
        return self.sliding_window if self.sliding_window and self.architecture.sliding(layer) else 0

    def layer_inv_freq(self, layer: int) -> np.ndarray:
        """The RoPE frequencies `layer` rotates with."""
        if self.sliding_inv_freq is not None and self.window(layer):
            return self.sliding_inv_freq
        return self.inv_freq

    @property
    def dims(self) -> dict[str, int]:
        """The dimensions the architecture table's shapes are written in."""
        return dimensions(self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.ffn_dim, self.vocab_size)

    @property
    def optional_roles(self) -> set[str]:
        """The architecture's optional tensors this model has."""
        return optional_roles(self.qkv_bias, self.tied_embeddings)

    def check_tensors(self, gguf: GGUFFile) -> None:
        for name, shape, _ in self.architecture.tensors(self.dims, self.n_layers, self.optional_roles):
            tensor = gguf.tensors.get(name)
            if tensor is None:
                raise GGUFError(f"{gguf.path}: tensor {name!r} is missing")
            if tensor.shape != shape:
                raise GGUFError(f"{gguf.path}: tensor {name!r} has shape {tensor.shape}, expected {shape}")
            if tensor.qtype not in SUPPORTED_QTYPES:
                raise GGUFError(f"{gguf.path}: tensor {name!r} has unsupported quantization type {tensor.qtype.name}")
