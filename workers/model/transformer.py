"""The decoder-only transformer (llama / mistral / qwen2 / gemma3), written once against `kernels.ops`.

Weights are found by their role in the architecture table (`workers/model/architecture.py`).
`forward` takes a flat batch of new tokens from any number of sequences (prefill, decode or
both) and returns logits only for the rows asked for, so a prefill pays for the
vocabulary projection once per sequence instead of once per prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    # Gemma 3's extra norms (None where the architecture has none): RMSNorm of each Q and K
    # head, and of the attention and FFN outputs before they join the residual.
    q_norm: Array | None = None
    k_norm: Array | None = None
    post_attn_norm: Array | None = None
    post_ffn_norm: Array | None = None


def layer_matrices(gguf: GGUFFile, config: ModelConfig, i: int) -> list[list]:
    """Layer i's matrices as load_matrix gets them, in the order the model loads them (what a
    streaming backend lays out in the layer's image)."""
    table, t = config.architecture, gguf.tensors
    w = lambda role: t[table.tensor_name(role, i)]  # noqa: E731
    return [[w("wq"), w("wk"), w("wv")], [w("wo")], [w("w_gate"), w("w_up")], [w("w_down")]]


class Transformer:
    def __init__(self, gguf: GGUFFile, config: ModelConfig, ops: Backend, held: range | None = None,
                 embed_on_host: bool = False):
        """held: the layers this instance loads (a pipeline stage's, workers/engine/pipeline.py;
        every layer if None). The one holding layer 0 also loads the embedding (into host memory
        the device reads if embed_on_host: the placement's choice), the one holding the last
        layer the output norm and head."""
        self.config, self.ops = config, ops
        self.held = range(config.n_layers) if held is None else held
        table, t = config.architecture, gguf.tensors
        self.embed = ops.load_embedding(t[table.tensor_name("embed")], embed_on_host) if self.embeds else None
        if self.heads:
            self.output_norm = ops.load_vector(t[table.tensor_name("output_norm")])
            self.output = ops.load_matrix(t[table.tensor_name("embed" if config.tied_embeddings else "output")])
        else:
            self.output_norm = self.output = None
        self.layers = {i: ops.load_layer(i, lambda i=i: self._load_layer(gguf, i)) for i in self.held}

    @property
    def embeds(self) -> bool:
        return 0 in self.held

    @property
    def heads(self) -> bool:
        return self.config.n_layers - 1 in self.held

    def _load_layer(self, gguf: GGUFFile, i: int) -> Layer:
        table, t, ops = self.config.architecture, gguf.tensors, self.ops
        vector = lambda *roles: ops.load_vector(*(t[table.tensor_name(r, i)] for r in roles))  # noqa: E731
        extra = lambda role: vector(role) if table.has(role) else None  # noqa: E731
        wqkv, wo, w_gate_up, w_down = (ops.load_matrix(*m) for m in layer_matrices(gguf, self.config, i))
        return Layer(attn_norm=vector("attn_norm"), wqkv=wqkv,
                     bqkv=vector("bq", "bk", "bv") if self.config.qkv_bias else None, wo=wo,
                     ffn_norm=vector("ffn_norm"), w_gate_up=w_gate_up, w_down=w_down,
                     q_norm=extra("q_norm"), k_norm=extra("k_norm"),
                     post_attn_norm=extra("post_attn_norm"), post_ffn_norm=extra("post_ffn_norm"))

    def forward(self, step: StepInputs, kv_caches, layers: tuple[int, ...] | None = None, head: bool = True) -> Array:
        """Logits [rows, vocab] for step.logit_rows of the flat batch (every row if None); with
        `layers` (ascending indices), of those layers only, the others passed over by the
        residual stream (a draft: the first d layers, or a calibrated subset). Only the layers
        run write KV; a streamed model's pass copies only their bytes (the backend is told
        which: Engine._forward), so a draft is cheap under streaming when it runs resident
        layers only. kv_caches: each layer's (K, V) by its index (a list or a dict). head=False:
        those rows of the residual stream leaving the last layer instead [rows, d], for `head`
        to take a few rows at a time (many rows' logits would not fit the memory planned)."""
        x = self.run_layers(self.embedding(step), step, kv_caches, self.held if layers is None else layers)
        return self.logits(x, step) if head else self.ops.logit_input(x, step)

    def embedding(self, step: StepInputs) -> Array:
        """The residual stream entering layer 0: [T, d]."""
        x = self.ops.embedding(self.embed, step)
        return x if self.config.embed_scale == 1.0 else self.ops.scale(x, self.config.embed_scale)

    def logits(self, x: Array, step: StepInputs) -> Array:
        """Logits of the rows step.logit_rows of the residual stream leaving the last layer."""
        return self.head(self.ops.logit_input(x, step))

    def head(self, rows: Array) -> Array:
        """Logits of rows of the residual stream leaving the last layer: the final norm, then the output head."""
        ops = self.ops
        return ops.matmul(ops.rmsnorm(rows, self.output_norm, self.config.rms_eps), self.output)

    def run_layers(self, x: Array, step: StepInputs, kv_caches, layers) -> Array:
        """The residual stream x [T, d] through `layers` (ascending, held here)."""
        ops, c = self.ops, self.config
        n = len(step.tokens)
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        gate = ops.geglu if c.architecture.gate_activation == "gelu_tanh" else ops.swiglu
        for i in layers:
            layer, (k_cache, v_cache) = self.layers[i], kv_caches[i]
            ops.begin_layer(i)
            h = ops.rmsnorm(x, layer.attn_norm, c.rms_eps)
            qkv = ops.matmul_add(h, layer.wqkv, layer.bqkv) if c.qkv_bias else ops.matmul(h, layer.wqkv)
            q, k, v = qkv[:, :q_dim], qkv[:, q_dim:q_dim + kv_dim], qkv[:, q_dim + kv_dim:]
            if layer.q_norm is not None:  # per head: rows of head_dim
                q = ops.rmsnorm(q.reshape(n * c.n_heads, c.head_dim), layer.q_norm, c.rms_eps)
                k = ops.rmsnorm(k.reshape(n * c.n_kv_heads, c.head_dim), layer.k_norm, c.rms_eps)
            inv_freq = c.layer_inv_freq(i)
            q = ops.rope(q.reshape(n, c.n_heads, c.head_dim), step, inv_freq, c.rope_neox)
            k = ops.rope(k.reshape(n, c.n_kv_heads, c.head_dim), step, inv_freq, c.rope_neox)
            v = v.reshape(n, c.n_kv_heads, c.head_dim)
            attn = ops.attention(q, k, v, k_cache, v_cache, step, c.attn_scale, c.window(i))
            if layer.post_attn_norm is None:
                x = ops.matmul_add(attn, layer.wo, x)
            else:
                x = ops.add(x, ops.rmsnorm(ops.matmul(attn, layer.wo), layer.post_attn_norm, c.rms_eps))
            h = ops.rmsnorm(x, layer.ffn_norm, c.rms_eps)
            ffn = gate(ops.matmul(h, layer.w_gate_up))
            if layer.post_ffn_norm is None:
                x = ops.matmul_add(ffn, layer.w_down, x)
            else:
                x = ops.add(x, ops.rmsnorm(ops.matmul(ffn, layer.w_down), layer.post_ffn_norm, c.rms_eps))
            x = ops.end_layer(i, x)
        return x
