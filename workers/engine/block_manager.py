"""The one owner of KV cache blocks: the free list, and each sequence's block table.

A sequence's token at position p lives in block `block_table[p // block_size]`, offset
`p % block_size`. Whoever drives the engine (the serving scheduler, or the engine's own
single-request loops) reserves blocks here before a step; `Engine.forward` only runs the
tables it is given. Blocks go back all at once when a sequence ends or is preempted, or
from the tail (`trim`) when tokens written speculatively are rejected. A RotateKV cache also
gives each sequence a slot of its recent ring (kernels/kv_layout.py) while it holds blocks.
"""

from __future__ import annotations

from typing import Protocol


class OutOfBlocks(RuntimeError):
    """The cache has no free block for the tokens asked for."""


class HoldsBlocks(Protocol):  # workers.engine.engine.Sequence
    block_table: list[int]
    num_cached: int
    recent_slot: int  # -1: none


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, recent_slots: int = 0):
        """recent_slots: the ring slots of a RotateKV cache (0: a cache without a ring)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks, self.block_size, self.recent_slots = num_blocks, block_size, recent_slots
        self._free = list(range(num_blocks - 1, -1, -1))
        self._free_slots = list(range(recent_slots - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def room(self, seq: HoldsBlocks) -> int:
        """Tokens seq could hold with its blocks and every free one."""
        return (len(seq.block_table) + len(self._free)) * self.block_size

    def reserve(self, seq: HoldsBlocks, n_tokens: int) -> None:
        """Grow seq's block table to hold n_tokens tokens; all or nothing (OutOfBlocks)."""
        needed = self.blocks_for(n_tokens) - len(seq.block_table)
        if needed > len(self._free):
            raise OutOfBlocks(f"KV cache full: {needed} more blocks needed, {len(self._free)} free")
        if self.recent_slots and seq.recent_slot < 0:
            if not self._free_slots:
                raise OutOfBlocks(f"every one of the KV cache's {self.recent_slots} recent-ring slots is in use")
            seq.recent_slot = self._free_slots.pop()
        for _ in range(needed):
            seq.block_table.append(self._free.pop())

    def try_reserve(self, seq: HoldsBlocks, n_tokens: int) -> bool:
        try:
            self.reserve(seq, n_tokens)
            return True
        except OutOfBlocks:
            return False

    def trim(self, seq: HoldsBlocks, n_tokens: int) -> None:
        """Keep seq's first n_tokens cached tokens; the blocks past them go back (the tail of a
        rejected speculation)."""
        keep = self.blocks_for(n_tokens)
        self._free.extend(reversed(seq.block_table[keep:]))
        del seq.block_table[keep:]
        seq.num_cached = min(seq.num_cached, n_tokens)

    def release(self, seq: HoldsBlocks) -> None:
        """Every block (and its ring slot) of seq back; nothing of it is cached any more."""
        self.trim(seq, 0)
        if seq.recent_slot >= 0:
            self._free_slots.append(seq.recent_slot)
            seq.recent_slot = -1
