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
import errno
import itertools
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable

import numpy as np
import ray

from workers.host_tier import SharedBuffer

ALIGN = 4096  # O_DIRECT's offset, length and address alignment on every common block device
MAGIC = b"NTRIMG01"
MAX_IMAGES = 1 << 16
_HEAD = struct.Struct("<8sQ")  # magic, image count
_ENTRY = struct.Struct("<qQQ")  # layer, offset, bytes


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class ImageFile:
    """Layer images at 4096-aligned offsets, after a header indexing them: magic, count, then
    (layer, offset, bytes) per image in file order. Everything is checked when opened, so a
    reader never follows an offset out of the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.stat(self.path).st_size
        with open(self.path, "rb") as f:
            head = f.read(_HEAD.size)
            if len(head) < _HEAD.size:
                raise ValueError(f"{self.path}: {size} bytes, too short for a layer image header")
            magic, count = _HEAD.unpack(head)
            if magic != MAGIC:
                raise ValueError(f"{self.path}: not a layer image file (magic {magic!r})")
            if count > MAX_IMAGES:
                raise ValueError(f"{self.path}: header claims {count} images, at most {MAX_IMAGES}")
            table_end = _HEAD.size + count * _ENTRY.size
            if table_end > size:
                raise ValueError(f"{self.path}: the index of {count} images runs past the end of the file "
                                 f"({size} bytes)")
            table = f.read(count * _ENTRY.size)
        self.images: dict[int, tuple[int, int]] = {}  # layer -> (offset, bytes)
        end = table_end
        for layer, offset, nbytes in _ENTRY.iter_unpack(table):
            where = f"{self.path}: layer {layer}"
            if layer < 0 or layer in self.images:
                raise ValueError(f"{where}: negative or repeated layer")
            if offset % ALIGN:
                raise ValueError(f"{where}: offset {offset} is not 4096-aligned")
            if offset < end:
                raise ValueError(f"{where}: offset {offset} overlaps the index or the image before (ends at {end})")
            if nbytes == 0 or offset + nbytes > size:
                raise ValueError(f"{where}: {nbytes} bytes at offset {offset} do not fit in the file ({size} bytes)")
            self.images[layer] = (offset, nbytes)
            end = offset + nbytes

    @classmethod
    def write(cls, path: str | os.PathLike, images: list[tuple[int, object]]) -> ImageFile:
        """Write (layer, bytes-like) images in the given order; the file is replaced whole
        (written beside it, then renamed), so no reader sees half of it."""
        if len(images) > MAX_IMAGES:
            raise ValueError(f"{len(images)} images, at most {MAX_IMAGES}")
        views = [(int(layer), memoryview(image).cast("B")) for layer, image in images]
        layers = [layer for layer, _ in views]
        if min(layers, default=0) < 0 or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct and non-negative: {layers}")
        if any(view.nbytes == 0 for _, view in views):
            raise ValueError("an image is empty")
        offset = align_up(_HEAD.size + len(views) * _ENTRY.size)
        entries = []
        for layer, view in views:
            entries.append((layer, offset, view.nbytes))
            offset = align_up(offset + view.nbytes)
        path = os.fspath(path)
        partial = path + ".partial"
        with open(partial, "wb") as f:
            f.write(_HEAD.pack(MAGIC, len(entries)))
            for entry in entries:
                f.write(_ENTRY.pack(*entry))
            for (_, view), (_, at, _) in zip(views, entries):
                f.seek(at)
                f.write(view)
            f.truncate(offset)  # the last image padded too: an O_DIRECT read of it is whole blocks
        os.replace(partial, path)
        return cls(path)


class RingClosed(RuntimeError):
    """The staging ring was closed while a side waited on it."""


# Shared header, int64: the ring's fields, then per slot its fields. One aligned int64 store is
# one store on x86-64, and the other process sees a slot's stores in program order (TSO), which
# is what publishing a slot (its data and fields first, its state last) relies on. A weakly
# ordered CPU (aarch64) would need a fence there that Python does not offer.
_MAGIC, _SLOTS, _SLOT_BYTES, _CLOSED = range(4)
_GLOBAL = 4
_LAYER, _NBYTES, _STATE, _SEQ = range(4)
_FIELDS = 4
FREE, READY = 0, 1
RING_MAGIC = int.from_bytes(b"NTRRING1", "little")
MAX_SLOTS = 256
# A wait's poll interval: a layer's copy to the GPU takes milliseconds, so 0.1 ms late costs
# little, and two processes spinning on a shared core would cost both.
POLL_S = 100e-6


def _header_bytes(slots: int) -> int:
    return align_up(8 * (_GLOBAL + _FIELDS * slots))


class StagingRing:
    """K slots of slot_bytes (4096-aligned, after a page-aligned header) in one SharedBuffer.

    The producer calls wait_free -> slot_view -> publish; the consumer wait_ready -> (copy) ->
    release. Each side counts what it has done in its own process and takes slot = count % K,
    so both go around in the same FIFO order. The consumer may hold several slots at once
    (copies in flight) and releases them oldest first. A slot's seq field is the count it
    was published at: the consumer only takes the one it expects next.
    """

    def __init__(self, buffer: SharedBuffer):
        self.buffer = buffer
        if buffer.nbytes < 8 * _GLOBAL or buffer.array[:8 * _GLOBAL].view(np.int64)[_MAGIC] != RING_MAGIC:
            raise ValueError(f"shared memory {buffer.name!r} is not a staging ring")
        head = buffer.array[:8 * _GLOBAL].view(np.int64)
        self.slots, self.slot_bytes = int(head[_SLOTS]), int(head[_SLOT_BYTES])
        if not 0 < self.slots <= MAX_SLOTS or self.slot_bytes <= 0 or self.slot_bytes % ALIGN \
                or self.nbytes(self.slots, self.slot_bytes) != buffer.nbytes:
            raise ValueError(f"staging ring {buffer.name!r}: {self.slots} slots of {self.slot_bytes} bytes "
                             f"do not match its {buffer.nbytes} bytes")
        start = _header_bytes(self.slots)
        self.header = buffer.array[:8 * (_GLOBAL + _FIELDS * self.slots)].view(np.int64)
        self.meta = self.header[_GLOBAL:].reshape(self.slots, _FIELDS)
        self.data = buffer.array[start:].reshape(self.slots, self.slot_bytes)
        self._next_free = 0  # producer: the slot that wait_free hands out and publish fills
        self._next_ready = 0  # consumer: the slot that wait_ready hands out next
        self._next_release = 0  # consumer: the oldest slot it holds

    @staticmethod
    def nbytes(slots: int, slot_bytes: int) -> int:
        return _header_bytes(slots) + slots * slot_bytes

    @classmethod
    def create(cls, name: str, slots: int, slot_bytes: int) -> StagingRing:
        if not 0 < slots <= MAX_SLOTS:
            raise ValueError(f"staging ring: {slots} slots, 1 to {MAX_SLOTS}")
        if slot_bytes <= 0 or slot_bytes % ALIGN:
            raise ValueError(f"staging ring: slot size {slot_bytes} is not a positive multiple of {ALIGN}")
        buffer = SharedBuffer.create(name, cls.nbytes(slots, slot_bytes))
        head = buffer.array[:8 * _GLOBAL].view(np.int64)
        head[_SLOTS], head[_SLOT_BYTES] = slots, slot_bytes  # the rest is zero: every slot FREE, not closed
        head[_MAGIC] = RING_MAGIC  # last: whoever attaches sees a whole header or none
        return cls(buffer)

    @classmethod
    def attach(cls, name: str) -> StagingRing:
        return cls(SharedBuffer.attach(name))

    @property
    def closed(self) -> bool:
        return bool(self.header[_CLOSED])

    def close(self) -> None:
        """Stop both sides: every wait, here or in the other process, raises RingClosed."""
        self.header[_CLOSED] = 1

    def detach(self) -> None:
        """Unmap this process's view (after close, or when done with the ring)."""
        self.header = self.meta = self.data = None
        self.buffer.close()

    # producer

    def wait_free(self, timeout: float | None = None) -> int:
        """The slot to fill next, once the consumer has released it."""
        slot = self._next_free % self.slots
        self._wait(lambda: self.meta[slot, _STATE] == FREE, timeout, f"a free slot (slot {slot})")
        return slot

    def slot_view(self, slot: int) -> np.ndarray:
        return self.data[slot]

    def publish(self, slot: int, layer: int, nbytes: int) -> None:
        expected = self._next_free % self.slots
        if slot != expected or self.meta[slot, _STATE] != FREE:
            raise ValueError(f"publish slot {slot}: the producer's next slot is {expected}, after wait_free")
        if not 0 < nbytes <= self.slot_bytes:
            raise ValueError(f"publish layer {layer}: {nbytes} bytes in a {self.slot_bytes}-byte slot")
        m = self.meta[slot]
        m[_LAYER], m[_NBYTES], m[_SEQ] = layer, nbytes, self._next_free
        m[_STATE] = READY  # last: the consumer reads the fields only once it sees READY
        self._next_free += 1

    # consumer

    def wait_ready(self, layer: int, timeout: float | None = None) -> tuple[int, np.ndarray]:
        """The next slot in FIFO order and a read-only view of its image, which must be layer's."""
        if self._next_ready - self._next_release == self.slots:
            raise ValueError(f"the consumer holds all {self.slots} slots: release one before waiting for layer {layer}")
        seq = self._next_ready
        slot = seq % self.slots
        m = self.meta[slot]
        self._wait(lambda: m[_STATE] == READY and m[_SEQ] == seq, timeout, f"layer {layer}")
        if m[_LAYER] != layer:
            raise ValueError(f"staging slot {slot} holds layer {m[_LAYER]}, the consumer expected layer {layer}: "
                             f"the reader's order is not the forward pass's")
        self._next_ready += 1
        view = self.data[slot, :m[_NBYTES]]
        view.flags.writeable = False
        return slot, view

    def release(self, slot: int) -> None:
        """Hand the oldest held slot back to the producer."""
        expected = self._next_release % self.slots
        if self._next_release == self._next_ready or slot != expected:
            raise ValueError(f"release slot {slot}: slots are released oldest first and the oldest held is "
                             f"{expected if self._next_release < self._next_ready else 'none'}")
        self.meta[slot, _STATE] = FREE
        self._next_release += 1

    def _wait(self, ready: Callable[[], bool], timeout: float | None, what: str) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.closed:
                raise RingClosed(f"staging ring {self.buffer.name!r} closed while waiting for {what}")
            if ready():
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"staging ring {self.buffer.name!r}: waited {timeout:g} s for {what}")
            time.sleep(POLL_S)


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
