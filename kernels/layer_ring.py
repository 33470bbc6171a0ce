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

A pass may run only some layers (a draft: the first ones, or a subset). It then copies into
each slot only the layers it runs, and its last use of a slot refills it with the slot's
layer between passes: every pass, whole or partial, starts and ends with slot k holding the
k-th streamed layer, so a captured pass replays right whatever ran before it.

A pass followed by a draft of resident layers may leave its refills for the next pass out
(`late`): it ends without waiting for them, `issued_pass` issues them behind it, and they
cross the link while the draft computes (which reads no slot); the next pass that reads a
slot waits for them first. Issued outside the pass, they are outside its captured graph, so
the slots hold the same layers between passes whether the pass ran or its graph replayed.
"""

from __future__ import annotations

from collections.abc import Collection
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PassPlan:
    first: tuple[int, ...]  # layers copied into their slots as the pass starts (the slot holds another)
    refill: dict  # layer -> (the layer its slot receives once it is done, or None; whether for the next pass)
    partial: bool  # the pass skips streamed layers

    @property
    def reads_slots(self) -> bool:
        return bool(self.first or self.refill)

    def next_pass_refills(self) -> list[int]:
        """The layers the slots receive for the next pass, in the order the pass ends their slots' users."""
        return [nxt for _, (nxt, next_pass) in sorted(self.refill.items()) if next_pass and nxt is not None]


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

    def plan(self, run: Collection[int] | None = None) -> PassPlan:
        """The copies of a pass that runs the layers in `run` (every layer when None): slot k's
        users in this pass take it in turn, the first copied in as the pass starts unless the
        slot holds it already, the last refilling it with the k-th streamed layer (a partial
        pass skips that copy where the slot holds it still)."""
        used = [layer for layer in self.streamed if run is None or layer in run]
        partial = len(used) < len(self.streamed)
        first, refill = [], {}
        for k in range(self.n_slots):
            users = [layer for layer in used if self.slot(layer) == k]
            if not users:
                continue
            home = self.streamed[k]  # what the slot holds between passes
            if users[0] != home:
                first.append(users[0])
            for a, b in zip(users, users[1:]):
                refill[a] = (b, False)
            # a whole pass copies its slot's own layer back too: the disk tier stages copy_order
            refill[users[-1]] = (None if partial and users[-1] == home else home, True)
        return PassPlan(tuple(first), refill, partial)


class RingDriver:
    """The copies and waits of each forward pass, issued on a device with two ordered queues:
    compute (the backend's stream) and copy. `device` gives:
      copy(layer, slot, on_copy_queue) -> event   the layer's image into the slot, an event after it
      freed(slot) -> event                         recorded on the compute queue
      copy_waits(event), compute_waits(event)      a queue waits for an event of the other
    """

    def __init__(self, schedule: RingSchedule, device, fixed_order: bool = False):
        """fixed_order: the images come staged in copy_order (the disk tier), so a pass that
        skips streamed layers cannot run."""
        self.schedule, self.device, self.fixed_order = schedule, device, fixed_order
        self._plans: dict = {None: schedule.plan()}  # frozenset of the layers a pass runs (None: all) -> PassPlan
        self._plan = self._plans[None]
        self._pending: dict = {}  # copies issued in this pass, not yet waited for
        self._tail = None  # the last copy issued for the next pass
        self._intact = False  # slot k holds the k-th streamed layer (a pass ran to its end)
        self._late = False  # this pass leaves its next-pass refills to issued_pass
        self._refilled = None  # the last refill issued_pass made, until a pass that reads a slot waits for it

    def _plan_of(self, run: Collection[int] | None) -> PassPlan:
        key = None if run is None else frozenset(run)
        if key not in self._plans:
            self._plans[key] = self.schedule.plan(key)
        return self._plans[key]

    def begin_pass(self, run: Collection[int] | None = None, late: bool = False) -> None:
        """Before a pass that runs the layers in `run` (all when None); late: its refills for the
        next pass are left to `issued_pass`. After a load, or a pass that did not finish, the
        slots are filled afresh in order."""
        plan = self._plan_of(run)
        if plan.partial and self.fixed_order and plan.reads_slots:
            raise ValueError("a pass that skips streamed layers (a draft) cannot run while layers stream from "
                             "disk: their images are staged in the order whole passes copy them")
        self._plan, self._late = plan, late
        self._fill()
        for layer in plan.first:
            self._pending[layer] = self._copy_in(layer)

    def _copy_in(self, layer: int):
        """The layer's image into its slot on the copy queue, behind every read of the slot the
        compute queue has issued (a refill takes the slot of the layer it follows)."""
        self.device.copy_waits(self.device.freed(self.schedule.slot(layer)))
        return self.device.copy(layer, self.schedule.slot(layer), True)

    def _fill(self) -> None:
        """After a load, or a pass that did not finish: the slots filled afresh in order."""
        if not self._intact:
            self._pending.clear()
            self._tail = None
            for layer in self.schedule.prefetched():
                self.device.copy(layer, self.schedule.slot(layer), False)
            self._intact = True

    @contextmanager
    def whole_pass(self, run: Collection[int] | None = None, late: bool = False):
        """Around a forward pass that runs the layers in `run` (all when None): the slots filled
        before it, its copies joined after it (but for its next-pass refills when late), and the
        slots in no known state if it raises."""
        self.begin_pass(run, late)
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
        nxt, next_pass = self._plan.refill.get(layer, (None, False))
        if nxt is None or next_pass and self._late:
            return
        event = self._copy_in(nxt)
        if next_pass:
            self._tail = event
        else:
            self._pending[nxt] = event

    def end_pass(self) -> None:
        """Compute waits for the copies made for the next pass: a pass (a captured graph) is
        whole. A pass that ran fewer layers than it said also waits for the copies it issued
        and did not use, and the next pass fills the slots afresh."""
        for event in [*self._pending.values(), *([self._tail] if self._tail is not None else [])]:
            self.device.compute_waits(event)
        self._tail = None
        self._intact = not self._pending
        self._pending.clear()

    def issues(self, run: Collection[int] | None = None, late: bool = False) -> bool:
        """Whether issued_pass does anything around such a pass (a resident draft: nothing)."""
        return late or self._plan_of(run).reads_slots

    @contextmanager
    def issued_pass(self, run: Collection[int] | None = None, late: bool = False):
        """Around issuing or replaying a pass, outside any capture: before it, a pass that reads
        a slot waits for the refills the last late pass left, and finds the slots filled afresh
        if a pass failed midway (a replayed graph runs no begin_pass); after a late pass, its
        refills for the next pass, each behind the pass's last read of its slot."""
        if self._plan_of(run).reads_slots:
            if self._refilled is not None:
                self.device.compute_waits(self._refilled)
                self._refilled = None
            self._fill()
        yield
        if late:
            for layer in self._plan_of(run).next_pass_refills():
                self._refilled = self._copy_in(layer)

    def abandon(self) -> None:
        """A pass raised midway: the slots are in no known state."""
        self._intact = False
