"""Layer streaming: the ring's schedule and driver on a simulated two-queue device, placement
under a budget, and on the GPU, streamed runs equal to resident ones bit for bit."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from kernels.layer_ring import RingDriver, RingSchedule
from workers.engine.placement import GIB, PROMPT_GRAPH_BYTES, ModelSizes, Placement, Rates, choose_buffers, place, \
    with_prompt_graphs
from budgets import streaming_budget


# --- the ring on a simulated device -------------------------------------------------------
class FakeDevice:
    """Two FIFO queues (compute, copy) whose operations run in a random order that respects
    each queue's order and the events waited for, as a GPU may run them. Reads check that the
    slot holds the layer the compute queue expects; copies check they never overwrite a slot
    whose next queued read wants what it holds, unless a copy queued behind brings it back (a
    draft's copies between whole passes)."""

    def __init__(self, n_slots: int, seed: int):
        self.queues = {"compute": [], "copy": []}
        self.slots = [None] * n_slots
        self.done: set[int] = set()
        self.events = 0
        self.rng = random.Random(seed)
        self.reads: list[int] = []
        self.copies: list[int] = []
        self.log: list[tuple[str, tuple]] = []  # every operation queued, for capture()

    def _push(self, queue: str, op: tuple) -> None:
        self.queues[queue].append(op)
        self.log.append((queue, op))

    def _event(self, queue: str) -> int:
        self.events += 1
        self._push(queue, ("record", self.events))
        return self.events

    def copy(self, layer, slot, on_copy_queue):
        queue = "copy" if on_copy_queue else "compute"
        self._push(queue, ("copy", layer, slot))
        return self._event(queue)

    def freed(self, slot):
        return self._event("compute")

    def copy_waits(self, event):
        self._push("copy", ("wait", event))

    def compute_waits(self, event):
        self._push("compute", ("wait", event))

    def read(self, layer, slot):
        self._push("compute", ("read", layer, slot))

    def replay(self, ops: list[tuple[str, tuple]]) -> None:
        """Operations captured from the log queued again, their events fresh (as a CUDA graph
        replays its own), and no driver code run."""
        fresh = {}
        for queue, op in ops:
            if op[0] == "record":
                self.events += 1
                fresh[op[1]] = self.events
            if op[0] in ("record", "wait"):
                op = (op[0], fresh.get(op[1], op[1]))
            self._push(queue, op)

    def run(self) -> None:
        """Drain both queues, one runnable head at a time, picked at random."""
        while any(self.queues.values()):
            ready = [q for q, ops in self.queues.items() if ops and (ops[0][0] != "wait" or ops[0][1] in self.done)]
            assert ready, f"deadlock: {self.queues}"
            op = self.queues[self.rng.choice(ready)].pop(0)
            if op[0] == "record":
                self.done.add(op[1])
            elif op[0] == "copy":
                _, layer, slot = op
                pending = [o for o in self.queues["compute"] if o[0] == "read" and o[2] == slot]
                held = self.slots[slot]
                if pending and pending[0][1] == held != layer:  # a reader still waits for what it holds
                    assert ("copy", held, slot) in self.queues["copy"], \
                        f"layer {layer} overwrote slot {slot} before layer {held} read it"
                self.slots[slot] = layer
                self.copies.append(layer)
            elif op[0] == "read":
                _, layer, slot = op
                assert self.slots[slot] == layer, f"layer {layer} read slot {slot} holding layer {self.slots[slot]}"
                self.reads.append(layer)


def run_passes(schedule: RingSchedule, n_layers: int, passes: int, seed: int, drain_each: bool = False,
               fail_at: int | None = None) -> FakeDevice:
    device = FakeDevice(schedule.n_slots, seed)
    driver = RingDriver(schedule, device)
    for p in range(passes):
        driver.begin_pass()
        try:
            for layer in range(n_layers):
                if p == fail_at and layer == n_layers // 2:
                    raise RuntimeError("a kernel failed")
                if schedule.is_streamed(layer):
                    driver.begin_layer(layer)
                    device.read(layer, schedule.slot(layer))
                    driver.end_layer(layer)
        except RuntimeError:
            driver.abandon()
            device.run()
            continue
        driver.end_pass()
        if drain_each:
            device.run()
    device.run()
    return device


@pytest.mark.parametrize("n_layers,resident,n_slots", [(8, 3, 2), (8, 3, 3), (10, 0, 4), (6, 2, 4), (5, 4, 1),
                                                       (12, 5, 2)])
@pytest.mark.parametrize("seed", range(5))
def test_ring_reads_each_layer_from_its_own_bytes_in_any_legal_order(n_layers, resident, n_slots, seed):
    streamed = tuple(range(resident, n_layers))
    schedule = RingSchedule(streamed, n_slots)
    device = run_passes(schedule, n_layers, passes=4, seed=seed, drain_each=seed % 2 == 0)
    assert device.reads == list(streamed) * 4  # every streamed layer, once a pass, in order
    assert device.copies == list(schedule.copy_order()) * 4 + list(schedule.prefetched())  # what a disk tier stages
    # one fill, then one copy per streamed layer per pass (the slots hold the first layers between passes)
    assert Counter(device.copies) == Counter(list(streamed[:n_slots]) * 5 + list(streamed[n_slots:]) * 4)


@pytest.mark.parametrize("seed", range(4))
def test_captured_partial_passes_replay_right_whatever_ran_before(seed):
    """Drafts run some layers only (the first ones, or a subset) between whole passes; each kind
    of pass is captured once and then replayed without the driver (as a CUDA graph is): every
    read still finds its layer's bytes, and every pass leaves the slots as it found them."""
    schedule = RingSchedule((1, 2, 3, 4, 5, 6, 7), 3)
    device = FakeDevice(3, seed)
    driver = RingDriver(schedule, device)
    subset = {0, 2, 5, 7}
    kinds = [None, None, range(4), None, range(6), subset, range(4), None, subset, range(2), range(6), None, None]
    captured, expected = {}, []
    for i, run in enumerate(kinds):
        key = None if run is None else frozenset(run)
        layers = [layer for layer in range(8) if run is None or layer in run]
        if key in captured:
            device.replay(captured[key])
        else:
            start = len(device.log)
            with driver.whole_pass(run):
                for layer in layers:
                    driver.begin_layer(layer)
                    if schedule.is_streamed(layer):
                        device.read(layer, schedule.slot(layer))
                    driver.end_layer(layer)
            if i > 0:  # the first pass fills the slots: an eager prefill in the engine
                captured[key] = device.log[start:]
        expected += [layer for layer in layers if schedule.is_streamed(layer)]
        if seed % 2:
            device.run()
    device.run()
    assert device.reads == expected
    assert device.slots == [1, 2, 3]


@pytest.mark.parametrize("seed", range(6))
def test_late_refills_run_beside_a_resident_draft_and_the_next_reader_of_a_slot_waits(seed):
    """Verifying passes leave their refills for the next pass to issued_pass (late), drafts of
    resident layers run beside those copies without waiting for them, and every other pass
    waits for them before it starts; each kind of pass captured once and replayed (the hooks
    around a pass run every time, outside the capture): every read finds its layer's bytes."""
    schedule = RingSchedule((1, 3, 4, 6, 7), 2)
    device = FakeDevice(2, seed)
    driver = RingDriver(schedule, device)
    resident, through_slots = {0, 2, 5}, {0, 3, 5}
    kinds = [(None, False), (None, True), (resident, False), (None, True), (resident, False), (resident, False),
             (None, True), (through_slots, False), (None, True), (None, False), (None, True), (None, True),
             (resident, False)]
    captured, expected, outstanding = {}, [], False  # outstanding: refills issued that no pass waited for
    for i, (run, late) in enumerate(kinds):
        key = (None if run is None else frozenset(run), late)
        layers = [layer for layer in range(8) if run is None or layer in run]
        assert driver.issues(run, late) == (late or run != resident)  # what a backend may skip
        start = len(device.log)
        with driver.issued_pass(run, late):
            waited = [op for queue, op in device.log[start:] if queue == "compute" and op[0] == "wait"]
            assert bool(waited) == (outstanding and run != resident)
            outstanding = outstanding and run == resident
            if key in captured:
                device.replay(captured[key])
            else:
                begin = len(device.log)
                with driver.whole_pass(run, late):
                    for layer in layers:
                        driver.begin_layer(layer)
                        if schedule.is_streamed(layer):
                            device.read(layer, schedule.slot(layer))
                        driver.end_layer(layer)
                if i > 0:
                    captured[key] = device.log[begin:]
                    if late:  # the pass itself copies only what it reads: 4, 6 and 7, as slots free
                        assert [op[1] for _, op in captured[key] if op[0] == "copy"] == [4, 6, 7]
            start = len(device.log)
        after = [op[1:] for _, op in device.log[start:] if op[0] == "copy"]
        # a late pass's refills follow it, in the order a pass that is not late makes them (the
        # order the disk tier stages)
        assert after == ([(layer, schedule.slot(layer)) for layer in schedule.prefetched()] if late else [])
        outstanding = outstanding or late
        expected += [layer for layer in layers if schedule.is_streamed(layer)]
        if seed % 2:
            device.run()
    device.run()
    assert device.reads == expected
    assert device.slots == [1, 3]


def test_a_draft_through_disk_streamed_layers_is_refused():
    """The disk tier stages images in whole passes' order: a draft may run resident layers only."""
    driver = RingDriver(RingSchedule((2, 3, 4), 2), FakeDevice(2, 0), fixed_order=True)
    with driver.whole_pass(range(2)):  # no streamed layer: no copy
        pass
    with pytest.raises(ValueError, match="disk"):
        driver.begin_pass(range(3))


def test_ring_refills_after_a_pass_that_failed_midway():
    schedule = RingSchedule((2, 3, 4, 5, 6), 2)
    device = run_passes(schedule, 7, passes=3, seed=1, fail_at=1)
    assert device.reads[-5:] == [2, 3, 4, 5, 6]  # the pass after the failure reads the right bytes


@pytest.mark.parametrize("seed", range(4))
def test_a_replayed_pass_after_one_that_failed_midway_reads_the_right_bytes(seed):
    """A pass raises midway (its slots half refilled), then a captured pass replays without
    begin_pass: issued_pass, around every pass and replay, fills the slots afresh first."""
    schedule = RingSchedule((1, 2, 4, 5, 6), 2)
    device = FakeDevice(2, seed)
    driver = RingDriver(schedule, device)

    def run(fail: bool = False) -> None:
        with driver.whole_pass():
            for layer in range(7):
                if fail and layer == 5:
                    raise RuntimeError("a kernel failed")
                driver.begin_layer(layer)
                if schedule.is_streamed(layer):
                    device.read(layer, schedule.slot(layer))
                driver.end_layer(layer)

    with driver.issued_pass():
        run()  # fills the slots (an eager first pass)
    start = len(device.log)
    with driver.issued_pass():
        run()
    captured = device.log[start:]
    with driver.issued_pass(), pytest.raises(RuntimeError):
        run(fail=True)
    device.run()
    with driver.issued_pass():
        device.replay(captured)
    device.run()
    assert device.reads[-5:] == [1, 2, 4, 5, 6]


def test_ring_schedule_slots_and_refills():
    s = RingSchedule((3, 4, 5, 6, 7), 2)
    assert [s.slot(i) for i in (3, 4, 5, 6, 7)] == [0, 1, 0, 1, 0]
    whole = s.plan()
    assert whole.first == () and not whole.partial
    assert whole.refill == {3: (5, False), 4: (6, False), 5: (7, False), 6: (4, True), 7: (3, True)}
    draft = s.plan({0, 1, 3, 6})  # slot 1's first user is layer 6: copied in as the pass starts
    assert draft.partial and draft.first == (6,) and draft.refill == {3: (None, True), 6: (4, True)}
    assert s.prefetched() == (4, 3) and s.copy_order() == (4, 3, 5, 6, 7)
    with pytest.raises(ValueError, match="slots"):
        RingSchedule((1, 2), 3)
    with pytest.raises(ValueError, match="in order"):
        RingSchedule((2, 1), 1)


# --- placement ------------------------------------------------------------------------------
def sizes(n_layers=80, layer=GIB // 2, fixed=GIB, kv_per_token=320 << 10, params=None):
    return ModelSizes(tuple([layer] * n_layers), fixed, kv_per_token, tuple([params or layer * 2] * n_layers),
                      1 << 30)


def test_a_model_that_fits_stays_resident_and_the_kv_cache_takes_the_rest():
    s = sizes(n_layers=10)
    p = place(s, 24 * GIB, GIB, None, 4096)
    assert p.tiers == ("vram",) * 10 and p.n_buffers == 0
    assert p.kv_tokens == (24 * GIB - GIB - s.fixed - 5 * GIB) // s.kv_per_token
    assert p.device_bytes <= 24 * GIB


def test_a_larger_model_streams_its_last_layers_within_the_budget():
    s = sizes()
    p = place(s, 24 * GIB, int(1.5 * GIB), 8192, 8192, Rates(link_gb_s=55.0))
    resident = p.tiers.count("vram")
    assert p.tiers == ("vram",) * resident + ("ram",) * (80 - resident)
    assert p.n_buffers == 2 and p.slot_bytes == GIB // 2
    assert p.device_bytes <= 24 * GIB < p.device_bytes + s.layers[0]  # no room for one more resident layer
    assert p.kv_tokens == 8192


def test_a_model_that_streams_keeps_its_own_embedding_table_in_host_memory():
    """Where the layers do not all fit, an embedding table of its own (not the tied head) leaves
    the device: its bytes hold a resident layer instead, and the plan counts them nowhere on
    the device. A tied table is the head, which every pass reads: it stays. A model that fits
    only without its table keeps every layer resident; one that fits whole keeps the table,
    and is not moved for the prompt graphs' share either."""
    apart = replace(sizes(), embed_bytes=GIB // 2, embed_apart=True)  # a table the size of a layer
    tied = replace(apart, embed_apart=False)
    reserve, budget = int(1.5 * GIB), 24 * GIB
    moved, kept = (place(s, budget, reserve, 8192, 8192) for s in (apart, tied))
    assert moved.embed_on_host and not kept.embed_on_host
    assert moved.tiers.count("vram") == kept.tiers.count("vram") + 1
    assert moved.device_fixed == apart.fixed - GIB // 2 and kept.device_fixed == tied.fixed
    assert moved.device_bytes == reserve + moved.device_fixed + apart.kv_bytes(8192) + 2 * (GIB // 2) \
        + moved.bytes_in("vram") <= budget < moved.device_bytes + GIB // 2
    assert moved.as_dict()["embed_on_host"] and "embed_on_host" in kept.as_dict()

    small = replace(sizes(n_layers=10), embed_bytes=GIB // 2, embed_apart=True)
    whole = GIB + small.fixed + 5 * GIB + small.kv_bytes(8192)
    fits = place(small, whole, GIB, 8192, 8192)
    assert fits.tiers == ("vram",) * 10 and not fits.embed_on_host
    squeezed = place(small, whole - 1, GIB, 8192, 8192)
    assert squeezed.tiers == ("vram",) * 10 and squeezed.n_buffers == 0 and squeezed.embed_on_host
    assert squeezed.device_bytes == whole - GIB // 2
    # room for the prompt graphs only with the table off the device: the table stays, no graphs granted
    assert with_prompt_graphs(fits, 8192, 8192) == fits
    roomy = place(small, whole + PROMPT_GRAPH_BYTES, GIB, 8192, 8192)
    granted = with_prompt_graphs(roomy, 8192, 8192)
    assert granted.prompt_graph_bytes == PROMPT_GRAPH_BYTES and not granted.embed_on_host


def test_host_ram_short_puts_the_last_layers_on_disk():
    p = place(sizes(), 24 * GIB, GIB, 8192, 8192, host_ram=10 * GIB)
    assert p.bytes_in("ram") <= 10 * GIB < p.bytes_in("ram") + GIB // 2
    assert p.tiers[-1] == "disk" and "ram" not in p.tiers[p.tiers.index("disk"):]


def test_a_resident_order_keeps_its_first_layers_resident_and_streams_the_rest_in_order():
    s = sizes(n_layers=10)
    budget = place(s, None, GIB, 8192, 8192).device_bytes - 6 * s.layers[0] + 2 * s.layers[0]  # room for 4 + 2 slots
    order = (7, 2, 9, 4, 0, 1, 3, 5, 6, 8)
    p = place(s, budget, GIB, 8192, 8192, host_ram=3 * s.layers[0], resident_order=order)
    assert [i for i, t in enumerate(p.tiers) if t == "vram"] == [2, 4, 7, 9]
    assert p.streamed == (0, 1, 3, 5, 6, 8) and p.n_buffers == 2
    assert [p.tiers[i] for i in p.streamed] == ["ram"] * 3 + ["disk"] * 3  # the stream reads them in order
    assert place(s, budget, GIB, 8192, 8192).tiers[:4] == ("vram",) * 4  # the first layers by default
    for bad in ((0, 1), tuple(range(9)) + (0,)):
        with pytest.raises(ValueError, match="resident order"):
            place(s, budget, GIB, 8192, 8192, resident_order=bad)


def test_a_drafts_predicted_time_is_its_layers_and_the_head():
    s = replace(sizes(), head_bytes=GIB)
    p = place(s, 24 * GIB, GIB, 8192, 8192)
    rates = Rates(link_gb_s=50.0, weight_read_gb_s=1000.0)
    resident, layer = tuple(i for i, t in enumerate(p.tiers) if t == "vram"), s.layers[0]
    assert 0 < len(resident) < 80
    assert p.step_seconds(1, rates, resident) == pytest.approx((GIB + len(resident) * layer) / 1e12, rel=1e-9)
    whole = (GIB + len(resident) * layer) / 1e12 + (80 - len(resident)) * layer / 50e9  # streamed: the copy
    assert p.step_seconds(1, rates) == pytest.approx(whole, rel=1e-9)
    assert p.step_seconds(1, rates, (0, 79)) == pytest.approx((GIB + layer) / 1e12 + layer / 50e9, rel=1e-9)


def test_a_budget_below_the_minimum_names_it():
    s = sizes()
    reserve = GIB
    minimum = reserve + s.fixed + 8192 * s.kv_per_token + 2 * s.layers[0]
    with pytest.raises(ValueError, match=f"minimum is {minimum / GIB:.2f} GiB"):
        place(s, minimum - 1, reserve, 8192, 8192)
    assert place(s, minimum, reserve, 8192, 8192).tiers.count("vram") == 0


def test_buffers_follow_copy_against_compute():
    assert choose_buffers(GIB // 2, GIB // 2, Rates(link_gb_s=55, weight_read_gb_s=3000))[0] == 2  # link-bound
    n, why = choose_buffers(GIB // 2, GIB // 2, Rates(link_gb_s=3000, weight_read_gb_s=3000))
    assert n == 2 and "hide" in why
    assert choose_buffers(GIB // 2, GIB // 2, Rates(link_gb_s=1000, weight_read_gb_s=3000))[0] == 4
    assert place(sizes(), 24 * GIB, GIB, 8192, 8192, n_buffers=3).n_buffers == 3


def test_prediction_is_the_streamed_bytes_over_the_link_at_batch_one():
    s = sizes()
    p = place(s, 24 * GIB, GIB, 8192, 8192, Rates(link_gb_s=50))
    # compute free: the link alone
    rates = Rates(link_gb_s=50, weight_read_gb_s=1e9, prompt_tflops=1e9, layer_floor_s=0)
    streamed = sum(n for n, t in zip(s.layers, p.tiers) if t != "vram")
    assert p.predict(rates)["decode_tok_s"] == pytest.approx(50e9 / streamed, rel=1e-6)
    slow = Rates(link_gb_s=50, weight_read_gb_s=1e9, prompt_tflops=1e-3)  # compute-bound prompt
    assert p.step_seconds(512, slow) == pytest.approx(2 * (sum(s.layer_params) + s.head_params) * 512 / 1e9, rel=1e-6)


def test_a_pass_with_disk_layers_takes_at_least_their_read():
    s = sizes()
    p = place(s, 24 * GIB, GIB, 8192, 8192, host_ram=10 * GIB)
    rates = Rates(link_gb_s=50, disk_gb_s=2, weight_read_gb_s=1e9, prompt_tflops=1e9)
    assert p.step_seconds(1, rates) == pytest.approx(p.bytes_in("disk") / 2e9, rel=1e-6)


def test_placement_serializes():
    p = place(sizes(), 24 * GIB, GIB, 8192, 8192)
    d = p.as_dict()
    assert d["tiers"].count("vram") == p.tiers.count("vram") and d["device_bytes"] == p.device_bytes
    assert isinstance(p, Placement)


# --- streamed equals resident: on the CPU (copies done at once) and on the GPU ---------------
# (the six-layer models: conftest.py's deep_model and deep_qwen2)



def test_the_budget_counts_the_context_the_backend_measured(deep_model):
    """A device whose context takes more than the estimate: the placement's reserve and the
    pool's limit count what the backend measured outside the pool (and what loads after it)."""
    from kernels.numpy_backend import NumpyBackend
    from workers.engine.engine import Engine
    from workers.engine.placement import CONTEXT_BYTES, LATE_RUNTIME_BYTES, context_bytes

    class MeasuredDevice(NumpyBackend):
        measured = 2 * GIB
        limit = None

        def outside_pool_bytes(self):
            return self.measured

        def limit_device_memory(self, nbytes):
            self.limit = nbytes

    assert context_bytes(None) == CONTEXT_BYTES and context_bytes(0) == CONTEXT_BYTES
    estimated = Engine(deep_model, vram_budget=8 * GIB)
    ops = MeasuredDevice()
    measured = Engine(deep_model, backend=ops, vram_budget=8 * GIB)
    context = 2 * GIB + LATE_RUNTIME_BYTES
    assert measured.placement.reserve - estimated.placement.reserve == context - CONTEXT_BYTES
    assert ops.limit == 8 * GIB - context

BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,resident_layers,n_buffers,ram_layers", [
    ("llama", 2, 2, None), ("llama", 0, 3, None), ("llama", 3, 1, None), ("llama", 1, 4, None),
    ("llama", 2, 2, 1), ("llama", 1, 3, 0), ("qwen2", 2, 2, None), ("qwen2", 1, 2, 2)])
def test_streamed_runs_equal_the_resident_run_bit_for_bit(request, tmp_path, backend, arch, resident_layers,
                                                          n_buffers, ram_layers):
    """ram_layers: how many streamed layers host RAM holds; the others come from the disk tier."""
    from drive import forward
    from workers.engine.engine import Engine, Sequence
    from workers.memory.disk_stream import DiskStream

    if backend == "cupy":
        request.getfixturevalue("cuda_device")
    deep_model = request.getfixturevalue("deep_model" if arch == "llama" else "deep_qwen2")
    # logits for every row of a 100-token prompt, which the runtime reserve must count
    kw = dict(backend=backend, max_context=256, kv_cache_tokens=1024, max_logit_rows=256)
    resident = Engine(deep_model, **kw)
    layers = resident.placement.sizes.layers
    host_ram = None if ram_layers is None else sum(layers[resident_layers:resident_layers + ram_layers])
    streamed = Engine(deep_model, vram_budget=streaming_budget(resident.placement, resident_layers, n_buffers),
                      n_buffers=n_buffers, host_ram=host_ram,
                      disk_open=lambda sizes: DiskStream(tmp_path / "deep.images", sizes, slots=2), **kw)
    assert streamed.placement.tiers.count("vram") == resident_layers
    assert streamed.placement.prompt_graph_bytes == 0  # a streamed model's prompts run eagerly
    # the llama's embedding table is its own (host memory when streaming); qwen2's is its tied head
    assert streamed.placement.embed_on_host == (arch == "llama") and not resident.placement.embed_on_host
    assert streamed.placement.n_buffers == n_buffers
    if ram_layers is not None:
        assert streamed.placement.tiers.count("ram") == ram_layers and "disk" in streamed.placement.tiers
    rng = np.random.default_rng(resident_layers)
    prompts = [rng.integers(10, 3000, n).tolist() for n in (100, 7, 33)]  # a prompt past the tensor-core width
    outs = []
    for engine in (resident, streamed):
        seqs = [Sequence(list(p)) for p in prompts]
        logits = [forward(engine, [(s, len(s.token_ids))], all_logits=True) for s in seqs]  # prefill, eager
        for s in seqs:
            s.token_ids.append(int(np.argmax(logits[0][-1])))
        batched = forward(engine, [(s, 1) for s in seqs])  # 3 sequences: the tensor-core step
        for s, row in zip(seqs, batched):
            s.token_ids.append(int(np.argmax(row)))
        steps = engine.greedy_decode(seqs[:1])  # 1 sequence: the captured graph, fed on the device
        ids = []
        for _ in range(12):
            ids.append(next(steps).tolist())
            seqs[0].token_ids.append(ids[-1][0])
        steps.close()
        outs.append((logits, batched, ids))
    (la, ba, ia), (lb, bb, ib) = outs
    for a, b in zip(la, lb):
        assert np.array_equal(a, b)
    assert np.array_equal(ba, bb)
    assert ia == ib


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("draft", [dict(drafter="early-exit", depth=4), dict(drafter="skip", skip=(2, 4))],
                         ids=["early-exit", "skip"])
def test_a_draft_through_streamed_layers_gives_the_plain_tokens(request, deep_model, backend, draft):
    """Drafts that stop inside the streamed layers (passes ending early), or pass over streamed
    layers (the ring copies only the layers run), between full passes; on the GPU each kind of
    pass is a captured graph replayed whatever ran before it."""
    from workers.engine.engine import Engine
    from workers.engine.sampling import SamplingParams
    from workers.engine.speculation import Speculation

    if backend == "cupy":
        request.getfixturevalue("cuda_device")
    kw = dict(backend=backend, max_context=256, kv_cache_tokens=1024)
    resident = Engine(deep_model, **kw)
    streamed = Engine(deep_model, vram_budget=streaming_budget(resident.placement, 1, 2), n_buffers=2, **kw)
    assert streamed.placement.tiers.count("vram") == 1
    assert streamed.resident_layers == (0,) and resident.resident_layers == tuple(range(6))
    assert Speculation(3, "early-exit").drafters(6, streamed.resident_layers)["early-exit"] == (0,)  # the default draft
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    prompt = [5, 17, 99, 4, 23, 5, 17, 99]
    plain = [e.token_id for e in resident.generate(prompt, params)]
    assert [e.token_id for e in streamed.generate(prompt, params, Speculation(3, **draft))] == plain
    assert streamed.last_speculation.passes > 0


def test_a_draft_that_skips_some_layers_streamed_from_disk_is_left_out(deep_model, tmp_path, monkeypatch):
    """Layers 1-5 streamed, 3-5 of them from disk: a skip draft running 3 and 5 but not 4
    cannot be served by the disk tier's whole-pass order. Named, it is refused before anything
    runs; under auto it is left out (early exit through resident layer 0 and lookup stay), and
    auto's greedy tokens are plain decoding's."""
    from workers.engine.engine import Engine
    from workers.engine.sampling import SamplingParams
    from workers.engine.speculation import Speculation
    from workers.memory.disk_stream import DiskStream

    monkeypatch.setenv("NTR_HOME", str(tmp_path))
    kw = dict(max_context=256, kv_cache_tokens=1024)
    resident = Engine(deep_model, **kw)
    layers = resident.placement.sizes.layers
    engine = Engine(deep_model, vram_budget=streaming_budget(resident.placement, 1, 2), n_buffers=2,
                    host_ram=sum(layers[1:3]), disk_open=lambda sizes: DiskStream(tmp_path / "d.images", sizes), **kw)
    assert engine.placement.tiers == ("vram", "ram", "ram", "disk", "disk", "disk")
    with pytest.raises(ValueError, match="the skip drafter runs some of the layers streamed from disk and skips"):
        engine.drafters(Speculation(3, "skip", skip=(1, 2, 4)))
    auto = Speculation(None, "auto", skip=(1, 2, 4), tree=False)
    assert engine.drafters(auto) == {"lookup": None, "early-exit": (0,)}
    assert engine.drafters(Speculation(3, "skip", skip=(1, 2, 3, 4, 5))) == {"skip": (0,)}  # no streamed layer: it stands
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompt = [5, 17, 99, 4, 23, 5, 17, 99]
    assert [e.token_id for e in engine.generate(prompt, params, auto)] == \
        [e.token_id for e in resident.generate(prompt, params)]


def write_skip_file(tmp_path):
    """A calibrate-skip file for the 6-layer deep model: layers 4, 1, 2 skipped, in that order."""
    path = tmp_path / "skip.json"
    path.write_text(json.dumps({"n_layers": 6, "skip": [1, 2, 4], "order": [
        {"layer": 4, "agreement": 0.9, "kl": 0.1}, {"layer": 1, "agreement": 0.8, "kl": 0.2},
        {"layer": 2, "agreement": 0.7, "kl": 0.3}]}))
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skip_sets_draft_stays_resident_and_drafts_past_disk_streamed_layers(request, tmp_path, deep_model,
                                                                               backend):
    """The skip set's residency order keeps its draft's layers resident, so the skip drafter
    runs where every streamed layer comes from the disk tier (which refuses a draft that
    streams); the streamed engine's logits equal the resident one's bit for bit."""
    from drive import forward
    from workers.engine.draft_policy import DraftPolicy
    from workers.engine.engine import Engine, Sequence
    from workers.engine.sampling import SamplingParams
    from workers.engine.skip_calibration import residency_order
    from workers.engine.speculation import Speculation
    from workers.memory.disk_stream import DiskStream

    if backend == "cupy":
        request.getfixturevalue("cuda_device")
    order = residency_order(write_skip_file(tmp_path), deep_model)
    assert order == (0, 3, 5, 2, 1, 4)
    kw = dict(backend=backend, max_context=256, kv_cache_tokens=1024)
    resident = Engine(deep_model, **kw)
    streamed = Engine(deep_model, vram_budget=streaming_budget(resident.placement, (0, 3, 5), 2), n_buffers=2,
                      host_ram=0, resident_order=order,
                      disk_open=lambda sizes: DiskStream(tmp_path / "deep.images", sizes, slots=2), **kw)
    assert streamed.resident_layers == (0, 3, 5) and streamed.placement.streamed == (1, 2, 4)
    assert {streamed.placement.tiers[i] for i in (1, 2, 4)} == {"disk"}
    prompt = [5, 17, 99, 4, 23, 5, 17, 99]
    logits = [forward(e, [(Sequence(list(prompt)), len(prompt))], all_logits=True) for e in (resident, streamed)]
    assert np.array_equal(*logits)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    plain = [e.token_id for e in resident.generate(prompt, params)]
    assert [e.token_id for e in streamed.generate(prompt, params, Speculation(3, "skip", skip=(1, 2, 4)))] == plain
    assert streamed.last_speculation.passes > 0
    # the policy's cost of a draft token: its layers' and the head's bytes over a step's when all
    # is resident and every layer reads longer than the floor of its launches; this model's
    # layers are far below that floor, so each costs the floor; far less beside streamed
    # layers, whose copies a step waits for
    sizes = resident.placement.sizes
    share = (sum(sizes.layers[i] for i in (0, 3, 5)) + sizes.head_bytes) / (sum(sizes.layers) + sizes.head_bytes)
    skip_only = Speculation(3, "skip", skip=(1, 2, 4))  # a fixed k: a policy whatever its costs
    floor = resident.rates.layer_floor_s
    assert max(sizes.layers) / (resident.rates.weight_read_gb_s * 1e9) < floor
    head = resident.placement.step_seconds(1, resident.rates, layers=())
    assert DraftPolicy.for_engine(resident, skip_only).draft_cost["skip"] == pytest.approx(
        (head + 3 * floor) / (head + 6 * floor), rel=1e-6)
    resident.rates = replace(resident.rates, layer_floor_s=0.0)
    assert DraftPolicy.for_engine(resident, skip_only).draft_cost["skip"] == pytest.approx(share, rel=1e-6)
    assert DraftPolicy.for_engine(streamed, skip_only).draft_cost["skip"] < share / 10
    with pytest.raises(ValueError, match="disk"):  # the same drafter, the first layers resident
        first = Engine(deep_model, vram_budget=streaming_budget(resident.placement, 3, 2), n_buffers=2, host_ram=0,
                       disk_open=lambda sizes: DiskStream(tmp_path / "first.images", sizes, slots=2), **kw)
        list(first.generate(prompt, params, Speculation(3, "skip", skip=(1, 2, 4))))


def test_ntr_plan_keeps_a_skip_sets_draft_resident_as_generate_does(tmp_path, capsys, deep_model):
    from cluster.cli import main
    from kernels.cupy.planes import CupySizes
    from workers.engine.placement import plan_model
    from workers.model.config import ModelConfig
    from workers.model.gguf_file import GGUFFile

    with GGUFFile(deep_model) as g:
        everything = plan_model(g, ModelConfig.from_gguf(g), CupySizes, None, 256, 256)
    plan = ["plan", "--model", str(deep_model), "--vram-gb", repr(streaming_budget(everything, 3, 2, 256) / GIB),
            "--kv-tokens", "256", "--ctx", "256", "--seqs", "32", "--n-buffers", "2", "--link-gb-s", "25", "--json"]
    for extra, want in (([], (0, 1, 2)), (["--skip-set", str(write_skip_file(tmp_path))], (0, 3, 5))):
        assert main(plan + extra) == 0
        tiers = json.loads(capsys.readouterr().out)["placement"]["tiers"]
        assert tuple(i for i, t in enumerate(tiers) if t == "vram") == want


@pytest.mark.gpu
def test_streamed_images_live_in_pinned_host_memory_and_slots_are_the_budgeted_size(cuda_device, deep_model):
    from workers.engine.engine import Engine

    kw = dict(backend="cupy", max_context=256, kv_cache_tokens=1024)
    resident = Engine(deep_model, **kw)
    engine = Engine(deep_model, vram_budget=streaming_budget(resident.placement, 2, 2), n_buffers=2, **kw)
    s = engine.ops.streaming
    assert s.slots.shape[0] == 2 and s.slot_nbytes <= engine.placement.slot_bytes
    assert sum(s.image_nbytes.values()) <= engine.placement.bytes_in("ram")


# --- the node's host tier: regions keyed by what they hold ---
def test_replicas_that_stream_other_layers_never_share_a_host_region(deep_model):
    """Two engines of one model and one budget on one node's HostTier, streaming other layers
    (another resident order) whose images are as large together: each gets a region of its
    own, so the first still generates the resident engine's tokens after the second loaded.
    (Keyed by the file and the size alone, they shared one, and the second's images took the
    first's places.)"""
    import ray

    from serving_cluster import local_ray
    from workers.engine.engine import Engine
    from workers.engine.sampling import SamplingParams
    from workers.host_tier import host_tier_for_node
    from workers.node_tiers import NodeTiers

    kw = dict(max_context=256, kv_cache_tokens=1024)
    resident = Engine(deep_model, **kw)
    budget = streaming_budget(resident.placement, 2, 2)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ids = resident.prompt_ids("The quick brown fox")

    def tokens(engine):
        return [e.token_id for e in engine.generate(ids, params)]

    before = set(os.listdir("/dev/shm"))
    try:
        with local_ray(num_cpus=2):
            first = Engine(deep_model, vram_budget=budget, n_buffers=2, host_alloc=NodeTiers(deep_model).host_alloc, **kw)
            second = Engine(deep_model, vram_budget=budget, n_buffers=2, resident_order=(4, 5, 0, 1, 2, 3),
                            host_alloc=NodeTiers(deep_model).host_alloc, **kw)
            assert first.placement.streamed == (2, 3, 4, 5) and second.placement.streamed == (0, 1, 2, 3)
            assert first.ops.streaming.host_nbytes == second.ops.streaming.host_nbytes
            assert tokens(first) == tokens(second) == tokens(resident)
            assert ray.get(host_tier_for_node().stats.remote())["regions"] == 2
    finally:
        for name in set(os.listdir("/dev/shm")) - before:
            if name.startswith("ntr-host-"):  # a stopped cluster kills its HostTier before its atexit
                os.unlink(os.path.join("/dev/shm", name))


# --- served: a Ray Serve replica under a budget, its layers in the node's host and disk tiers ---
def test_a_served_replica_streams_through_the_node_tiers(deep_model, tmp_path):
    """`ntr serve` on a config whose budget leaves 2 of 6 layers resident and whose host RAM
    holds 2 of the 4 streamed ones (the rest from the DiskTier): HTTP and gRPC answer what the
    resident engine generates."""
    import json
    import urllib.request

    import grpc

    from proto import generation_pb2 as pb
    from proto import generation_pb2_grpc as pb_grpc
    from serving_cluster import dev_config, ray_cluster, served_app
    from workers.engine.engine import Engine
    from workers.engine.sampling import SamplingParams

    resident = Engine(deep_model, max_context=256, kv_cache_tokens=1024, max_batch_tokens=256, max_logit_rows=32)
    layers = resident.placement.sizes.layers
    prompt, n = "The quick brown fox", 12
    expected = "".join(e.text for e in resident.generate(resident.prompt_ids(prompt),
                                                          SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
    budget = streaming_budget(resident.placement, 2, 2)
    config, http_port, grpc_port = dev_config(
        tmp_path, deep_model, max_context=256, kv_cache_gb=1024 * resident.placement.sizes.kv_per_token / GIB,
        vram_budget_gb=budget / GIB, host_ram_gb=sum(layers[2:4]) / GIB, n_buffers=2, max_batch_tokens=256)
    before = set(os.listdir("/dev/shm"))
    try:
        with ray_cluster() as cluster, served_app(cluster, config, http_port) as url:
            body = json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}).encode()
            request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as r:
                assert json.load(r)["choices"][0]["text"] == expected
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                reply = pb_grpc.GenerationStub(channel).Generate(
                    pb.GenerateRequest(prompt=prompt, max_tokens=n, temperature=0, ignore_eos=True), timeout=300)
            assert reply.text == expected
            made = set(os.listdir("/dev/shm")) - before
            assert len([f for f in made if f.startswith("ntr-host-")]) == 1  # the RAM layers: the HostTier's region
            assert len([f for f in made if f.startswith("ntr-stage-")]) == 1  # the disk layers: a DiskTier's ring
    finally:
        for name in set(os.listdir("/dev/shm")) - before:
            if name.startswith("ntr-"):  # a stopped cluster kills its actors before their atexit
                os.unlink(os.path.join("/dev/shm", name))
