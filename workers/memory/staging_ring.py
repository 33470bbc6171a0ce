"""The staging ring: a few slots of shared memory that the disk tier's reader fills with layer
images in the forward pass's order and the ComputeWorker copies to the GPU, a
single-producer single-consumer FIFO across two processes."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from workers.memory.image_file import ALIGN, align_up
from workers.memory.shared_buffer import SharedBuffer

class RingClosed(RuntimeError):
    """The staging ring was closed while a side waited on it."""


# Shared header, int64: the ring's fields, then per slot its fields. One aligned int64 store is
# one store on x86-64, and the other process sees a slot's stores in program order (TSO), which
# is what publishing a slot (its data and fields first, its state last) relies on. A weakly
# ordered CPU (aarch64) would need a fence there that Python does not offer.
_MAGIC, _SLOTS, _SLOT_BYTES, _CLOSED = range(4)
_GLOBAL = 4
_LAYER, _NBYTES, _STATE, _SEQ = range(4)
_FIELDS = 4
FREE, READY = 0, 1
RING_MAGIC = int.from_bytes(b"NTRRING1", "little")
MAX_SLOTS = 256
# A wait's poll interval: a layer's copy to the GPU takes milliseconds, so 0.1 ms late costs
# little, and two processes spinning on a shared core would cost both.
POLL_S = 100e-6


def _header_bytes(slots: int) -> int:
    return align_up(8 * (_GLOBAL + _FIELDS * slots))


class StagingRing:
    """K slots of slot_bytes (4096-aligned, after a page-aligned header) in one SharedBuffer.

    The producer calls wait_free -> slot_view -> publish; the consumer wait_ready -> (copy) ->
    release. Each side counts what it has done in its own process and takes slot = count % K,
    so both go around in the same FIFO order. The consumer may hold several slots at once
    (copies in flight) and releases them oldest first. A slot's seq field is the count it
    was published at: the consumer only takes the one it expects next.
    """

    def __init__(self, buffer: SharedBuffer):
        self.buffer = buffer
        if buffer.nbytes < 8 * _GLOBAL or buffer.array[:8 * _GLOBAL].view(np.int64)[_MAGIC] != RING_MAGIC:
            raise ValueError(f"shared memory {buffer.name!r} is not a staging ring")
        head = buffer.array[:8 * _GLOBAL].view(np.int64)
        self.slots, self.slot_bytes = int(head[_SLOTS]), int(head[_SLOT_BYTES])
        if not 0 < self.slots <= MAX_SLOTS or self.slot_bytes <= 0 or self.slot_bytes % ALIGN \
                or self.nbytes(self.slots, self.slot_bytes) != buffer.nbytes:
            raise ValueError(f"staging ring {buffer.name!r}: {self.slots} slots of {self.slot_bytes} bytes "
                             f"do not match its {buffer.nbytes} bytes")
        start = _header_bytes(self.slots)
        self.header = buffer.array[:8 * (_GLOBAL + _FIELDS * self.slots)].view(np.int64)
        self.meta = self.header[_GLOBAL:].reshape(self.slots, _FIELDS)
        self.data = buffer.array[start:].reshape(self.slots, self.slot_bytes)
        self._next_free = 0  # producer: the slot that wait_free hands out and publish fills
        self._next_ready = 0  # consumer: the slot that wait_ready hands out next
        self._next_release = 0  # consumer: the oldest slot it holds

    @staticmethod
    def nbytes(slots: int, slot_bytes: int) -> int:
        return _header_bytes(slots) + slots * slot_bytes

    @classmethod
    def create(cls, name: str, slots: int, slot_bytes: int) -> StagingRing:
        if not 0 < slots <= MAX_SLOTS:
            raise ValueError(f"staging ring: {slots} slots, 1 to {MAX_SLOTS}")
        if slot_bytes <= 0 or slot_bytes % ALIGN:
            raise ValueError(f"staging ring: slot size {slot_bytes} is not a positive multiple of {ALIGN}")
        buffer = SharedBuffer.create(name, cls.nbytes(slots, slot_bytes))
        head = buffer.array[:8 * _GLOBAL].view(np.int64)
        head[_SLOTS], head[_SLOT_BYTES] = slots, slot_bytes  # the rest is zero: every slot FREE, not closed
        head[_MAGIC] = RING_MAGIC  # last: whoever attaches sees a whole header or none
        return cls(buffer)

    @classmethod
    def attach(cls, name: str) -> StagingRing:
        return cls(SharedBuffer.attach(name))

    @property
    def closed(self) -> bool:
        return bool(self.header[_CLOSED])

    def close(self) -> None:
        """Stop both sides: every wait, here or in the other process, raises RingClosed."""
        self.header[_CLOSED] = 1

    def detach(self) -> None:
        """Unmap this process's view (after close, or when done with the ring)."""
        self.header = self.meta = self.data = None
        self.buffer.close()

    # producer

    def wait_free(self, timeout: float | None = None) -> int:
        """The slot to fill next, once the consumer has released it."""
        slot = self._next_free % self.slots
        self._wait(lambda: self.meta[slot, _STATE] == FREE, timeout, f"a free slot (slot {slot})")
        return slot

    def slot_view(self, slot: int) -> np.ndarray:
        return self.data[slot]

    def publish(self, slot: int, layer: int, nbytes: int) -> None:
        expected = self._next_free % self.slots
        if slot != expected or self.meta[slot, _STATE] != FREE:
            raise ValueError(f"publish slot {slot}: the producer's next slot is {expected}, after wait_free")
        if not 0 < nbytes <= self.slot_bytes:
            raise ValueError(f"publish layer {layer}: {nbytes} bytes in a {self.slot_bytes}-byte slot")
        m = self.meta[slot]
        m[_LAYER], m[_NBYTES], m[_SEQ] = layer, nbytes, self._next_free
        m[_STATE] = READY  # last: the consumer reads the fields only once it sees READY
        self._next_free += 1

    # consumer

    def wait_ready(self, layer: int, timeout: float | None = None) -> tuple[int, np.ndarray]:
        """The next slot in FIFO order and a read-only view of its image, which must be layer's."""
        if self._next_ready - self._next_release == self.slots:
            raise ValueError(f"the consumer holds all {self.slots} slots: release one before waiting for layer {layer}")
        seq = self._next_ready
        slot = seq % self.slots
        m = self.meta[slot]
        self._wait(lambda: m[_STATE] == READY and m[_SEQ] == seq, timeout, f"layer {layer}", drain=True)
        if m[_LAYER] != layer:
            raise ValueError(f"staging slot {slot} holds layer {m[_LAYER]}, the consumer expected layer {layer}: "
                             f"the reader's order is not the forward pass's")
        self._next_ready += 1
        view = self.data[slot, :m[_NBYTES]]
        view.flags.writeable = False
        return slot, view

    def release(self, slot: int) -> None:
        """Hand the oldest held slot back to the producer."""
        expected = self._next_release % self.slots
        if self._next_release == self._next_ready or slot != expected:
            raise ValueError(f"release slot {slot}: slots are released oldest first and the oldest held is "
                             f"{expected if self._next_release < self._next_ready else 'none'}")
        self.meta[slot, _STATE] = FREE
        self._next_release += 1

    def _wait(self, ready: Callable[[], bool], timeout: float | None, what: str, drain: bool = False) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if drain and ready():  # the consumer still takes what was published before a close
                return
            if self.closed:
                raise RingClosed(f"staging ring {self.buffer.name!r} closed while waiting for {what}")
            if ready():
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"staging ring {self.buffer.name!r}: waited {timeout:g} s for {what}")
            time.sleep(POLL_S)
