"""Host and disk tiers of streamed layers: shared memory across processes and its size bound,
the HostTier's keyed regions (plain and through Ray), layer image files, the staging ring and
the disk reader that fills it (direct and buffered reads)."""

from __future__ import annotations

import errno
import fcntl
import mmap
import multiprocessing
import os
import secrets
import struct
import subprocess
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import ray

from workers.disk_tier import DiskTier
from workers.host_tier import HostRegions, host_tier_for_node, process_alive
from workers.memory import disk_reader, image_file, shared_buffer
from workers.memory.disk_reader import DiskReader
from workers.memory.image_file import ALIGN, ImageFile
from workers.memory.shared_buffer import GIB, SharedBuffer
from workers.memory.staging_ring import RingClosed, StagingRing
from serving_cluster import local_ray

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def shm_prefix():
    """A name prefix of this test's own; whatever is left under it in /dev/shm goes at the end."""
    prefix = f"ntr-test-{os.getpid()}-{secrets.token_hex(3)}"
    yield prefix
    for name in os.listdir(shared_buffer.SHM_DIR):
        if name.startswith(prefix):
            os.unlink(os.path.join(shared_buffer.SHM_DIR, name))


def shm_exists(name: str) -> bool:
    return os.path.exists(os.path.join(shared_buffer.SHM_DIR, name))


def wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def random_images(sizes: dict[int, int], seed: int = 0) -> dict[int, bytes]:
    rng = np.random.default_rng(seed)
    return {layer: rng.integers(0, 256, n, dtype=np.uint8).tobytes() for layer, n in sizes.items()}


