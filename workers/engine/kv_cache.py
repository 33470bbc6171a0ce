"""The paged KV cache's memory: per-layer K and V block pools in the backend's KV layout.

Which block belongs to which sequence is the block manager's business
(`workers/engine/block_manager.py`); this is only the storage the attention kernels read,
sized by a token count or a byte budget from the layout's bytes per token.

Global layers keep the whole context in the main pool. Layers with a sliding window keep
their rows in the sliding pool, whose blocks a sequence gives back once they fall behind its
window: it holds `sliding_pool_blocks` (every sequence a step may hold, each its window, the
rollback slack and one prefill chunk), or as many blocks as the main pool where that is fewer
(a sequence never holds more sliding blocks than main ones). Its size does not grow with the
context; the main pool's is what the byte budget leaves.
"""

from __future__ import annotations

from kernels import KVLayout
from kernels.ops import Backend
from workers.engine.block_manager import SLACK


def sliding_pool_blocks(window: int, block_size: int, max_seqs: int, chunk: int) -> int:
    """Blocks a sliding pool needs for max_seqs sequences stepping up to `chunk` tokens each:
    a step reserves from SLACK + window positions before its first query to its last one,
    straddling a block boundary at each end."""
    return max_seqs * (-(-(window + SLACK + chunk) // block_size) + 1)


def sliding_pool(config, block_size: int, max_seqs: int, chunk: int) -> tuple[tuple[int, ...], int, int]:
    """A model's (layers with a window, the widest window, the blocks their pool needs:
    sliding_pool_blocks); ((), 0, 0) for a model without windows."""
    windows = [config.window(i) for i in range(config.n_layers)]
    layers = tuple(i for i, w in enumerate(windows) if w > 0)
    if not layers:
        return (), 0, 0
    return layers, max(windows), sliding_pool_blocks(max(windows), block_size, max_seqs, chunk)


def pool_bytes(units: int, unit_bytes: int, sliding_unit_bytes: int, sliding_units: int) -> int:
    """Bytes of a main pool of `units` (tokens or blocks) of unit_bytes beside a sliding pool of
    min(units, sliding_units) units of sliding_unit_bytes."""
    return units * unit_bytes + min(units, sliding_units) * sliding_unit_bytes


def pool_units_within(nbytes: int, unit_bytes: int, sliding_unit_bytes: int, sliding_units: int) -> int:
    """The most main-pool units whose `pool_bytes` fit in nbytes."""
    nbytes = max(0, nbytes)
    if not unit_bytes:  # every layer slides: the main pool only numbers positions, the sliding pool costs
        return min(nbytes // sliding_unit_bytes, sliding_units)
    both = nbytes // (unit_bytes + sliding_unit_bytes)
    if both <= sliding_units:
        return both
    return (nbytes - sliding_units * sliding_unit_bytes) // unit_bytes


class PagedKVCache:
    def __init__(self, ops: Backend, n_layers: int, layout: KVLayout, num_blocks: int, recent_slots: int = 0,
                 sliding: tuple[int, ...] = (), sliding_blocks: int = 0, held: range | None = None):
        """recent_slots: sequences a RotateKV cache's recent ring holds at once; sliding: the
        layers whose rows are the sliding pool's sliding_blocks blocks. held: the layers whose
        K and V this process stores (every layer if None): a pipeline stage's, or none for the
        driver of the stages, which numbers the same blocks for all of them
        (workers/engine/pipeline.py)."""
        if num_blocks < 1 or (sliding and sliding_blocks < 1):
            raise ValueError("the KV cache needs at least one block in each pool")
        self.layout, self.num_blocks, self.block_size = layout, num_blocks, layout.block_size
        self.recent_slots = recent_slots if layout.type.quantized else 0
        self.sliding, self.sliding_blocks = tuple(sliding), sliding_blocks if sliding else 0
        self.held = range(n_layers) if held is None else held
        self.layers = [ops.new_kv_cache(self.sliding_blocks if i in self.sliding else num_blocks, layout,
                                        self.recent_slots, i in self.sliding) for i in self.held]

    @staticmethod
    def blocks_within(budget_bytes: int, n_layers: int, layout: KVLayout, recent_slots: int = 0,
                      n_sliding: int = 0, sliding_cap: int = 0) -> int:
        """The most main-pool blocks whose K and V, over every layer, fit in budget_bytes beside
        the ring and the sliding pool (n_sliding layers of up to sliding_cap blocks)."""
        rest = budget_bytes - n_layers * layout.fixed_bytes(recent_slots)
        per_block = layout.bytes_per_block
        return pool_units_within(rest, (n_layers - n_sliding) * per_block, n_sliding * per_block, sliding_cap)

    @property
    def by_layer(self) -> dict[int, tuple]:
        """The held layers' (K, V) by layer index."""
        return dict(zip(self.held, self.layers))

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds on the device, every layer's K and V."""
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    @property
    def sliding_nbytes(self) -> int:
        """Bytes of the sliding pool: the sliding layers' K and V."""
        return sum(k.nbytes + v.nbytes for i, (k, v) in self.by_layer.items() if i in self.sliding)
