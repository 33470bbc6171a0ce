"""The paged KV cache's layout as a backend stores it: what the engine sizes the cache with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KVLayout:
    """How a backend stores one layer's paged KV cache: what the engine sizes it with.

    K and V are each [num_blocks, block_size, n_kv_heads, head_dim] of `dtype`
    (`Backend.kv_layout` makes one, `Backend.new_kv_cache` allocates it)."""

    n_kv_heads: int
    head_dim: int
    block_size: int
    dtype: np.dtype  # element type of K and V as stored

    @property
    def bytes_per_token(self) -> int:
        """One layer, K and V together."""
        return 2 * self.n_kv_heads * self.head_dim * np.dtype(self.dtype).itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token
