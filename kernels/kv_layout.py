"""The paged KV cache's layout as a backend stores it: what the engine sizes the cache with.

A dense type keeps each K and V row as head_dim floats. A quantized type (RotateKV) keeps
each row transformed (keys centred and scaled per channel, then K and V rotated by a
Walsh-Hadamard transform: kernels/kv_quant.py) and quantized in groups: `bits`-bit codes
packed little-endian, 8 values in `bits` bytes, the value `CODE_ORDER[bits][s]` in slot s (at
bit s * bits), then per group a float16 scale and a float16 minimum; one such row per (token,
KV head). Beside the paged rows, each sequence being served owns a slot of the recent ring:
its last RING positions' transformed rows in float16 and its first token's (the attention
sink), so that a query reads the keys and values of the RECENT positions up to its own, and
of the sink, unquantized (KIVI's residual window). `kernels/kv_quant.py` is the host's twin of what
`kernels/cuda/attention.cu` writes and reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class KVType:
    name: str
    bits: int  # per stored value: 32/16 dense, 8..2 quantized
    group: int = 0  # values sharing a scale and minimum (quantized types); calibrated, docs/benchmarks.md

    @property
    def quantized(self) -> bool:
        return self.group > 0


# Group sizes chosen with tools/kv_type_sweep.py on LGPL-2.1, not an evaluation text
# (docs/benchmarks.md "KV cache types"); a head narrower than the group is one group.
KV_TYPES = {t.name: t for t in (KVType("f32", 32), KVType("f16", 16), KVType("q8", 8, 64), KVType("q4", 4, 128),
                                KVType("q3", 3, 128), KVType("q2", 2, 32))}


def kv_type(name: str) -> KVType:
    if name not in KV_TYPES:
        raise ValueError(f"unknown kv_type {name!r}; choose one of {', '.join(KV_TYPES)}")
    return KV_TYPES[name]


# The value each code slot of a word of 8 holds. 4-bit words hold values 0, 2, 4, 6, 1, 3,
# 5, 7: slots k and k + 4, 16 bits apart, are a pair (2j, 2j + 1), which the kernel takes into
# the two halves of an fp16 pair with one mask (attention.cu kv_dequant8); other widths in order.
CODE_ORDER = {bits: np.array([0, 2, 4, 6, 1, 3, 5, 7] if bits == 4 else range(8)) for bits in (2, 3, 4, 8)}

# positions up to a query's own that it reads unquantized: 32, not 64, because each sequence's
# ring costs 2 x (RING + 1) float16 rows a layer (a 70B model's 32 ring slots: 849 MB at 64,
# 514 MB at 32), and at 32 every type stays well inside its accuracy target on the
# calibration text (docs/benchmarks.md)
RECENT = 32
# the ring keeps RECENT + 16 positions: a speculative pass writes up to 16 positions past the
# accepted ones (workers/engine/speculation.py MAX_K), which must not overwrite a window
RING = RECENT + 16


def layout_for(backend: str, types: tuple[str, ...], n_kv_heads: int, head_dim: int, block_size: int,
               kv: str | None = None) -> "KVLayout":
    """The layout of kv type `kv` (types[0], the backend's default, if None) on a backend
    storing `types` (`Backend.kv_layout`)."""
    kv = kv or types[0]
    if kv not in types:
        kv_type(kv)  # an unknown name's error first
        raise ValueError(f"backend {backend!r} stores no kv_type {kv!r}; choose one of {', '.join(types)}")
    return KVLayout(n_kv_heads, head_dim, block_size, kv_type(kv))


def hadamard_block(head_dim: int) -> int:
    """The rotation's block: the largest power of two dividing head_dim (a 96-wide head
    rotates in blocks of 32)."""
    return head_dim & -head_dim


@dataclass(frozen=True)
class KVLayout:
    """How a backend stores one layer's paged KV cache: what the engine sizes it with.

    K and V are each [num_blocks, block_size, n_kv_heads, head_dim] of the dense type's float,
    or [num_blocks, block_size, n_kv_heads, row_bytes] of uint8 for a quantized type
    (`Backend.kv_layout` makes one, `new_kv_rows` allocates it)."""

    n_kv_heads: int
    head_dim: int
    block_size: int
    type: KVType

    def __post_init__(self):
        t = self.type
        if t.quantized and (self.head_dim % 8 or self.head_dim % self.group or self.group < 32):
            raise ValueError(f"kv_type {t.name} needs head_dim a multiple of 32 and of its group; got {self.head_dim}")

    @property
    def group(self) -> int:
        """The type's group, or the rotation block where a head is narrower than the group."""
        return min(self.type.group, hadamard_block(self.head_dim))

    @property
    def dtype(self) -> np.dtype:
        t = self.type
        return np.dtype(np.uint8 if t.quantized else np.float32 if t.bits == 32 else np.float16)

    @property
    def code_bytes(self) -> int:
        """A quantized row's packed codes, before its groups' scales and minimums."""
        return self.head_dim * self.type.bits // 8

    @property
    def row_bytes(self) -> int:
        """One (token, KV head) row of K (or of V) as stored."""
        if not self.type.quantized:
            return self.head_dim * self.dtype.itemsize
        return self.code_bytes + 4 * (self.head_dim // self.group)

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The trailing shape of one token's K (or V) in the cache."""
        return (self.n_kv_heads, self.row_bytes if self.type.quantized else self.head_dim)

    @property
    def bits_per_value(self) -> float:
        """Stored bits per K or V value, scales and minimums included."""
        return 8 * self.row_bytes / self.head_dim

    @property
    def bytes_per_token(self) -> int:
        """One layer, K and V together."""
        return 2 * self.n_kv_heads * self.row_bytes

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token

    @property
    def ring_bytes(self) -> int:
        """One sequence slot of one layer's recent ring, K and V (quantized types; 0 for dense)."""
        return 2 * (RING + 1) * self.n_kv_heads * self.head_dim * 2 if self.type.quantized else 0

    def fixed_bytes(self, recent_slots: int) -> int:
        """One layer's bytes beside its blocks: the ring's slots and the key centre and scale."""
        return recent_slots * self.ring_bytes + (8 * self.n_kv_heads * self.head_dim if self.type.quantized else 0)

    def bits_per_value_at(self, context: int) -> float:
        """Stored bits per K or V value of a sequence of `context` tokens, its ring slot included."""
        return 8 * (context * self.bytes_per_token + self.ring_bytes) / (2 * context * self.n_kv_heads * self.head_dim)


@dataclass
class KVRows:
    """One layer's K (or V) cache in the backend's arrays: rows [num_blocks, block_size,
    *row_shape] in `layout`; for a quantized type also the recent ring [slots, RING + 1,
    n_kv_heads, head_dim] float16 (entry RING: the sink), and for keys the per-channel centre
    and scale [n_kv_heads, head_dim] float32 the rows are transformed with (set by the
    engine's calibration; zero and one until then). A sliding layer's rows are blocks of the
    sliding pool (`sliding`): attention finds them through the batch's sliding_tables."""

    rows: Any
    layout: KVLayout
    sliding: bool = False
    recent: Any = None
    center: Any = None
    scale: Any = None
    # positions up to a query's own read unquantized; the calibration pass, whose sequences
    # start from scratch in one step, widens it to read everything so
    recent_window: int = RECENT

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.rows, self.recent, self.center, self.scale) if a is not None)


def new_kv_rows(xp, num_blocks: int, layout: KVLayout, recent_slots: int = 0,
                sliding: bool = False) -> tuple[KVRows, KVRows]:
    """One layer's (K, V) cache in array module xp (numpy or cupy), zeroed: rows [num_blocks,
    block_size, *layout.row_shape] of layout.dtype; a quantized type's with recent_slots ring
    slots and, for K, the identity transform until calibration sets it."""
    def rows(keys: bool) -> KVRows:
        r = KVRows(xp.zeros((num_blocks, layout.block_size, *layout.row_shape), layout.dtype), layout, sliding=sliding)
        if layout.type.quantized:
            r.recent = xp.zeros((recent_slots, RING + 1, layout.n_kv_heads, layout.head_dim), xp.float16)
            if keys:
                r.center = xp.zeros((layout.n_kv_heads, layout.head_dim), xp.float32)
                r.scale = xp.ones((layout.n_kv_heads, layout.head_dim), xp.float32)
        return r

    return rows(True), rows(False)
