"""HostTier: the Ray actor that owns a node's host copies of streamed layers.

A model larger than the GPU streams some of its layers: every forward pass copies their
weights from pinned host RAM into a ring of VRAM slots. Those host copies live in POSIX
shared memory owned by one HostTier actor per node, not inside a ComputeWorker, so that
several replicas of one model on a node map one copy instead of holding one each, and a
worker that restarts finds the images already filled. A region is keyed by what it holds
(the caller's key names the model and the layers); the first user fills it and marks it
filled, later users map it and skip the filling; it is unlinked when its last user
releases it or is gone: a user names its process (the tier and its users share the node), and
a user process that ended without releasing (a replica killed, a stage restarted, a config
redeployed) stops counting at the next region asked for, so its regions do not hold the
node's RAM for the tier's life. The ComputeWorker attaches a region by name
(`SharedBuffer.attach`) and registers the mapping with CUDA as pinned memory itself.
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
    users: list  # one entry a user: its process id (None: a user that is never looked for)
    filled: bool = False


def process_alive(pid: int) -> bool:
    """Whether process pid of this node runs (a zombie, ended and not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


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

    def region(self, key: str, nbytes: int, pid: int | None = None) -> dict:
        """The region for key, created if new; each call counts one more user, process pid's."""
        found = self.regions.get(key)
        if found is None:
            found = self.regions[key] = Region(SharedBuffer.create(self.segment_name(key), nbytes), users=[])
        elif found.buffer.nbytes != nbytes:
            raise ValueError(f"host region {key!r} holds {found.buffer.nbytes} bytes, asked for {nbytes}")
        found.users.append(pid)
        return {"name": found.buffer.name, "nbytes": found.buffer.nbytes, "filled": found.filled}

    def mark_filled(self, key: str) -> None:
        self._get(key).filled = True

    def release(self, key: str, pid: int | None = None) -> None:
        """One user fewer (one of process pid's); the last one unlinks the region."""
        found = self._get(key)
        found.users.remove(pid)
        if not found.users:
            self._unlink(key)

    def reap(self, alive=process_alive) -> None:
        """Every user whose process is no longer alive(pid) stops counting; regions left without
        users are unlinked."""
        for key, found in list(self.regions.items()):
            found.users = [pid for pid in found.users if pid is None or alive(pid)]
            if not found.users:
                self._unlink(key)

    def _unlink(self, key: str) -> None:
        found = self.regions.pop(key)
        found.buffer.close()
        found.buffer.unlink()

    def stats(self) -> dict:
        return {"regions": len(self.regions), "bytes": sum(r.buffer.nbytes for r in self.regions.values()),
                "users": sum(len(r.users) for r in self.regions.values()),
                "keys": {k: {"name": r.buffer.name, "nbytes": r.buffer.nbytes, "users": len(r.users),
                             "filled": r.filled} for k, r in self.regions.items()}}

    def unlink_all(self) -> None:
        for key in list(self.regions):
            self._unlink(key)

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
    without release() stops counting when the next region is asked for (`HostRegions.reap`);
    one that named no process keeps its count, so its regions live as long as the actor."""

    def __init__(self):
        # The pid keeps a restarted actor's names apart from what a killed one left behind.
        self.regions = HostRegions(prefix=f"ntr-host-{os.getpid()}")
        atexit.register(self.regions.unlink_all)

    def region(self, key: str, nbytes: int, pid: int | None = None) -> dict:
        self.regions.reap()
        return self.regions.region(key, nbytes, pid)

    def mark_filled(self, key: str) -> None:
        self.regions.mark_filled(key)

    def release(self, key: str, pid: int | None = None) -> None:
        self.regions.release(key, pid)

    def stats(self) -> dict:
        return self.regions.stats()


def host_tier_for_node():
    """The HostTier of the caller's node, started on first use. Detached: it serves every
    worker of the node, so it must not die with whichever worker happened to start it."""
    node = ray.get_runtime_context().get_node_id()
    return HostTier.options(name=f"ntr-host-tier-{node}", namespace=NAMESPACE, get_if_exists=True,
                            lifetime="detached",
                            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
