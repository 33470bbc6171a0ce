"""A VRAM budget that places a model the way a test wants it placed."""

from __future__ import annotations


def streaming_budget(plan, resident_layers: int, n_buffers: int, kv_tokens: int | None = None) -> int:
    """The budget under which plan's model keeps its first resident_layers layers resident and
    streams the rest through n_buffers slots, beside kv_tokens of KV (plan's by default). The
    reserve counts no share for prompt graphs: a streamed plan grants none."""
    s = plan.sizes
    kv = plan.kv_tokens if kv_tokens is None else kv_tokens
    return (plan.reserve - plan.prompt_graph_bytes + s.fixed + s.kv_bytes(kv)
            + n_buffers * max(s.layers[resident_layers:]) + sum(s.layers[:resident_layers]))
