"""The ComputeWorker's ends of its node's host and disk tiers, handed to the Engine as
`host_alloc` and `disk_open` (kernels/ops.py `stream_layers`).

host_alloc: the streamed layers' images go into a region of the node's HostTier (shared
memory, keyed by the model file and what the images are: which layers at which offsets, laid
out by which backend at which types; so replicas of one model with one placement share a
copy, and two that stream other layers never do); the backend registers it as pinned memory.
disk_open: the layers host RAM cannot hold go to an image file of this worker's and a DiskTier
actor on this node reads them into a staging ring ahead of each pass. A pipeline stage
(workers/stage_worker.py) holds tiers of its own, tagged with its index.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.disk_tier import DiskTier
from workers.host_tier import host_tier_for_node
from workers.memory.disk_stream import DiskStream, image_path
from workers.memory.shared_buffer import SharedBuffer


class NodeTiers:
    def __init__(self, model_path: str, tag: str = ""):
        """tag: keeps the image files of several users in one process apart (stages)."""
        st = os.stat(model_path)
        self.model_path, self.tag = Path(model_path), tag
        self.identity = f"{self.model_path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        self.node = ray.get_runtime_context().get_node_id()
        self.host_tier = self.key = self.region = self.disk_tier = None

    def host_alloc(self, nbytes: int, content: str):
        self.host_tier = host_tier_for_node()
        self.key = f"{self.identity}|{nbytes}|{hashlib.sha256(content.encode()).hexdigest()[:32]}"
        info = ray.get(self.host_tier.region.remote(self.key, nbytes, os.getpid()))
        self.region = SharedBuffer.attach(info["name"])
        return self.region.array[:nbytes]

    def loaded(self) -> None:
        """The images are in place: later replicas of the same placement find them filled."""
        if self.key is not None:
            ray.get(self.host_tier.mark_filled.remote(self.key))

    def disk_open(self, sizes: dict[int, int]) -> DiskStream:
        return DiskStream(image_path(self.model_path, self.tag), sizes, launch=self._launch)

    def _launch(self, images: str, order: list[int], slots: int, slot_bytes: int) -> str:
        # the handle keeps the actor alive as long as this worker
        self.disk_tier = DiskTier.options(scheduling_strategy=NodeAffinitySchedulingStrategy(self.node, soft=False)) \
            .remote(images, order, slots, slot_bytes)
        return ray.get(self.disk_tier.ring.remote())["name"]
