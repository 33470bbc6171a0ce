"""Named shared memory (files in /dev/shm) mapped into a process: where the host tier keeps
streamed layer images and the disk tier its staging ring, so that the ComputeWorker (another
process) maps the same pages and registers them with CUDA as pinned memory."""

from __future__ import annotations

import mmap
import os
import re

import numpy as np

GIB = 2**30
SHM_DIR = "/dev/shm"
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
