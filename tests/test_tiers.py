"""The host tier of streamed layers: shared memory across processes and its size bound, the
HostTier's keyed regions (plain and through Ray)."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import secrets
import shutil
import tempfile
import time

import numpy as np
import pytest
import ray

from workers import host_tier
from workers.host_tier import GIB, HostRegions, SharedBuffer, host_tier_for_node

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def shm_prefix():
    """A name prefix of this test's own; whatever is left under it in /dev/shm goes at the end."""
    prefix = f"ntr-test-{os.getpid()}-{secrets.token_hex(3)}"
    yield prefix
    for name in os.listdir(host_tier.SHM_DIR):
        if name.startswith(prefix):
            os.unlink(os.path.join(host_tier.SHM_DIR, name))


def shm_exists(name: str) -> bool:
    return os.path.exists(os.path.join(host_tier.SHM_DIR, name))


def wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


# child processes (spawn: a fresh interpreter that imports this module)

def child_write(name: str, offset: int, data: bytes) -> None:
    buffer = SharedBuffer.attach(name)
    buffer.array[offset:offset + len(data)] = np.frombuffer(data, np.uint8)
    buffer.close()


# SharedBuffer

def test_shared_buffer_is_shared_with_another_process_and_unlinked_only_by_its_owner(shm_prefix):
    name, nbytes = f"{shm_prefix}-a", 3 * 4096 + 5
    buffer = SharedBuffer.create(name, nbytes)
    assert buffer.name == name and buffer.nbytes == nbytes and buffer.array.size == nbytes
    assert buffer.array.dtype == np.uint8 and buffer.array.ctypes.data % mmap.PAGESIZE == 0
    assert os.stat(os.path.join(host_tier.SHM_DIR, name)).st_blocks * 512 >= nbytes  # reserved, not sparse
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
    assert host_tier.mem_available_bytes() > 0 and host_tier.shm_free_bytes() > 0
    monkeypatch.setattr(host_tier, "mem_available_bytes", lambda: 2 * GIB)
    with pytest.raises(ValueError, match=r"3\.00 GiB requested, 2\.00 GiB available \(MemAvailable 2\.00 GiB"):
        SharedBuffer.create(name, 3 * GIB)
    assert not shm_exists(name)
    monkeypatch.setattr(host_tier, "shm_free_bytes", lambda: GIB // 2)
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

    monkeypatch.setattr(host_tier, "mem_available_bytes", lambda: 4096)
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


def test_host_tier_through_ray(monkeypatch):
    """One real local Ray: the node's HostTier by name, its regions seen from this process, its
    exit unlinking what it held."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # loopback only (see tests/serving_cluster.py)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    temp_dir = tempfile.mkdtemp(prefix="ntr-ray-", dir="/tmp")  # short: socket paths are length-limited
    ray.init(address="local", num_cpus=1, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    names = []
    try:
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

        held = ray.get(tier.region.remote("never released", 4096))
        names.append(held["name"])
        tier.__ray_terminate__.remote()  # a graceful exit runs the actor's atexit
        wait_for(lambda: not shm_exists(held["name"]), 30, "the HostTier's exit to unlink its region")
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for name in names:
            if shm_exists(name):
                os.unlink(os.path.join(host_tier.SHM_DIR, name))
