"""The host-to-device link: its PCIe generation and width, and its measured pinned bandwidth.

The link's current speed idles low (a GPU drops to PCIe 1 between transfers), so the
generation and width come from its maximum (sysfs max_link_speed/max_link_width, else
nvidia-smi's pcie.link.*.max). The bandwidth that decides placement is measured: a pinned
host buffer copied to the device a few times, the best taken, cached per machine and GPU
in NTR_HOME (a second start reads it instead of spending a second on it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import cupy as cp
import cupyx
import numpy as np

PROBE_BYTES = 1 << 30
GT_S_TO_GEN = {"2.5": 1, "5.0": 2, "8.0": 3, "16.0": 4, "32.0": 5, "64.0": 6}


def _cache_path() -> Path:
    home = Path(os.environ.get("NTR_HOME", Path.home() / ".cache" / "ntransformer"))
    return home / "link.json"


def pcie_link(bus_id: str) -> dict:
    """{"gen", "width"} at the link's maximum, None where neither source says."""
    dev = Path("/sys/bus/pci/devices") / bus_id.lower()
    try:
        speed = (dev / "max_link_speed").read_text().split()[0]
        return {"gen": GT_S_TO_GEN.get(speed), "width": int((dev / "max_link_width").read_text())}
    except (OSError, ValueError, IndexError):
        pass
    try:
        out = subprocess.run(["nvidia-smi", f"--id={bus_id}", "--query-gpu=pcie.link.gen.max,pcie.link.width.max",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20).stdout
        gen, width = (int(v) for v in out.strip().split(","))
        return {"gen": gen, "width": width}
    except (OSError, ValueError, subprocess.SubprocessError):
        return {"gen": None, "width": None}


def measure_h2d(nbytes: int = PROBE_BYTES, repeats: int = 3) -> float:
    """Pinned host-to-device GB/s: the best of `repeats` copies of nbytes."""
    host = cupyx.empty_pinned((nbytes,), np.uint8)
    host[::4096] = 1  # touch every page before timing
    dev = cp.empty((nbytes,), cp.uint8)
    stream = cp.cuda.Stream(non_blocking=True)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    best = 0.0
    for _ in range(repeats):
        start.record(stream)
        dev.data.copy_from_host_async(host.ctypes.data, nbytes, stream)
        end.record(stream)
        end.synchronize()
        best = max(best, nbytes / (cp.cuda.get_elapsed_time(start, end) * 1e-3) / 1e9)
    del dev, host
    cp.get_default_memory_pool().free_all_blocks()  # a probe, not the budget's: give it back
    cp.get_default_pinned_memory_pool().free_all_blocks()
    return best


def host_link(remeasure: bool = False) -> dict:
    """{"gpu", "bus_id", "gen", "width", "h2d_gb_s", "measured_at", "cached"} for this process's GPU."""
    device = cp.cuda.Device()
    bus_id = device.pci_bus_id
    name = cp.cuda.runtime.getDeviceProperties(device.id)["name"].decode()
    key = f"{socket.gethostname()}|{bus_id}|{name}"
    path = _cache_path()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key) if isinstance(cached, dict) else None
    if entry and not remeasure:
        return {**entry, "cached": True}
    entry = {"gpu": name, "bus_id": bus_id, **pcie_link(bus_id), "h2d_gb_s": round(measure_h2d(), 2),
             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cached = cached if isinstance(cached, dict) else {}
        cached[key] = entry
        path.write_text(json.dumps(cached, indent=1))
    except OSError:
        pass  # a read-only home measures at every start
    return {**entry, "cached": False}
