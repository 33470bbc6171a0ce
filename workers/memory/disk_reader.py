"""The disk tier's reader: a thread that reads layer images from an image file into the
staging ring, in the forward pass's order, over and over, ahead of need."""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time

import numpy as np

from workers.memory.image_file import ALIGN, ImageFile, align_up
from workers.memory.staging_ring import RingClosed, StagingRing

def open_direct(path: str) -> int | None:
    """An O_DIRECT descriptor of path, or None where the filesystem refuses it."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return None


class DiskReader:
    """A thread reading images from an ImageFile into a StagingRing in `order`, over and over,
    until stop() or the ring is closed.

    O_DIRECT where the filesystem allows it: the page cache would otherwise keep a second
    copy of images that are only read to be copied once more, and evict what the node needs
    (a model larger than RAM goes through it every pass). Direct reads are whole 4096-byte
    blocks from aligned offsets into the aligned slot, the length rounded up within the slot.
    Where O_DIRECT is refused (at open, or at the first read: tmpfs before Linux 6.6, some
    FUSE mounts) it reads buffered, and stats() says which.
    """

    def __init__(self, images: ImageFile, ring: StagingRing, order: list[int], direct: bool = True):
        missing = sorted(set(order) - set(images.images))
        if not order or missing:
            raise ValueError(f"{images.path}: the read order is empty or names layers it lacks: {missing}")
        too_big = [layer for layer in order if images.images[layer][1] > ring.slot_bytes]
        if too_big:
            raise ValueError(f"{images.path}: layers {too_big} are larger than a {ring.slot_bytes}-byte staging slot")
        self.images, self.ring, self.order = images, ring, list(order)
        self.fd = os.open(images.path, os.O_RDONLY)
        self.direct_fd = open_direct(images.path) if direct else None
        self.direct = self.direct_fd is not None
        self.bytes = self.count = 0
        self.seconds = 0.0  # reading only, not waiting for free slots
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="disk-reader", daemon=True)
        self.thread.start()

    def stats(self) -> dict:
        return {"bytes": self.bytes, "seconds": self.seconds, "images": self.count,
                "gb_s": self.bytes / self.seconds / 1e9 if self.seconds else 0.0,
                "direct": self.direct, "error": None if self.error is None else repr(self.error)}

    def stop(self) -> None:
        """Close the ring (the consumer's waits end too) and end the thread."""
        self.ring.close()
        self.thread.join()
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None

    def _run(self) -> None:
        try:
            for layer in itertools.cycle(self.order):
                offset, nbytes = self.images.images[layer]
                slot = self.ring.wait_free()
                start = time.perf_counter()
                self._read(offset, nbytes, self.ring.slot_view(slot), layer)
                self.seconds += time.perf_counter() - start
                self.ring.publish(slot, layer, nbytes)
                self.bytes += nbytes
                self.count += 1
        except RingClosed:
            pass  # stop() or the consumer: nothing more to read for
        except BaseException as e:
            self.error = e
            self.ring.close()  # the consumer's wait fails now rather than at its timeout

    def _read(self, offset: int, nbytes: int, slot: np.ndarray, layer: int) -> None:
        if self.direct_fd is not None:
            try:
                self._read_all(self.direct_fd, offset, nbytes, slot[:align_up(nbytes)], layer, direct=True)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(self.direct_fd)  # opened, but the filesystem refuses direct reads
                self.direct_fd, self.direct = None, False
        self._read_all(self.fd, offset, nbytes, slot[:nbytes], layer, direct=False)

    def _read_all(self, fd: int, offset: int, nbytes: int, dest: np.ndarray, layer: int, direct: bool) -> None:
        """Read at least nbytes into dest, never past it (a direct dest is whole blocks)."""
        got = 0
        while got < nbytes:
            n = os.preadv(fd, [dest[got:]], offset + got)
            got += n
            if n == 0 or direct and got % ALIGN:
                break  # the end of the file (a direct read can only go on from a block boundary)
        if got < nbytes:
            raise ValueError(f"{self.images.path}: layer {layer} ends after {got} of {nbytes} bytes")
