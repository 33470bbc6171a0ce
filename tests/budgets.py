"""A VRAM budget that places a model the way a test wants it placed."""

from __future__ import annotations


def streaming_budget(plan, resident, n_buffers: int, kv_tokens: int | None = None) -> int:
    """The budget under which plan's model keeps `resident` layers resident (a count: the first
    ones; or the layers) and streams the rest through n_buffers slots, beside kv_tokens of KV
    (plan's by default). The reserve counts no share for prompt graphs: a streamed plan grants
    none; nor the embedding where it is a table of its own: a streamed plan keeps it in host memory."""
    s = plan.sizes
    kv = plan.kv_tokens if kv_tokens is None else kv_tokens
    keep = set(range(resident)) if isinstance(resident, int) else set(resident)
    streamed = [nbytes for i, nbytes in enumerate(s.layers) if i not in keep]
    return (plan.reserve - plan.prompt_graph_bytes + s.fixed_on_device(s.embed_apart) + s.kv_bytes(kv)
            + n_buffers * max(streamed) + sum(s.layers[i] for i in keep))


def every_stage_streams(resident) -> int:
    """A budget under which each stage of `resident` (an Engine whose stages are resident) streams:
    a byte short of the smaller stage's share, the first stage's counted without its embedding
    table, which a streaming stage keeps in host memory."""
    return min(s.device_bytes for s in resident.stages) - resident.placement.sizes.embed_bytes - 1
