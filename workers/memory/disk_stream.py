"""The ComputeWorker's side of the disk tier: the image file its disk layers are written to
at load, then the staging ring it copies them from on every pass.

The backend (kernels/cupy/streaming.py) writes each disk layer's image through `image()`
while the model loads, calls `start(order)` once before the first pass (order: the disk
layers in the order the passes copy them, kernels/layer_ring.py `copy_order`), registers
the returned staging memory as pinned, and then for every copy `acquire(layer)` -> copy ->
`release(slot)` once the copy is done, oldest first. The reader runs in a thread here, or
in a DiskTier actor when `launch` starts one (workers/disk_tier.py).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np

from workers.memory.disk_reader import DiskReader
from workers.memory.image_file import ImageFile, align_up
from workers.memory.staging_ring import StagingRing
from workers.model.store import home as ntr_home

ACQUIRE_TIMEOUT_S = 300.0  # a layer late by this much means the reader is gone


def image_path(model_path: str | os.PathLike, tag: str = "") -> Path:
    """Where this process writes a model's disk layers: NTR_HOME/images/<model>-<pid><tag>.images
    (the file is unlinked as soon as the reader holds it open); tag: one user's of several in
    this process (a pipeline stage's)."""
    where = ntr_home() / "images"
    where.mkdir(parents=True, exist_ok=True)
    return where / f"{Path(model_path).stem}-{os.getpid()}{tag}.images"


class DiskStream:
    def __init__(self, path: str | os.PathLike, sizes: dict[int, int], slots: int = 4,
                 launch: Callable[[str, list[int], int, int], str] | None = None):
        self.file = ImageFile.create(path, list(sizes.items()))
        self.launch = launch
        self.slots, self.slot_bytes = slots, align_up(max(sizes.values()))
        self._images: dict[int, np.ndarray] | None = self.file.map()
        self.ring: StagingRing | None = None
        self.reader: DiskReader | None = None

    def image(self, layer: int) -> np.ndarray:
        """Where layer's image is written while the model loads."""
        if self._images is None:
            raise RuntimeError("the disk images are written before start()")
        return self._images[layer]

    def start(self, order: list[int]) -> np.ndarray:
        """Stage the images in `order`, over and over: a reader thread here, or the DiskTier
        that launch(image_path, order, slots, slot_bytes) starts (it returns the ring's name).
        Returns the staging memory, page-aligned, for the caller to pin."""
        self._images = None  # the mapping goes: what it wrote is in the page cache, which a direct read writes back first
        if self.launch is None:
            self.ring = StagingRing.create(f"ntr-stage-{os.getpid()}-{secrets.token_hex(4)}", self.slots,
                                           self.slot_bytes)
            self.ring.buffer.unlink()  # both ends are in this process: the mapping is enough
            self.reader = DiskReader(ImageFile(self.file.path), self.ring, order)
        else:
            self.ring = StagingRing.attach(self.launch(self.file.path, order, self.slots, self.slot_bytes))
        os.unlink(self.file.path)  # the reader holds it open: nothing is left behind whatever ends this process
        return self.ring.buffer.array

    def acquire(self, layer: int) -> tuple[int, np.ndarray]:
        """The next staged image, which must be layer's (a read-only view of its slot)."""
        return self.ring.wait_ready(layer, timeout=ACQUIRE_TIMEOUT_S)

    def release(self, slot: int) -> None:
        self.ring.release(slot)

    def stats(self) -> dict:
        return self.reader.stats() if self.reader is not None else {}

    def close(self) -> None:
        if self.reader is not None:
            self.reader.stop()
