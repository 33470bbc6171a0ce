"""The decoder-only transformer (llama / mistral / qwen2), written once against `kernels.ops`.

`forward` takes a flat batch of new tokens from any number of sequences (prefill, decode
or both) and returns logits only for the rows asked for, so a prefill pays for the
vocabulary projection once per sequence instead of once per prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.ops import Array, AttentionBatch, Backend, Weight
from workers.model.gguf_file import GGUFFile
from workers.model.config import ModelConfig


@dataclass
class Layer:
    attn_norm: Array
    wqkv: Weight  # Q, K, V stacked: one product per layer instead of three
    bqkv: Array | None
    wo: Weight
    ffn_norm: Array
    w_gate_up: Weight  # gate and up stacked
    w_down: Weight


class Transformer:
    def __init__(self, gguf: GGUFFile, config: ModelConfig, ops: Backend):
        self.config, self.ops = config, ops
        t = gguf.tensors
        self.embed = ops.load_embedding(t["token_embd.weight"])
        self.output_norm = ops.load_vector(t["output_norm.weight"])
        self.output = ops.load_matrix(t["token_embd.weight" if config.tied_embeddings else "output.weight"])
        self.layers = []
        for i in range(config.n_layers):
            p = f"blk.{i}."
            self.layers.append(Layer(
                attn_norm=ops.load_vector(t[p + "attn_norm.weight"]),
                wqkv=ops.load_matrix(t[p + "attn_q.weight"], t[p + "attn_k.weight"], t[p + "attn_v.weight"]),
                bqkv=ops.load_vector(t[p + "attn_q.bias"], t[p + "attn_k.bias"], t[p + "attn_v.bias"])
                if config.qkv_bias else None,
                wo=ops.load_matrix(t[p + "attn_output.weight"]),
                ffn_norm=ops.load_vector(t[p + "ffn_norm.weight"]),
                w_gate_up=ops.load_matrix(t[p + "ffn_gate.weight"], t[p + "ffn_up.weight"]),
                w_down=ops.load_matrix(t[p + "ffn_down.weight"]),
            ))

    def forward(
        self, tokens: np.ndarray, positions: np.ndarray, batch: AttentionBatch,
        kv_caches: list[tuple[Array, Array]], logit_rows: np.ndarray | None = None,
    ) -> Array:
        """tokens, positions: [T]. Returns logits [len(logit_rows), vocab] (all rows if None)."""
        ops, c = self.ops, self.config
        n = len(tokens)
        scale = 1.0 / float(np.sqrt(c.head_dim))
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        x = ops.embedding(self.embed, tokens)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h = ops.rmsnorm(x, layer.attn_norm, c.rms_eps)
            qkv = ops.matmul_add(h, layer.wqkv, layer.bqkv) if c.qkv_bias else ops.matmul(h, layer.wqkv)
            q, k, v = qkv[:, :q_dim], qkv[:, q_dim:q_dim + kv_dim], qkv[:, q_dim + kv_dim:]
            q = ops.rope(q.reshape(n, c.n_heads, c.head_dim), positions, c.inv_freq, c.rope_neox)
            k = ops.rope(k.reshape(n, c.n_kv_heads, c.head_dim), positions, c.inv_freq, c.rope_neox)
            v = v.reshape(n, c.n_kv_heads, c.head_dim)
            attn = ops.attention(q, k, v, k_cache, v_cache, batch, scale)
            x = ops.matmul_add(attn, layer.wo, x)
            h = ops.rmsnorm(x, layer.ffn_norm, c.rms_eps)
            x = ops.matmul_add(ops.swiglu(ops.matmul(h, layer.w_gate_up)), layer.w_down, x)
        if logit_rows is not None:
            x = x[logit_rows]
        return ops.matmul(ops.rmsnorm(x, self.output_norm, c.rms_eps), self.output)
