"""HostTier: the Ray actor that owns a node's host copies of streamed layers.

A model larger than the GPU streams some of its layers: every forward pass copies their
weights from pinned host RAM into a ring of VRAM slots. Those host copies live in POSIX
shared memory owned by one HostTier actor per node, not inside a ComputeWorker, so that
several replicas of one model on a node map one copy instead of holding one each, and a
worker that restarts finds the images already filled. A region is keyed by what it holds
(the caller's key names the model and the layers); the first user fills it and marks it
filled, later users map it and skip the filling; it is unlinked when its last user
releases it. The ComputeWorker attaches a region by name (`SharedBuffer.attach`) and
registers the mapping with CUDA as pinned memory itself.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.memory.shared_buffer import SharedBuffer

# One namespace for every job on the cluster: a Serve app and a batch job on one node share
# the node's HostTier, hence its regions.
NAMESPACE = "ntr"


@dataclass
class Region:
    buffer: SharedBuffer
    users: int
    filled: bool = False


class HostRegions:
    """The HostTier's bookkeeping, without Ray: keyed regions, their users and their filled flag.

    Not thread-safe: the actor runs one method at a time. Two users that both call region()
    before the first one's mark_filled() both see filled False and both fill; a key names
    its content, so they write the same bytes and only the copy is wasted.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.regions: dict[str, Region] = {}

    def segment_name(self, key: str) -> str:
        # A digest: keys are free text (model paths), segment names are not.
        return f"{self.prefix}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"

    def region(self, key: str, nbytes: int) -> dict:
        """The region for key, created if new; each call counts one more user."""
        found = self.regions.get(key)
        if found is None:
            found = self.regions[key] = Region(SharedBuffer.create(self.segment_name(key), nbytes), users=0)
        elif found.buffer.nbytes != nbytes:
            raise ValueError(f"host region {key!r} holds {found.buffer.nbytes} bytes, asked for {nbytes}")
        found.users += 1
        return {"name": found.buffer.name, "nbytes": found.buffer.nbytes, "filled": found.filled}

    def mark_filled(self, key: str) -> None:
        self._get(key).filled = True

    def release(self, key: str) -> None:
        """One user fewer; the last one unlinks the region."""
        found = self._get(key)
        found.users -= 1
        if found.users == 0:
            del self.regions[key]
            found.buffer.close()
            found.buffer.unlink()

    def stats(self) -> dict:
        return {"regions": len(self.regions), "bytes": sum(r.buffer.nbytes for r in self.regions.values()),
                "users": sum(r.users for r in self.regions.values()),
                "keys": {k: {"name": r.buffer.name, "nbytes": r.buffer.nbytes, "users": r.users, "filled": r.filled}
                         for k, r in self.regions.items()}}

    def unlink_all(self) -> None:
        for found in self.regions.values():
            found.buffer.close()
            found.buffer.unlink()
        self.regions.clear()

    def _get(self, key: str) -> Region:
        if key not in self.regions:
            raise KeyError(f"no host region {key!r}")
        return self.regions[key]


@ray.remote(num_cpus=0)
class HostTier:
    """One per node (host_tier_for_node). Its regions are unlinked when the actor exits
    normally (atexit: `__ray_terminate__`, `ray.actor.exit_actor()`). Ray stopping (`ray stop`,
    `ray.shutdown()` of a local cluster) kills its workers outright, as do ray.kill and the
    OOM killer, and a killed process runs nothing: its segments stay in /dev/shm as
    ntr-host-<pid>-*, holding RAM until removed by hand or a reboot. A user that dies
    without release() keeps its count, so its regions live as long as the actor."""

    def __init__(self):
        # The pid keeps a restarted actor's names apart from what a killed one left behind.
        self.regions = HostRegions(prefix=f"ntr-host-{os.getpid()}")
        atexit.register(self.regions.unlink_all)

    def region(self, key: str, nbytes: int) -> dict:
        return self.regions.region(key, nbytes)

    def mark_filled(self, key: str) -> None:
        self.regions.mark_filled(key)

    def release(self, key: str) -> None:
        self.regions.release(key)

    def stats(self) -> dict:
        return self.regions.stats()


def host_tier_for_node():
    """The HostTier of the caller's node, started on first use. Detached: it serves every
    worker of the node, so it must not die with whichever worker happened to start it."""
    node = ray.get_runtime_context().get_node_id()
    return HostTier.options(name=f"ntr-host-tier-{node}", namespace=NAMESPACE, get_if_exists=True,
                            lifetime="detached",
                            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