def direct_io_works(directory) -> bool:
    """Whether this filesystem takes O_DIRECT reads (ext4 does; tmpfs before Linux 6.6 does not)."""
    path = directory / "probe"
    path.write_bytes(b"\0" * ALIGN)
    fd = disk_reader.open_direct(str(path))
    if fd is None:
        return False
    try:
        os.preadv(fd, [mmap.mmap(-1, ALIGN)], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def consume(ring: StagingRing, images: dict[int, bytes], order: list[int], cycles: int) -> None:
    """Walk the order as the forward pass would, checking every image byte for byte and the FIFO slot."""
    for count in range(cycles * len(order)):
        layer = order[count % len(order)]
        slot, view = ring.wait_ready(layer, timeout=20)
        assert slot == count % ring.slots
        assert view.tobytes() == images[layer], f"image {count} (layer {layer}) differs"
        ring.release(slot)


# child processes (spawn: a fresh interpreter that imports this module)

def child_write(name: str, offset: int, data: bytes) -> None:
    buffer = SharedBuffer.attach(name)
    buffer.array[offset:offset + len(data)] = np.frombuffer(data, np.uint8)
    buffer.close()


def child_consume(name: str, image_path: str, order: list[int], cycles: int) -> None:
    with open(image_path, "rb") as f:
        raw = f.read()
    images = {layer: raw[offset:offset + n] for layer, (offset, n) in ImageFile(image_path).images.items()}
    ring = StagingRing.attach(name)
    consume(ring, images, order, cycles)
    ring.detach()


# SharedBuffer

def test_shared_buffer_is_shared_with_another_process_and_unlinked_only_by_its_owner(shm_prefix):
    name, nbytes = f"{shm_prefix}-a", 3 * 4096 + 5
    buffer = SharedBuffer.create(name, nbytes)
    assert buffer.name == name and buffer.nbytes == nbytes and buffer.array.size == nbytes
    assert buffer.array.dtype == np.uint8 and buffer.array.ctypes.data % mmap.PAGESIZE == 0
    assert os.stat(os.path.join(shared_buffer.SHM_DIR, name)).st_blocks * 512 >= nbytes  # reserved, not sparse
    assert not buffer.array.any()

    data = bytes(range(1, 200))
    child = SPAWN.Process(target=child_write, args=(name, 4096 + 3, data))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert buffer.array[4096 + 3:4096 + 3 + len(data)].tobytes() == data
    assert buffer.array[:4096 + 3].sum() == 0 and buffer.array[4096 + 3 + len(data):].sum() == 0
    assert shm_exists(name), "a process that attached and exited unlinked the segment"

    other = SharedBuffer.attach(name)
    assert other.nbytes == nbytes and other.array.ctypes.data % mmap.PAGESIZE == 0
    other.array[0] = 42
    other.close()
    assert shm_exists(name) and buffer.array[0] == 42
    with pytest.raises(FileExistsError):
        SharedBuffer.create(name, 4096)

    buffer.unlink()
    assert not shm_exists(name)
    with pytest.raises(FileNotFoundError):
        SharedBuffer.attach(name)
    buffer.array[1] = 7  # the mapping outlives the name
    assert buffer.array[1] == 7
    buffer.close()


def test_shared_buffer_refuses_what_the_node_cannot_hold_before_allocating(shm_prefix, monkeypatch):
    name = f"{shm_prefix}-big"
    assert shared_buffer.mem_available_bytes() > 0 and shared_buffer.shm_free_bytes() > 0
    monkeypatch.setattr(shared_buffer, "mem_available_bytes", lambda: 2 * GIB)
    with pytest.raises(ValueError, match=r"3\.00 GiB requested, 2\.00 GiB available \(MemAvailable 2\.00 GiB"):
        SharedBuffer.create(name, 3 * GIB)
    assert not shm_exists(name)
    monkeypatch.setattr(shared_buffer, "shm_free_bytes", lambda: GIB // 2)
    with pytest.raises(ValueError, match=r"0\.50 GiB available .*/dev/shm free 0\.50 GiB"):
        SharedBuffer.create(name, GIB)
    assert not shm_exists(name)
    for bad_name, size in [("../etc/x", 4096), ("", 4096), (".hidden", 4096), (name, 0)]:
        with pytest.raises(ValueError):
            SharedBuffer.create(bad_name, size)
    assert not shm_exists(name)


# HostRegions, HostTier

def test_host_regions_share_a_key_count_users_and_unlink_at_zero(shm_prefix, monkeypatch):
    regions = HostRegions(shm_prefix)
    first = regions.region("model-a:layers-0-3", 8192)
    assert first["nbytes"] == 8192 and first["filled"] is False and first["name"].startswith(shm_prefix)
    mapped = SharedBuffer.attach(first["name"])
    mapped.array[:] = 7
    regions.mark_filled("model-a:layers-0-3")
    assert regions.region("model-a:layers-0-3", 8192) == {**first, "filled": True}
    with pytest.raises(ValueError, match="holds 8192 bytes, asked for 4096"):
        regions.region("model-a:layers-0-3", 4096)
    second = regions.region("model-b", 4096)
    assert second["name"] != first["name"] and second["filled"] is False
    stats = regions.stats()
    assert (stats["regions"], stats["bytes"], stats["users"]) == (2, 12288, 3)
    assert stats["keys"]["model-a:layers-0-3"]["users"] == 2

    monkeypatch.setattr(shared_buffer, "mem_available_bytes", lambda: 4096)
    with pytest.raises(ValueError, match="requested"):
        regions.region("model-c", 8192)
    assert regions.stats()["regions"] == 2  # a refused region is not counted

    regions.release("model-a:layers-0-3")
    assert shm_exists(first["name"])
    regions.release("model-a:layers-0-3")
    assert not shm_exists(first["name"]) and regions.stats()["regions"] == 1
    assert (mapped.array == 7).all()  # a user that still maps it keeps its view
    mapped.close()
    for call in (regions.release, regions.mark_filled):
        with pytest.raises(KeyError):
            call("model-a:layers-0-3")
    regions.unlink_all()
    assert not shm_exists(second["name"]) and regions.stats()["regions"] == 0


def test_regions_of_a_process_that_ended_are_unlinked_at_the_next_reap(shm_prefix):
    """A user names its process; once that process has ended (a zombie not yet waited for
    counts as ended) it stops counting, and a region left without users is unlinked. Live
    processes' regions and those of users that named none stay."""
    regions = HostRegions(shm_prefix)
    child = subprocess.Popen(["sleep", "60"])
    try:
        mine = regions.region("a", 4096, os.getpid())
        regions.region("a", 4096, child.pid)
        theirs = regions.region("b", 8192, child.pid)
        anonymous = regions.region("c", 4096)
        regions.reap()
        assert regions.stats()["users"] == 4 and shm_exists(theirs["name"])
        child.kill()
        wait_for(lambda: not process_alive(child.pid), 10, "the killed child to end")
        regions.reap()  # (a zombie still: not waited for)
        assert not shm_exists(theirs["name"]) and shm_exists(mine["name"]) and shm_exists(anonymous["name"])
        assert {k: v["users"] for k, v in regions.stats()["keys"].items()} == {"a": 1, "c": 1}
        regions.release("a", os.getpid())
        assert not shm_exists(mine["name"])
    finally:
        child.kill()
        child.wait()
        regions.unlink_all()


def test_host_tier_and_disk_tier_through_ray(tmp_path):
    """One real local Ray: the node's HostTier by name, its regions seen from this process, its
    exit unlinking what it held; a DiskTier's ring consumed from here and unlinked by stop()."""
    names = []
    try:
        with local_ray(num_cpus=1):
            tier = host_tier_for_node()
            first = ray.get(tier.region.remote("model:0-1", 3 * 4096), timeout=60)
            names.append(first["name"])
            assert first["filled"] is False and first["nbytes"] == 3 * 4096
            mapped = SharedBuffer.attach(first["name"])
            mapped.array[:] = np.arange(3 * 4096) % 251
            ray.get(tier.mark_filled.remote("model:0-1"))
            again = ray.get(host_tier_for_node().region.remote("model:0-1", 3 * 4096))  # the same named actor
            assert again == {**first, "filled": True}
            assert ray.get(tier.stats.remote())["users"] == 2
            ray.get(tier.release.remote("model:0-1"))
            assert shm_exists(first["name"])
            ray.get(tier.release.remote("model:0-1"))
            assert not shm_exists(first["name"]) and (mapped.array == np.arange(3 * 4096) % 251).all()
            mapped.close()

            # a user process that ended without releasing stops counting when a region is asked for next
            child = subprocess.Popen(["sleep", "60"])
            gone = ray.get(tier.region.remote("a killed replica's", 4096, child.pid))
            names.append(gone["name"])
            child.kill()
            child.wait()
            assert shm_exists(gone["name"])
            names.append(ray.get(tier.region.remote("model:2-3", 4096, os.getpid()))["name"])
            assert not shm_exists(gone["name"]) and "a killed replica's" not in ray.get(tier.stats.remote())["keys"]

            held = ray.get(tier.region.remote("never released", 4096))
            names.append(held["name"])
            tier.__ray_terminate__.remote()  # a graceful exit runs the actor's atexit
            wait_for(lambda: not shm_exists(held["name"]), 30, "the HostTier's exit to unlink its region")

            images = random_images({0: 5000, 1: 8192, 2: 1})
            path = tmp_path / "layers.img"
            ImageFile.write(path, list(images.items()))
            disk = DiskTier.remote(str(path), [1, 0, 2], 2, 8192)
            spec = ray.get(disk.ring.remote(), timeout=60)
            names.append(spec["name"])
            assert (spec["slots"], spec["slot_bytes"]) == (2, 8192)
            ring = StagingRing.attach(spec["name"])
            consume(ring, images, [1, 0, 2], cycles=3)
            stats = ray.get(disk.stats.remote())
            assert stats["images"] >= 9 and stats["error"] is None
            ray.get(disk.stop.remote())
            assert not shm_exists(spec["name"]) and ring.closed  # the consumer sees the close too
            ring.detach()
    finally:
        for name in names:
            if shm_exists(name):
                os.unlink(os.path.join(shared_buffer.SHM_DIR, name))


# ImageFile

def test_image_file_round_trip(tmp_path):
    sizes = {3: 1, 0: 4095, 7: 4096, 1: 4097, 2: 10001}
    images = random_images(sizes)
    path = tmp_path / "layers.img"
    # bytes, a numpy array and a memoryview are all bytes-like
    given = [(3, images[3]), (0, np.frombuffer(images[0], np.uint8)), (7, memoryview(images[7])), (1, images[1]),
             (2, images[2])]
    written = ImageFile.write(path, given)
    raw = path.read_bytes()
    assert len(raw) % ALIGN == 0 and not (tmp_path / "layers.img.partial").exists()
    assert list(written.images) == [3, 0, 7, 1, 2]  # file order
    assert ImageFile(path).images == written.images
    for layer, (offset, nbytes) in written.images.items():
        assert offset % ALIGN == 0 and nbytes == sizes[layer]
        assert raw[offset:offset + nbytes] == images[layer]
    for bad in ([(-1, b"x")], [(1, b"x"), (1, b"y")], [(1, b"")]):
        with pytest.raises(ValueError):
            ImageFile.write(tmp_path / "bad.img", bad)


def put(fmt: str, at: int, value) -> Callable[[bytearray], bytearray]:
    def mutate(raw: bytearray) -> bytearray:
        struct.pack_into(fmt, raw, at, value)
        return raw
    return mutate


def entry(index: int, field: int) -> int:
    """Where image index's field (0 layer, 1 offset, 2 bytes) sits in the header."""
    return image_file._HEAD.size + index * image_file._ENTRY.size + 8 * field


# The file: layer 0 (8000 bytes) at 4096, layer 1 (5000 bytes) at 12288, 20480 bytes in all.
@pytest.mark.parametrize("mutate, message", [
    (lambda raw: raw[:10], "10 bytes, too short"),
    (put("<4s", 0, b"GGUF"), "not a layer image file"),
    (put("<Q", 8, 2**40), "claims 1099511627776 images, at most 65536"),
    (put("<Q", 8, 1000), r"index of 1000 images runs past the end of the file \(20480 bytes\)"),
    (put("<Q", entry(1, 1), 2**50), "layer 1: 5000 bytes at offset 1125899906842624 do not fit"),
    (put("<Q", entry(0, 1), 4096 + 8), "layer 0: offset 4104 is not 4096-aligned"),
    (put("<Q", entry(1, 1), 4096), r"layer 1: offset 4096 overlaps .* \(ends at 12096\)"),
    (put("<Q", entry(0, 1), 0), r"layer 0: offset 0 overlaps the index"),
    (put("<Q", entry(1, 2), 2**63), "do not fit"),
    (put("<q", entry(1, 0), 0), "layer 0: negative or repeated layer"),
    (put("<q", entry(1, 0), -5), "layer -5: negative or repeated layer"),
    (lambda raw: raw[:12288 + 100], r"layer 1: 5000 bytes at offset 12288 do not fit in the file \(12388 bytes\)"),
], ids=["truncated-header", "magic", "absurd-count", "truncated-index", "offset-past-end", "misaligned",
        "overlapping", "over-the-index", "huge-size", "repeated-layer", "negative-layer", "truncated-image"])
def test_malformed_image_file_is_a_clear_error(tmp_path, mutate, message):
    path = tmp_path / "layers.img"
    ImageFile.write(path, list(random_images({0: 8000, 1: 5000}).items()))
    assert path.stat().st_size == 20480
    path.write_bytes(bytes(mutate(bytearray(path.read_bytes()))))
    with pytest.raises(ValueError, match=message):
        ImageFile(path)


# StagingRing and DiskReader

def test_staging_ring_protocol_errors_timeouts_and_close(shm_prefix):
    producer = StagingRing.create(f"{shm_prefix}-ring", slots=2, slot_bytes=4096)
    consumer = StagingRing.attach(f"{shm_prefix}-ring")  # the other side: its own counters, the same memory
    assert consumer.buffer.nbytes == StagingRing.nbytes(2, 4096) and consumer.data.ctypes.data % ALIGN == 0
    with pytest.raises(TimeoutError, match="waited 0.05 s for layer 5"):
        consumer.wait_ready(5, timeout=0.05)

    slot = producer.wait_free(timeout=0)
    producer.slot_view(slot)[:3] = [1, 2, 3]
    with pytest.raises(ValueError, match="4097 bytes in a 4096-byte slot"):
        producer.publish(slot, 4, 4097)
    with pytest.raises(ValueError, match="next slot is 0"):
        producer.publish(1, 4, 3)
    producer.publish(slot, 4, 3)
    with pytest.raises(ValueError, match="holds layer 4, the consumer expected layer 5"):
        consumer.wait_ready(5, timeout=1)
    got, view = consumer.wait_ready(4, timeout=1)
    assert got == 0 and view.tolist() == [1, 2, 3]
    with pytest.raises(ValueError):
        view[0] = 9  # the consumer's view is read-only

    producer.publish(producer.wait_free(timeout=1), 5, 1)  # slot 1; slot 0 is next, held by the consumer
    with pytest.raises(TimeoutError, match=r"a free slot \(slot 0\)"):
        producer.wait_free(timeout=0.05)
    assert consumer.wait_ready(5, timeout=1)[0] == 1
    with pytest.raises(ValueError, match="holds all 2 slots"):
        consumer.wait_ready(6, timeout=1)
    with pytest.raises(ValueError, match="oldest first and the oldest held is 0"):
        consumer.release(1)
    consumer.release(0)
    consumer.release(1)
    with pytest.raises(ValueError, match="oldest held is none"):
        consumer.release(0)
    producer.publish(producer.wait_free(timeout=1), 6, 1)
    assert consumer.wait_ready(6, timeout=1)[0] == 0

    # close() from either side ends the other's wait at once, whatever its timeout
    threading.Timer(0.2, producer.close).start()
    start = time.monotonic()
    with pytest.raises(RingClosed, match="closed while waiting for layer 7"):
        consumer.wait_ready(7, timeout=30)
    assert time.monotonic() - start < 10
    with pytest.raises(RingClosed):
        producer.wait_free(timeout=30)
    consumer.detach()
    producer.buffer.unlink()
    producer.detach()
    with pytest.raises(ValueError, match="not a staging ring"):
        StagingRing(SharedBuffer.create(f"{shm_prefix}-plain", 4096))


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_reader_streams_the_order_cyclically_to_a_consumer_thread(tmp_path, shm_prefix, direct):
    images = random_images({0: 4095, 1: 8192, 2: 1, 3: 6000, 4: 4097})
    path = tmp_path / "layers.img"
    ImageFile.write(path, list(images.items()))
    order = [3, 1, 4, 0, 2]  # not the file's order
    ring = StagingRing.create(f"{shm_prefix}-ring", slots=3, slot_bytes=8192)
    reader = DiskReader(ImageFile(path), ring, order, direct=direct)
    failures = []

    def consumer():
        try:
            consume(ring, images, order, cycles=6)
        except BaseException as e:
            failures.append(e)

    thread = threading.Thread(target=consumer)
    thread.start()
    thread.join(60)
    assert not thread.is_alive() and not failures, failures
    stats = reader.stats()
    assert stats["direct"] is (direct and direct_io_works(tmp_path))
    assert stats["images"] >= 30 and stats["bytes"] >= 6 * sum(map(len, images.values()))
    assert stats["seconds"] > 0 and stats["gb_s"] > 0 and stats["error"] is None
    reader.stop()
    assert not reader.thread.is_alive() and ring.closed
    ring.buffer.unlink()
    ring.detach()


def test_reader_feeds_a_consumer_in_another_process(tmp_path, shm_prefix):
    images = random_images({0: 7000, 1: 3, 2: 8192})
    path = tmp_path / "layers.img"
    ImageFile.write(path, list(images.items()))
    ring = StagingRing.create(f"{shm_prefix}-ring", slots=2, slot_bytes=8192)
    reader = DiskReader(ImageFile(path), ring, [2, 0, 1])
    child = SPAWN.Process(target=child_consume, args=(ring.buffer.name, str(path), [2, 0, 1], 8))
    child.start()
    child.join(60)
    assert child.exitcode == 0  # it asserts every image, byte for byte, in FIFO order
    wait_for(lambda: reader.stats()["images"] == 24 + 2, 10, "the reader to fill the two released slots")
    reader.stop()
    assert reader.stats()["error"] is None
    ring.buffer.unlink()
    ring.detach()


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_reader_never_overwrites_a_held_slot_nor_writes_past_one(tmp_path, shm_prefix, direct):
    # Layer 0 is one byte short of the slot: a direct read rounds it up to exactly the slot.
    # Past it in the file lies layer 1, which the reader never reads: bytes of it in slot 1
    # (holding layer 2) would be a read past slot 0.
    images = random_images({0: 8191, 1: 8192, 2: 8192})
    path = tmp_path / "layers.img"
    ImageFile.write(path, list(images.items()))
    ring = StagingRing.create(f"{shm_prefix}-ring", slots=2, slot_bytes=8192)
    reader = DiskReader(ImageFile(path), ring, [0, 2], direct=direct)
    s0, _ = ring.wait_ready(0, timeout=20)
    s1, view1 = ring.wait_ready(2, timeout=20)
    assert view1.tobytes() == images[2]
    ring.release(s0)  # the reader refills slot 0, right before slot 1 (held) in memory...
    wait_for(lambda: reader.stats()["images"] == 3, 20, "the reader to refill slot 0")
    time.sleep(0.3)
    assert reader.stats()["images"] == 3  # ...then waits for slot 1
    assert ring.data[s1].tobytes() == images[2]  # the whole held slot untouched
    s0, view0 = ring.wait_ready(0, timeout=20)
    assert view0.tobytes() == images[0]
    ring.release(s1)
    wait_for(lambda: reader.stats()["images"] == 4, 20, "the reader to refill slot 1")
    time.sleep(0.3)
    assert reader.stats()["images"] == 4 and ring.data[s0, :8191].tobytes() == images[0]
    reader.stop()
    ring.buffer.unlink()
    ring.detach()


@pytest.mark.parametrize("refused_at", ["open", "read"])
def test_reader_falls_back_to_buffered_reads_where_o_direct_is_refused(tmp_path, shm_prefix, monkeypatch, refused_at):
    images = random_images({0: 5000, 1: 12345})
    path = tmp_path / "layers.img"
    ImageFile.write(path, list(images.items()))
    real_open, real_preadv = os.open, os.preadv

    def refusing_open(file, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT refused")
        return real_open(file, flags, *args, **kwargs)

    def refusing_preadv(fd, buffers, offset, *args):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "direct read refused")
        return real_preadv(fd, buffers, offset, *args)

    if refused_at == "open":
        monkeypatch.setattr(os, "open", refusing_open)
    else:
        monkeypatch.setattr(os, "preadv", refusing_preadv)
    ring = StagingRing.create(f"{shm_prefix}-ring", slots=2, slot_bytes=4 * 4096)
    reader = DiskReader(ImageFile(path), ring, [1, 0], direct=True)
    consume(ring, images, [1, 0], cycles=3)
    assert reader.stats()["direct"] is False and reader.stats()["error"] is None
    reader.stop()
    ring.buffer.unlink()
    ring.detach()


def test_reader_failure_closes_the_ring_for_the_consumer(tmp_path, shm_prefix):
    images = random_images({0: 5000, 1: 6000})
    path = tmp_path / "layers.img"
    opened = ImageFile.write(path, list(images.items()))
    os.truncate(path, opened.images[1][0] + 100)  # the file shrinks under a checked index
    ring = StagingRing.create(f"{shm_prefix}-ring", slots=2, slot_bytes=8192)
    reader = DiskReader(opened, ring, [0, 1])
    slot, view = ring.wait_ready(0, timeout=20)
    assert view.tobytes() == images[0]
    with pytest.raises(RingClosed, match="layer 1"):
        ring.wait_ready(1, timeout=20)
    assert "layer 1 ends after 100 of 6000 bytes" in reader.stats()["error"]
    small = StagingRing.create(f"{shm_prefix}-small", 1, 4096)
    with pytest.raises(ValueError, match=r"names layers it lacks: \[9\]"):
        DiskReader(opened, small, [0, 9])
    with pytest.raises(ValueError, match=r"layers \[0, 1\] are larger than a 4096-byte staging slot"):
        DiskReader(opened, small, [0, 1])
    small.detach()
    reader.stop()
    ring.buffer.unlink()
    ring.detach()


def test_disk_stream_writes_at_load_then_stages_in_copy_order(tmp_path):
    from workers.memory.disk_stream import DiskStream

    rng = np.random.default_rng(5)
    sizes = {7: 5000, 8: 12288, 9: 3}
    images = {layer: rng.integers(0, 256, n, dtype=np.uint8) for layer, n in sizes.items()}
    path = tmp_path / "m.images"
    stream = DiskStream(path, sizes, slots=2)
    for layer, data in images.items():
        stream.image(layer)[:] = data
    staging = stream.start([9, 7, 8])
    assert staging.ctypes.data % 4096 == 0 and staging.nbytes >= 2 * stream.slot_bytes
    assert not path.exists()  # the reader holds the file open; nothing is left on disk
    try:
        for _ in range(3):
            for layer in (9, 7, 8):
                slot, view = stream.acquire(layer)
                assert np.array_equal(view, images[layer])
                stream.release(slot)
        with pytest.raises(ValueError, match="expected layer 8"):
            stream.acquire(8)  # the order is the copies': 9 comes next
    finally:
        stream.close()
