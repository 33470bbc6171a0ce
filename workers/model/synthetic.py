"""Synthetic GGUF models: a real architecture's shapes and quant mix, random weights.

Used by the tests (tiny models of every quant type) and by the GPU benchmark (full-size
replicas of real models, so this project and llama.cpp time the same bytes without a
multi-GB download). Types gguf-py can quantize get real quantized Gaussians; K-quants,
which it cannot, get random blocks whose super-block scales are set so the weights come
out zero-mean with the requested standard deviation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from kernels.quants import block_shape, dequantize
from workers.model.architecture import ARCHITECTURES, dimensions, optional_roles
from workers.model.gguf_file import GGUFFile

Q = GGMLQuantizationType
# Byte offsets of a K-quant block's f16 scale `d` and min-scale `dmin` (None: signed, no min).
_K_SCALE_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108, None), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208, None)}
# llama.cpp falls back to these when a row length is not a multiple of the 256-value super-block.
_K_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_1, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def llama_vocab_dir() -> Path | None:
    """llama.cpp's vocab-only GGUF files (the tokenizers synthetic models borrow): $NTR_VOCAB_DIR,
    else ../shared/llama-vocab beside the repo; None when neither exists."""
    repo = Path(__file__).resolve().parents[2]
    for d in (os.environ.get("NTR_VOCAB_DIR"), repo.parent / "shared" / "llama-vocab"):
        if d and Path(d).is_dir():
            return Path(d)
    return None


@dataclass(frozen=True)
class Shape:
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    rope_base: float = 10000.0
    context_length: int = 4096
    tied_embeddings: bool = False
    head_dim: int | None = None  # None: d_model / n_heads
    sliding_window: int = 0  # written for architectures with sliding layers (Mistral's: where not 0)


# Real models' hyper-parameters (vocabulary size comes from the tokenizer file).
SHAPES = {
    "qwen2.5-0.5b": Shape("qwen2", 24, 896, 14, 2, 4864, 1_000_000.0, 32768),
    "llama3-8b": Shape("llama", 32, 4096, 32, 8, 14336, 500_000.0, 8192),
    "llama3-70b": Shape("llama", 80, 8192, 64, 8, 28672, 500_000.0, 8192),
    # Gemma 3 (HF config.json of google/gemma-3-270m and gemma-3-12b-it; the 12B's linear RoPE
    # scaling of its global layers is left out: it changes no shape or cost)
    "gemma3-270m": Shape("gemma3", 18, 640, 4, 1, 2048, 1_000_000.0, 32768, tied_embeddings=True,
                         head_dim=256, sliding_window=512),
    "gemma3-12b": Shape("gemma3", 48, 3840, 16, 8, 15360, 1_000_000.0, 131072, tied_embeddings=True,
                        head_dim=256, sliding_window=1024),
}


def random_blocks(rng: np.random.Generator, shape: tuple[int, int], qtype: GGMLQuantizationType, std: float) -> np.ndarray:
    """Raw bytes [rows, row_bytes] of a `qtype` tensor with roughly N(0, std) values."""
    rows, cols = shape
    if qtype not in _K_SCALE_FIELDS:
        return quantize((rng.standard_normal(shape, dtype=np.float32) * std), qtype)
    block, size = block_shape(qtype)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d_at, dmin_at = _K_SCALE_FIELDS[qtype]

    def set_scales(d: float, dmin: float) -> np.ndarray:
        raw[..., d_at:d_at + 2] = np.float16(d).reshape(1).view(np.uint8)
        if dmin_at is not None:
            raw[..., dmin_at:dmin_at + 2] = np.float16(dmin).reshape(1).view(np.uint8)
        return dequantize(raw.reshape(rows, -1), qtype)

    scaled = set_scales(1.0, 0.0)
    mean_scaled, spread = float(scaled.mean()), float(scaled.std())
    if dmin_at is not None:  # pick dmin so the block minimums cancel the scales' mean
        mean_min = -float(set_scales(0.0, 1.0).mean())
        dmin = mean_scaled / mean_min
        spread = float(set_scales(1.0, dmin).std())
    else:
        dmin = 0.0
    d = std / spread
    set_scales(d, d * dmin)
    return raw.reshape(rows, -1)


def q4_k_m_mix(name: str, layer: int | None, n_layers: int) -> GGMLQuantizationType:
    """llama.cpp's Q4_K_M choice for a tensor (before the row-length fallback)."""
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return Q.F32
    if name == "output.weight":
        return Q.Q6_K
    if name.endswith(("attn_v.weight", "ffn_down.weight")) and layer is not None:
        # use_more_bits: the first and last eighth of the layers, and every third between.
        more = layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2
        return Q.Q6_K if more else Q.Q4_K
    return Q.Q4_K


