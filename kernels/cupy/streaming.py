"""Layers streamed from pinned host memory through a ring of VRAM slots (kernels/layer_ring.py).

A streamed layer is prepared like a resident one (weights.py), then its planes are copied
into its *image* in pinned host memory and the layer's weights become views into its slot:
the kernels that run are the same, only where their bytes come from changes. Copies run on
a stream of their own, ordered by the ring's driver (kernels/layer_ring.py RingDriver):
before a streamed layer computes, the backend's stream waits for its copy; once its kernels
are issued, the copy stream waits for them (event `freed`) and refills the slot. Every copy
and wait is an ordinary stream operation, so a decode step with its copies is captured in
one CUDA graph.

Host memory is one region for every image, pinned by cudaHostAlloc or, when a host tier
hands the backend shared memory, registered with cudaHostRegister.
"""

from __future__ import annotations

from contextlib import contextmanager

import cupy as cp
import cupyx
import numpy as np

from kernels.cupy.weights import QMatrix
from kernels.layer_ring import RingDriver, RingSchedule

ALIGN = 256  # plane offsets inside an image: 16-byte loads, whole L2 sectors
IMAGE_ALIGN = 4096  # images inside the host region: page-aligned, O_DIRECT-readable


def align(n: int, a: int) -> int:
    return -(-n // a) * a


def image_layout(matrices_nbytes: list[list[int]]) -> int:
    """Bytes of a layer image holding these planes (per matrix, per plane), each ALIGN-aligned."""
    off = 0
    for planes in matrices_nbytes:
        for n in planes:
            off = align(off, ALIGN) + n
    return align(off, ALIGN)


class LayerStreaming:
    """The streamed layers of one model: their host images, the VRAM slots, the copy stream."""

    def __init__(self, stream, schedule: RingSchedule, image_nbytes: dict[int, int], host: np.ndarray | None = None):
        self.stream, self.schedule = stream, schedule
        self.copy_stream = cp.cuda.Stream(non_blocking=True)
        self.image_nbytes = dict(image_nbytes)
        self.slot_nbytes = align(max(image_nbytes[i] for i in schedule.streamed), IMAGE_ALIGN)
        self.offsets, total = {}, 0
        for layer in schedule.streamed:
            self.offsets[layer] = total
            total = align(total + image_nbytes[layer], IMAGE_ALIGN)
        self.registered = None
        if host is None:
            host = cupyx.empty_pinned((total,), np.uint8)
        else:
            if host.nbytes < total or host.ctypes.data % IMAGE_ALIGN:
                raise ValueError(f"host region of {host.nbytes} bytes (at {host.ctypes.data:#x}): the images need "
                                 f"{total}, page-aligned")
            cp.cuda.runtime.hostRegister(host.ctypes.data, total, 0)
            self.registered = host.ctypes.data
        self.host = host
        self.slots = cp.empty((schedule.n_slots, self.slot_nbytes), cp.uint8)
        self._freed = [cp.cuda.Event(disable_timing=True) for _ in range(schedule.n_slots)]
        self.copied = {layer: cp.cuda.Event(disable_timing=True) for layer in schedule.streamed}
        self.driver = RingDriver(schedule, self)
        self.collecting: list[QMatrix] | None = None

    def image(self, layer: int) -> np.ndarray:
        off = self.offsets[layer]
        return self.host[off:off + self.image_nbytes[layer]]

    # --- load ---------------------------------------------------------------------
    @contextmanager
    def loading(self, layer: int):
        """While a streamed layer loads: its matrices are collected, then moved to its image."""
        self.collecting = []
        try:
            yield
            self._to_image(layer, self.collecting)
        finally:
            self.collecting = None

    def _to_image(self, layer: int, matrices: list[QMatrix]) -> None:
        host, slot = self.image(layer), self.slots[self.schedule.slot(layer)]
        off = 0
        for w in matrices:
            for seg in w.segments:
                views = []
                for plane in seg.planes:
                    off = align(off, ALIGN)
                    if off + plane.nbytes > len(host):
                        raise ValueError(f"layer {layer}'s planes exceed its image of {len(host)} bytes")
                    plane.data.copy_to_host_async(host[off:].ctypes.data, plane.nbytes, self.stream)
                    views.append(slot[off:off + plane.nbytes].reshape(plane.shape))
                    off += plane.nbytes
                seg.planes = views
                seg._args = None
                seg.plane_args()
        if align(off, ALIGN) != len(host):
            raise ValueError(f"layer {layer}'s planes take {off} bytes, its image {len(host)}")
        self.stream.synchronize()  # the device planes go when this returns

    # --- the device side of the ring's driver (kernels/layer_ring.py RingDriver) -------
    def copy(self, layer: int, slot: int, on_copy_queue: bool) -> cp.cuda.Event:
        stream = self.copy_stream if on_copy_queue else self.stream
        # the runtime call itself: CuPy's copy_from_host_async refuses while a stream captures
        cp.cuda.runtime.memcpyAsync(self.slots[slot].data.ptr, self.image(layer).ctypes.data,
                                    self.image_nbytes[layer], cp.cuda.runtime.memcpyHostToDevice, stream.ptr)
        event = self.copied[layer]
        event.record(stream)
        return event

    def freed(self, slot: int) -> cp.cuda.Event:
        self._freed[slot].record(self.stream)
        return self._freed[slot]

    def copy_waits(self, event) -> None:
        self.copy_stream.wait_event(event)

    def compute_waits(self, event) -> None:
        self.stream.wait_event(event)

    @property
    def nbytes(self) -> int:
        """VRAM the slots take."""
        return self.slots.nbytes

    def close(self) -> None:
        if self.registered is not None:
            cp.cuda.runtime.hostUnregister(self.registered)
            self.registered = None
