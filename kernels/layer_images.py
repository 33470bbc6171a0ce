"""Where streamed layers' images live on the host, for any backend that streams.

A streamed layer's image is its prepared weights' bytes, as the backend lays them out. The
images of the layers host RAM holds sit in one region (host_alloc(nbytes, content), e.g. the node's
HostTier shared memory, or the backend's own memory), 4096-aligned; the others go to the
disk tier that disk_open({layer: nbytes}) opens (workers/memory/disk_stream.py): written at
load, then staged back in the schedule's copy order (kernels/layer_ring.py `copy_order`).
"""

from __future__ import annotations

import numpy as np

from kernels.layer_ring import RingDriver, RingSchedule

IMAGE_ALIGN = 4096  # images inside the host region: page-aligned (pinning, O_DIRECT)


def align(n: int, a: int) -> int:
    return -(-n // a) * a


def tensor_types(backend: str, layer_tensors: dict[int, list[list]]) -> str:
    """What the images of these layers are made of beyond their sizes: the backend that lays
    them out, each tensor's name and type (a requantized one's new type)."""
    return ";".join([backend] + [f"{t.name}:{t.qtype.name}" for i in sorted(layer_tensors)
                                 for matrix in layer_tensors[i] for t in matrix])


class LayerImages:
    def __init__(self, schedule: RingSchedule, image_nbytes: dict[int, int], disk_layers=(), host_alloc=None,
                 disk_open=None, new_host=lambda n: np.empty(n, np.uint8), content: str = ""):
        self.schedule = schedule
        self.image_nbytes = dict(image_nbytes)
        self.slot_nbytes = align(max(image_nbytes[i] for i in schedule.streamed), IMAGE_ALIGN)
        self.disk_layers = frozenset(disk_layers)
        self.offsets, total = {}, 0
        for layer in schedule.streamed:
            if layer not in self.disk_layers:
                self.offsets[layer] = total
                total = align(total + image_nbytes[layer], IMAGE_ALIGN)
        self.host_nbytes = total
        self.shared = host_alloc is not None  # memory of someone else's, which a GPU backend registers
        # a shared region is found by what it holds: two users of one model whose images differ
        # (other layers streamed, another backend) must not share one, though its size may match
        layout = ";".join(f"{layer}@{off}+{image_nbytes[layer]}" for layer, off in self.offsets.items())
        self.host = host_alloc(total, f"{content}|{layout}") if self.shared else new_host(max(total, 1))
        if self.host.nbytes < total or self.shared and self.host.ctypes.data % IMAGE_ALIGN:
            raise ValueError(f"host memory of {self.host.nbytes} bytes at {self.host.ctypes.data:#x}: {total} are "
                             "needed, page-aligned")
        self.disk = None
        if self.disk_layers:
            if disk_open is None:
                raise ValueError(f"layers {sorted(self.disk_layers)} stream from disk, and no disk tier was given")
            self.disk = disk_open({i: image_nbytes[i] for i in schedule.streamed if i in self.disk_layers})
        # the subclass is the device the driver issues copies and waits on
        self.driver = RingDriver(schedule, self, fixed_order=bool(self.disk_layers))

    def image(self, layer: int) -> np.ndarray:
        """Where layer's image is (a RAM layer) or is written at load (a disk layer)."""
        if layer in self.disk_layers:
            return self.disk.image(layer)
        off = self.offsets[layer]
        return self.host[off:off + self.image_nbytes[layer]]

    def acquire_staged(self, layer: int) -> tuple[int, np.ndarray]:
        """A disk layer's image from the disk tier's staging ring (its slot, a view), the reader
        started at the first copy, when every image is written."""
        if self.disk.ring is None:
            self.pin(self.disk.start([i for i in self.schedule.copy_order() if i in self.disk_layers]))
        return self.disk.acquire(layer)

    def pin(self, host: np.ndarray) -> None:
        """Host memory someone else allocated (the host tier's region, the disk tier's staging
        ring), which copies read: a GPU backend pins it."""
