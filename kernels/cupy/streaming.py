"""Layers streamed from pinned host memory through a ring of VRAM slots (kernels/layer_ring.py).

A streamed layer is prepared like a resident one (weights.py) but in its slot, so that
loading it takes no device memory of its own; then its planes are copied into its *image* in
pinned host memory and the layer's weights stay views into its slot:
the kernels that run are the same, only where their bytes come from changes. Copies run on
a stream of their own, ordered by the ring's driver (kernels/layer_ring.py RingDriver):
before a streamed layer computes, the backend's stream waits for its copy; once its kernels
are issued, the copy stream waits for them (event `freed`) and refills the slot. Every copy
and wait is an ordinary stream operation, so a decode step with its copies is captured in
one CUDA graph.

Where the images live is kernels/layer_images.py's: the RAM region is pinned by
cudaHostAlloc or, when a host tier hands the backend shared memory, registered with
cudaHostRegister; the disk tier's staging memory is registered too.
"""

from __future__ import annotations

from contextlib import contextmanager

import cupy as cp
import cupyx
import numpy as np

from kernels.layer_images import LayerImages, align
from kernels.layer_ring import RingSchedule

ALIGN = 256  # plane offsets inside an image: 16-byte loads, whole L2 sectors


def image_layout(matrices_nbytes: list[list[int]]) -> int:
    """Bytes of a layer image holding these planes (per matrix, per plane), each ALIGN-aligned."""
    off = 0
    for planes in matrices_nbytes:
        for n in planes:
            off = align(off, ALIGN) + n
    return align(off, ALIGN)


class LayerStreaming(LayerImages):
    """The streamed layers of one model: their host images, the VRAM slots, the copy stream.
    A copy from the disk tier waits on the host for its image, so those passes are not
    captured (the backend turns graphs off)."""

    def __init__(self, stream, schedule: RingSchedule, image_nbytes: dict[int, int], disk_layers=(),
                 host_alloc=None, disk_open=None, content: str = ""):
        super().__init__(schedule, image_nbytes, disk_layers, host_alloc, disk_open,
                         new_host=lambda n: cupyx.empty_pinned((n,), np.uint8), content=content)
        self.stream = stream
        self.copy_stream = cp.cuda.Stream(non_blocking=True)
        if self.shared and self.host_nbytes:
            self.pin(self.host[:self.host_nbytes])
        self._staged: list[tuple[cp.cuda.Event, int]] = []  # disk copies in flight, with their staging slots
        self.slots = cp.empty((schedule.n_slots, self.slot_nbytes), cp.uint8)
        self._freed = [cp.cuda.Event(disable_timing=True) for _ in range(schedule.n_slots)]
        self.copied = {layer: cp.cuda.Event(disable_timing=True) for layer in schedule.streamed}
        self.alloc = None  # while a layer loads: its planes' places in its slot, as its image lays them out

    def pin(self, host: np.ndarray) -> None:  # registered for the process's life
        cp.cuda.runtime.hostRegister(host.ctypes.data, host.nbytes, 0)

    # --- load ---------------------------------------------------------------------
    @contextmanager
    def loading(self, layer: int):
        """While a streamed layer loads, its planes are made in its slot (`alloc`), each at the
        offset its image gives it (`image_layout`'s walk); then the slot's bytes are the image."""
        slot, off = self.slots[self.schedule.slot(layer)], 0

        def alloc(shape: tuple[int, int]) -> cp.ndarray:
            nonlocal off
            off = align(off, ALIGN)
            n = shape[0] * shape[1]
            if off + n > slot.nbytes:
                raise ValueError(f"layer {layer}'s planes exceed its slot of {slot.nbytes} bytes")
            plane = slot[off:off + n].reshape(shape)
            plane.fill(0)
            off += n
            return plane

        self.alloc = alloc
        try:
            yield
        finally:
            self.alloc = None
        host = self.image(layer)
        if align(off, ALIGN) != len(host):
            raise ValueError(f"layer {layer}'s planes take {off} bytes, its image {len(host)}")
        slot[:len(host)].data.copy_to_host_async(host.ctypes.data, len(host), self.stream)
        self.stream.synchronize()  # the slot is refilled once the ring starts

    # --- the device side of the ring's driver (kernels/layer_ring.py RingDriver) -------
    def copy(self, layer: int, slot: int, on_copy_queue: bool) -> cp.cuda.Event:
        stream = self.copy_stream if on_copy_queue else self.stream
        if layer in self.disk_layers:
            return self._copy_staged(layer, slot, stream)
        # the runtime call itself: CuPy's copy_from_host_async refuses while a stream captures
        cp.cuda.runtime.memcpyAsync(self.slots[slot].data.ptr, self.image(layer).ctypes.data,
                                    self.image_nbytes[layer], cp.cuda.runtime.memcpyHostToDevice, stream.ptr)
        event = self.copied[layer]
        event.record(stream)
        return event

    def _copy_staged(self, layer: int, slot: int, stream) -> cp.cuda.Event:
        """From the disk tier's staging ring; its slot goes back once the copy is done."""
        while self._staged and (self._staged[0][0].done or len(self._staged) == self.disk.slots):
            event, staged = self._staged.pop(0)
            event.synchronize()
            self.disk.release(staged)
        staged, view = self.acquire_staged(layer)
        cp.cuda.runtime.memcpyAsync(self.slots[slot].data.ptr, view.ctypes.data, self.image_nbytes[layer],
                                    cp.cuda.runtime.memcpyHostToDevice, stream.ptr)
        event = cp.cuda.Event(disable_timing=True)
        event.record(stream)
        self._staged.append((event, staged))
        return event

    def freed(self, slot: int) -> cp.cuda.Event:
        self._freed[slot].record(self.stream)
        return self._freed[slot]

    def copy_waits(self, event) -> None:
        self.copy_stream.wait_event(event)

    def compute_waits(self, event) -> None:
        self.stream.wait_event(event)
