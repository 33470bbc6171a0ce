"""The paged KV cache's memory: per-layer K and V block pools in the backend's KV layout.

Which block belongs to which sequence is the block manager's business
(`workers/engine/block_manager.py`); this is only the storage the attention kernels read,
sized by a token count or a byte budget from the layout's bytes per token.
"""

from __future__ import annotations

from kernels import KVLayout
from kernels.ops import Backend


class PagedKVCache:
    def __init__(self, ops: Backend, n_layers: int, layout: KVLayout, num_blocks: int, recent_slots: int = 0):
        """recent_slots: sequences a RotateKV cache's recent ring holds at once."""
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.layout, self.num_blocks, self.block_size = layout, num_blocks, layout.block_size
        self.recent_slots = recent_slots if layout.type.quantized else 0
        self.layers = [ops.new_kv_cache(num_blocks, layout, self.recent_slots) for _ in range(n_layers)]

    @staticmethod
    def blocks_within(budget_bytes: int, n_layers: int, layout: KVLayout, recent_slots: int = 0) -> int:
        """The most blocks whose K and V, over every layer, fit in budget_bytes beside the ring."""
        rest = budget_bytes - n_layers * layout.fixed_bytes(recent_slots)
        return max(0, rest) // (n_layers * layout.bytes_per_block)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds on the device, every layer's K and V."""
        return sum(k.nbytes + v.nbytes for k, v in self.layers)
