"""DiskTier: the Ray actor that streams layer images from disk into a shared staging ring.

When host RAM cannot hold every streamed layer (workers/host_tier.py), the rest stay in an
image file on the node's disk. Every forward pass needs them again, in the same order, so a
reader thread reads them in that order, cyclically, into a few staging slots in shared
memory ahead of need; the ComputeWorker (another process) copies each slot to a VRAM slot
and releases it for the next image. The ring is a single-producer single-consumer FIFO
whose state is int64 fields in the shared memory itself: both sides poll them, since no
lock or condition variable spans two processes.
"""

from __future__ import annotations

import atexit
import os
import secrets

import ray

from workers.memory.disk_reader import DiskReader
from workers.memory.image_file import ImageFile
from workers.memory.staging_ring import StagingRing


@ray.remote(num_cpus=0)
class DiskTier:
    """One staging ring and its reader, for one ComputeWorker, on its node. The ring is
    unlinked by stop() or when the actor exits normally (atexit); a killed actor leaves
    /dev/shm/ntr-stage-<pid>-* behind, as HostTier does."""

    def __init__(self, image_path: str, order: list[int], slots: int, slot_bytes: int, direct: bool = True):
        images = ImageFile(image_path)
        # The pid and a random tail: several DiskTiers per node, restarts, nothing to collide with.
        self.staging = StagingRing.create(f"ntr-stage-{os.getpid()}-{secrets.token_hex(4)}", slots, slot_bytes)
        try:
            self.reader = DiskReader(images, self.staging, order, direct)
        except BaseException:
            self.staging.buffer.unlink()
            raise
        atexit.register(self.stop)

    def ring(self) -> dict:
        """What the consumer attaches: StagingRing.attach(name)."""
        return {"name": self.staging.buffer.name, "slots": self.staging.slots, "slot_bytes": self.staging.slot_bytes}

    def stats(self) -> dict:
        return self.reader.stats()

    def stop(self) -> None:
        """Stop the reader and unlink the ring (a consumer that still maps it keeps its view)."""
        if self.staging is not None:
            self.reader.stop()
            self.staging.buffer.unlink()
            self.staging.detach()
            self.staging = None
