"""The decoder-only transformer (llama / mistral / qwen2), written once against `kernels.ops`.

Weights are found by their role in the architecture table (`workers/model/architecture.py`).
`forward` takes a flat batch of new tokens from any number of sequences (prefill, decode or
both) and returns logits only for the rows asked for, so a prefill pays for the
vocabulary projection once per sequence instead of once per prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.ops import Array, Backend, StepInputs, Weight
from workers.model.config import ModelConfig
from workers.model.gguf_file import GGUFFile


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
        table, t = config.architecture, gguf.tensors
        self.embed = ops.load_embedding(t[table.tensor_name("embed")])
        self.output_norm = ops.load_vector(t[table.tensor_name("output_norm")])
        self.output = ops.load_matrix(t[table.tensor_name("embed" if config.tied_embeddings else "output")])
        self.layers = []
        for i in range(config.n_layers):
            w = {spec.role: t.get(table.tensor_name(spec.role, i)) for spec in table.layer_tensors}
            self.layers.append(Layer(
                attn_norm=ops.load_vector(w["attn_norm"]),
                wqkv=ops.load_matrix(w["wq"], w["wk"], w["wv"]),
                bqkv=ops.load_vector(w["bq"], w["bk"], w["bv"]) if config.qkv_bias else None,
                wo=ops.load_matrix(w["wo"]),
                ffn_norm=ops.load_vector(w["ffn_norm"]),
                w_gate_up=ops.load_matrix(w["w_gate"], w["w_up"]),
                w_down=ops.load_matrix(w["w_down"]),
            ))

    def forward(self, step: StepInputs, kv_caches: list[tuple[Array, Array]]) -> Array:
        """Logits [rows, vocab] for step.logit_rows of the flat batch (every row if None)."""
        ops, c = self.ops, self.config
        n = len(step.tokens)
        scale = 1.0 / float(np.sqrt(c.head_dim))
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        x = ops.embedding(self.embed, step)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h = ops.rmsnorm(x, layer.attn_norm, c.rms_eps)
            qkv = ops.matmul_add(h, layer.wqkv, layer.bqkv) if c.qkv_bias else ops.matmul(h, layer.wqkv)
            q, k, v = qkv[:, :q_dim], qkv[:, q_dim:q_dim + kv_dim], qkv[:, q_dim + kv_dim:]
            q = ops.rope(q.reshape(n, c.n_heads, c.head_dim), step, c.inv_freq, c.rope_neox)
            k = ops.rope(k.reshape(n, c.n_kv_heads, c.head_dim), step, c.inv_freq, c.rope_neox)
            v = v.reshape(n, c.n_kv_heads, c.head_dim)
            attn = ops.attention(q, k, v, k_cache, v_cache, step, scale)
            x = ops.matmul_add(attn, layer.wo, x)
            h = ops.rmsnorm(x, layer.ffn_norm, c.rms_eps)
            x = ops.matmul_add(ops.swiglu(ops.matmul(h, layer.w_gate_up)), layer.w_down, x)
        x = ops.logit_input(x, step)
        return ops.matmul(ops.rmsnorm(x, self.output_norm, c.rms_eps), self.output)
