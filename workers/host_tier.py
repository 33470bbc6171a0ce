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
import mmap
import os
import re
from dataclasses import dataclass

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

GIB = 2**30
SHM_DIR = "/dev/shm"
# One namespace for every job on the cluster: a Serve app and a batch job on one node share
# the node's HostTier, hence its regions.
NAMESPACE = "ntr"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


def mem_available_bytes() -> int:
    """The kernel's estimate of memory that can be taken without swapping (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def shm_free_bytes() -> int:
    """Free space in /dev/shm, whose size is the mount's limit, not the RAM's."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


class SharedBuffer:
    """A named shared-memory segment (a file in /dev/shm) mapped into this process.

    Not multiprocessing.shared_memory: before Python 3.13 (no track=False) every process that
    opens a segment registers it with its resource tracker, which unlinks it when that
    process exits, so a ComputeWorker that merely attached would delete the HostTier's
    region on its way out. Here only an explicit unlink() removes the name; close() only
    unmaps, and mappings other processes hold stay valid after the name is gone.
    """

    def __init__(self, name: str, fd: int):
        self.name = name
        try:
            self.nbytes = os.fstat(fd).st_size
            if self.nbytes <= 0:
                raise ValueError(f"shared memory {name!r} is empty")
            self._mmap = mmap.mmap(fd, self.nbytes)  # the fd can go; the mapping stays
        finally:
            os.close(fd)
        # mmap maps whole pages at a page boundary: the view is page aligned, as
        # cudaHostRegister and O_DIRECT reads into it need.
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)

    @staticmethod
    def path(name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad shared memory name {name!r}: letters, digits, '.', '_', '-' (up to 201)")
        return os.path.join(SHM_DIR, name)

    @classmethod
    def create(cls, name: str, nbytes: int) -> SharedBuffer:
        """A new segment of nbytes, refused before anything is allocated when the node cannot hold it."""
        path = cls.path(name)
        if nbytes <= 0:
            raise ValueError(f"shared memory {name!r}: size must be positive, got {nbytes}")
        mem, shm = mem_available_bytes(), shm_free_bytes()
        if nbytes > min(mem, shm):
            raise ValueError(f"shared memory {name!r}: {nbytes / GIB:.2f} GiB requested, {min(mem, shm) / GIB:.2f} GiB "
                             f"available (MemAvailable {mem / GIB:.2f} GiB, {SHM_DIR} free {shm / GIB:.2f} GiB)")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserve the pages now: a sparse tmpfs file that cannot grow later kills the
            # process writing to it with SIGBUS, this fails with a clean ENOSPC (also when
            # another process took the memory after the check above).
            os.posix_fallocate(fd, 0, nbytes)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return cls(name, fd)

    @classmethod
    def attach(cls, name: str) -> SharedBuffer:
        """An existing segment, mapped whole."""
        return cls(name, os.open(cls.path(name), os.O_RDWR))

    def close(self) -> None:
        """Unmap this process's view (the segment stays until unlink)."""
        self.array = None
        try:
            self._mmap.close()
        except BufferError:
            pass  # numpy views of it are still alive: it is unmapped when the last one goes

    def unlink(self) -> None:
        """Remove the name: no process can attach any more; the memory goes with the last mapping."""
        try:
            os.unlink(self.path(self.name))
        except FileNotFoundError:
            pass


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
