"""The one owner of KV cache blocks: the free lists, and each sequence's block tables.

A sequence's token at position p lives in block `block_table[p // block_size]`, offset
`p % block_size`. Whoever drives the engine (the serving scheduler, or the engine's own
single-request loops) reserves blocks here before a step; `Engine.forward` only runs the
tables it is given. Blocks go back all at once when a sequence ends or is preempted, or
from the tail (`trim`) when tokens written speculatively are rejected. A RotateKV cache also
gives each sequence a slot of its recent ring (kernels/kv_layout.py) while it holds blocks.

A model with sliding-window layers keeps their rows in a pool of their own (`sliding_blocks`):
each sequence has a second table over the same positions, `sliding_table`, whose blocks lying
wholly before (the step's first query position - window - SLACK) go back to that pool when
the step is reserved (their entries become -1, `sliding_freed` counts them), so a sliding
layer's KV holds its window, not the context. SLACK is the most positions a speculative pass
rolls back (a draft reserves up to MAX_K positions ahead of the verifying pass's first query),
so a rollback never needs a block given back.
"""

from __future__ import annotations

from typing import Protocol

from workers.engine.speculation import MAX_K

SLACK = MAX_K


def slot(table: list[int], position: int, block_size: int) -> int:
    """The cache row of a sequence's token at `position`, through its block table."""
    return table[position // block_size] * block_size + position % block_size


class OutOfBlocks(RuntimeError):
    """The cache has no free block for the tokens asked for."""


class HoldsBlocks(Protocol):  # workers.engine.engine.Sequence
    block_table: list[int]
    num_cached: int
    recent_slot: int  # -1: none
    sliding_table: list[int]  # the sliding pool's blocks of the same positions, -1 where given back
    sliding_freed: int  # leading entries of sliding_table given back


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, recent_slots: int = 0, sliding_blocks: int = 0,
                 window: int = 0):
        """recent_slots: the ring slots of a RotateKV cache (0: a cache without a ring);
        sliding_blocks: the sliding layers' pool (0: none), whose layers see `window` keys."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        if sliding_blocks < 0 or (sliding_blocks > 0) != (window > 0):
            raise ValueError(f"a sliding pool needs blocks and a window; got {sliding_blocks} blocks, window {window}")
        self.num_blocks, self.block_size, self.recent_slots = num_blocks, block_size, recent_slots
        self.sliding_blocks, self.window = sliding_blocks, window
        self._free = list(range(num_blocks - 1, -1, -1))
        self._free_sliding = list(range(sliding_blocks - 1, -1, -1))
        self._free_slots = list(range(recent_slots - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def sliding_blocks_in_use(self) -> int:
        return self.sliding_blocks - len(self._free_sliding)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def _sliding_cut(self, first: int) -> int:
        """Leading sliding blocks that neither a step whose first query is at `first` nor a
        rollback of up to SLACK positions from it reads."""
        return max(0, first - self.window - SLACK) // self.block_size

    def room(self, seq: HoldsBlocks) -> int:
        """Tokens seq could hold with its blocks and every free one (in a sliding pool, with the
        blocks its next step gives back)."""
        room = (len(seq.block_table) + len(self._free)) * self.block_size
        if self.sliding_blocks:
            giving = max(0, min(self._sliding_cut(seq.num_cached), len(seq.sliding_table)) - seq.sliding_freed)
            room = min(room, (len(seq.sliding_table) + len(self._free_sliding) + giving) * self.block_size)
        return room

    def reserve(self, seq: HoldsBlocks, n_tokens: int) -> None:
        """Grow seq's block tables to hold n_tokens tokens, once the sliding blocks before its
        next step's window went back; all or nothing (OutOfBlocks)."""
        needed = self.blocks_for(n_tokens) - len(seq.block_table)
        if needed > len(self._free):
            raise OutOfBlocks(f"KV cache full: {needed} more blocks needed, {len(self._free)} free")
        if self.sliding_blocks:
            self._give_back(seq, self._sliding_cut(seq.num_cached))
            if needed > len(self._free_sliding):
                raise OutOfBlocks(f"sliding-window KV pool full: {needed} more blocks needed, "
                                  f"{len(self._free_sliding)} free")
        if self.recent_slots and seq.recent_slot < 0:
            if not self._free_slots:
                raise OutOfBlocks(f"every one of the KV cache's {self.recent_slots} recent-ring slots is in use")
            seq.recent_slot = self._free_slots.pop()
        for _ in range(needed):
            seq.block_table.append(self._free.pop())
            if self.sliding_blocks:
                seq.sliding_table.append(self._free_sliding.pop())

    def try_reserve(self, seq: HoldsBlocks, n_tokens: int) -> bool:
        try:
            self.reserve(seq, n_tokens)
            return True
        except OutOfBlocks:
            return False

    def _give_back(self, seq: HoldsBlocks, cut: int) -> None:
        """seq's sliding blocks before index `cut` back to the sliding pool."""
        table = seq.sliding_table
        for j in range(seq.sliding_freed, min(cut, len(table))):
            self._free_sliding.append(table[j])
            table[j] = -1
        seq.sliding_freed = max(seq.sliding_freed, min(cut, len(table)))

    def trim(self, seq: HoldsBlocks, n_tokens: int) -> None:
        """Keep seq's first n_tokens cached tokens; the blocks past them go back (the tail of a
        rejected speculation). A sliding table cannot roll back past blocks it gave back that a
        query at n_tokens would read (ValueError)."""
        keep = self.blocks_for(n_tokens)
        if self.sliding_blocks:
            if n_tokens and seq.sliding_freed > max(0, n_tokens - self.window + 1) // self.block_size:
                raise ValueError(f"cannot roll back to {n_tokens} tokens: the sliding pool has taken back "
                                 f"{seq.sliding_freed} blocks that a query at position {n_tokens} reads")
            self._free_sliding.extend(b for b in reversed(seq.sliding_table[keep:]) if b >= 0)
            del seq.sliding_table[keep:]
            seq.sliding_freed = min(seq.sliding_freed, keep)
        self._free.extend(reversed(seq.block_table[keep:]))
        del seq.block_table[keep:]
        seq.num_cached = min(seq.num_cached, n_tokens)

    def release(self, seq: HoldsBlocks) -> None:
        """Every block (and its ring slot) of seq back; nothing of it is cached any more."""
        self.trim(seq, 0)
        if seq.recent_slot >= 0:
            self._free_slots.append(seq.recent_slot)
            seq.recent_slot = -1