def uniform_mix(qtype: GGMLQuantizationType):
    """Every matrix in `qtype` (norms and biases stay F32)."""
    def mix(name: str, layer: int | None, n_layers: int) -> GGMLQuantizationType:
        return Q.F32 if name.endswith(("norm.weight", ".bias")) else qtype
    return mix


def write_model(path: str | Path, shape: Shape, tokenizer_gguf: str | Path, mix=q4_k_m_mix, seed: int = 0,
                std: float = 0.02) -> Path:
    """Write a random model with `shape`, the tokenizer (and vocab size) of `tokenizer_gguf`."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    vocab_md = GGUFFile(tokenizer_gguf).metadata
    n_vocab = len(vocab_md["tokenizer.ggml.tokens"])
    s, arch = shape, shape.arch
    head_dim = s.head_dim or s.d_model // s.n_heads
    table = ARCHITECTURES[arch]
    w = GGUFWriter(str(path), arch)
    w.add_name(f"synthetic {arch}")
    w.add_block_count(s.n_layers)
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.d_model)
    w.add_feed_forward_length(s.ffn_dim)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    if s.head_dim:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if table.global_every or s.sliding_window:  # Gemma 3 needs it; Mistral has one where given
        w.add_sliding_window(s.sliding_window)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(1e-6)
    for key, value in vocab_md.items():
        if key.startswith("tokenizer."):
            add_field(w, key, value)

    def tensor(name: str, dims: tuple[int, ...], layer: int | None = None):
        # a tied embedding is also the output head: llama.cpp quantizes it as one
        as_name = "output.weight" if s.tied_embeddings and name == "token_embd.weight" else name
        qtype = mix(as_name, layer, s.n_layers)
        if len(dims) == 1:
            data = (1.0 + 0.1 * rng.standard_normal(dims)).astype(np.float32) if name.endswith("norm.weight") \
                else (0.05 * rng.standard_normal(dims)).astype(np.float32)
            w.add_tensor(name, data)
            return
        if qtype in _K_FALLBACK and dims[1] % 256:
            qtype = _K_FALLBACK[qtype]
        if qtype == Q.F32:
            w.add_tensor(name, (rng.standard_normal(dims, dtype=np.float32) * std))
        else:
            w.add_tensor(name, random_blocks(rng, dims, qtype, std), raw_dtype=qtype)

    dims = dimensions(s.d_model, s.n_heads, s.n_kv_heads, head_dim, s.ffn_dim, n_vocab)
    present = optional_roles(qkv_bias=arch == "qwen2", tied_embeddings=s.tied_embeddings)
    for name, shape, layer in table.tensors(dims, s.n_layers, present):
        tensor(name, shape, layer)
    return finish(w, path)


def write_vocab_only(source: str | Path, path: str | Path) -> Path:
    """A vocab-only GGUF (the architecture and tokenizer.* metadata, no tensors) from a model
    file, as llama.cpp's ggml-vocab-*.gguf are: Gemma 3's tokenizer for its synthetic replicas,
    taken from the 270M file."""
    path, md = Path(path), GGUFFile(source).metadata
    w = GGUFWriter(str(path), md["general.architecture"])
    for key, value in md.items():
        if key.startswith("tokenizer."):
            add_field(w, key, value)
    return finish(w, path)


def finish(w: GGUFWriter, path: Path) -> Path:
    """Write what the writer holds (header, metadata, tensors) and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_field(w: GGUFWriter, key: str, value) -> None:
    """Write a metadata value as GGUFFile read it (plain Python types)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, list):
        w.add_array(key, value)


def rewrite_model(path: str | Path, metadata: dict, tensors: dict) -> Path:
    """Write a GGUF from GGUFFile-style metadata and tensors (a TensorInfo, or (raw bytes, qtype)):
    how the tests make a model with one field or tensor changed."""
    path = Path(path)
    w = GGUFWriter(str(path), metadata.get("general.architecture", "llama"))
    for key, value in metadata.items():
        if key != "general.architecture":
            add_field(w, key, value)
    for name, t in tensors.items():
        raw, qtype = t if isinstance(t, tuple) else (t.data, t.qtype)
        if qtype == GGMLQuantizationType.F32:
            w.add_tensor(name, np.array(raw).view(np.float32))
        else:
            w.add_tensor(name, np.array(raw), raw_dtype=qtype)
    return finish(w, path)
