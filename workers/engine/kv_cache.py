"""Paged KV cache: fixed-size blocks per layer and a free list shared by all sequences.

A sequence owns a block table (list of block ids); its token at position p lives in block
table[p // block_size], offset p % block_size. Blocks are handed out as a sequence grows
and all returned at once when it finishes or is cancelled.
"""

from __future__ import annotations

from kernels.ops import Backend


class OutOfBlocks(RuntimeError):
    """The cache has no free block for the tokens asked for."""


class PagedKVCache:
    def __init__(self, ops: Backend, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int, block_size: int = 16):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.block_size, self.num_blocks = block_size, num_blocks
        self.layers = [ops.new_kv_cache(num_blocks, block_size, n_kv_heads, head_dim) for _ in range(n_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, itemsize: int) -> int:
        return 2 * n_layers * n_kv_heads * head_dim * itemsize

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def reserve(self, block_table: list[int], n_tokens: int) -> None:
        """Grow block_table in place to hold n_tokens tokens; all or nothing."""
        needed = self.blocks_for(n_tokens) - len(block_table)
        if needed > len(self._free):
            raise OutOfBlocks(f"KV cache full: {needed} more blocks needed, {len(self._free)} free")
        for _ in range(needed):
            block_table.append(self._free.pop())

    def release(self, block_table: list[int]) -> None:
        self._free.extend(reversed(block_table))
        block_table.clear()
