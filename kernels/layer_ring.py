"""The ring of VRAM slots that streamed layers pass through: which slot a layer uses, and which
layer's bytes go into a slot once its user is done.

A forward pass runs layers 0..L-1 in order; the streamed ones (positions p = 0..S-1 among
them) use slot p % N. When the layer at position p is done, its slot receives the next
layer that uses it: position p + N of this pass or, for the last N positions, position
p % N of the next pass. So between passes the slots hold the first N streamed layers (the
copies issued at the end of a pass finish before it ends: a pass is self-contained, as a
captured CUDA graph must be), and during a pass the link always has the next copies queued
while compute uses the slots filled before. The schedule is plain Python; a backend issues
the copies and waits it prescribes (kernels/cupy/streaming.py) and the CPU tests replay it on a
fake device.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RingSchedule:
    streamed: tuple[int, ...]  # layer indices that stream, in forward order
    n_slots: int
    _positions: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if list(self.streamed) != sorted(set(self.streamed)):
            raise ValueError(f"streamed layers must be distinct and in order, got {list(self.streamed)}")
        if self.streamed and not 1 <= self.n_slots <= len(self.streamed):
            raise ValueError(f"{self.n_slots} slots for {len(self.streamed)} streamed layers: need 1..{len(self.streamed)}")
        object.__setattr__(self, "_positions", {layer: p for p, layer in enumerate(self.streamed)})

    def position(self, layer: int) -> int:
        return self._positions[layer]

    def is_streamed(self, layer: int) -> bool:
        return layer in self._positions

    def slot(self, layer: int) -> int:
        return self.position(layer) % self.n_slots

    def prefetched(self) -> tuple[int, ...]:
        """The layers the slots hold when a pass starts, in the order the previous pass's end
        copies them (positions S-N..S-1 refill slots p % N: a rotation of the first N)."""
        S, n = len(self.streamed), self.n_slots
        return tuple(self.streamed[p % n] for p in range(S - n, S))

    def copy_order(self) -> tuple[int, ...]:
        """Every pass's copies in the order they are issued, starting with the fill: what a
        source that stages images ahead (the disk tier) must produce, cyclically."""
        return self.prefetched() + self.streamed[self.n_slots:]

    def refill(self, layer: int) -> tuple[int, bool]:
        """(the layer whose bytes go into `layer`'s slot once it is done, whether that use is in
        the next pass)."""
        p, n = self.position(layer), self.n_slots
        if p + n < len(self.streamed):
            return self.streamed[p + n], False
        return self.streamed[p % n], True


class RingDriver:
    """The copies and waits of each forward pass, issued on a device with two ordered queues:
    compute (the backend's stream) and copy. `device` gives:
      copy(layer, slot, on_copy_queue) -> event   the layer's image into the slot, an event after it
      freed(slot) -> event                         recorded on the compute queue
      copy_waits(event), compute_waits(event)      a queue waits for an event of the other
    """

    def __init__(self, schedule: RingSchedule, device):
        self.schedule, self.device = schedule, device
        self._pending: dict = {}  # copies issued in this pass, not yet waited for
        self._tail = None  # the last copy issued for the next pass
        self._intact = False  # the slots hold the first layers (a pass ran to its end)

    def begin_pass(self) -> None:
        """After a load, or a pass that did not finish, the slots are filled afresh in order."""
        if self._intact:
            return
        self._pending.clear()
        self._tail = None
        for layer in self.schedule.prefetched():
            self.device.copy(layer, self.schedule.slot(layer), False)
        self._intact = True

    @contextmanager
    def whole_pass(self):
        """Around a forward pass: the slots filled before it, its copies joined after it, and
        the slots in no known state if it raises."""
        self.begin_pass()
        try:
            yield
        except BaseException:
            self.abandon()
            raise
        self.end_pass()

    def begin_layer(self, layer: int) -> None:
        """Compute waits for the layer's copy if this pass issued it (the first ones come ready;
        a resident layer has none)."""
        event = self._pending.pop(layer, None)
        if event is not None:
            self.device.compute_waits(event)

    def end_layer(self, layer: int) -> None:
        """Every read of the layer's slot is issued: refill the slot behind them (a resident
        layer has no slot)."""
        if not self.schedule.is_streamed(layer):
            return
        slot = self.schedule.slot(layer)
        self.device.copy_waits(self.device.freed(slot))
        nxt, next_pass = self.schedule.refill(layer)
        event = self.device.copy(nxt, slot, True)
        if next_pass:
            self._tail = event
        else:
            self._pending[nxt] = event

    def end_pass(self) -> None:
        """Compute waits for the copies made for the next pass: a pass (a captured graph) is
        whole. A pass that stopped early (an early-exit draft) also waits for the copies it
        issued and did not use, and the next pass fills the slots afresh."""
        for event in [*self._pending.values(), *([self._tail] if self._tail is not None else [])]:
            self.device.compute_waits(event)
        self._tail = None
        self._intact = not self._pending
        self._pending.clear()

    def abandon(self) -> None:
        """A pass raised midway: the slots are in no known state."""
        self._intact = False
