"""The backend's stream, the graph branch beside it, and how kernels are launched on them.

Every kernel, copy and graph is ordered on the backend's one stream. While a decode step is
captured (kernels/cupy/steps.py), kinds of kernels named by the tuning's PDL setting are
launched with programmatic dependent launch (kernels/launch.py), and a stacked weight's later
segments may run on a side stream that the capture records as a branch of the graph.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import cupy as cp
import numpy as np

from kernels.launch import PdlLauncher

_tls = threading.local()


def on_stream(fn):
    """Run a public entry point on the backend's stream, whichever thread calls it (the
    serving worker runs forward passes on a thread of its own); nested calls skip the switch."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if getattr(_tls, "inside", False):
            return fn(self, *args, **kwargs)
        _tls.inside = True
        try:
            with self.stream:
                return fn(self, *args, **kwargs)
        finally:
            _tls.inside = False

    return wrapper


@functools.cache
def sm_count() -> int:
    """The device's SMs: what grids sized to fill the GPU once are sized by."""
    return cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())["multiProcessorCount"]


def ptr(a) -> np.uint64:
    return np.uint64(0 if a is None else a.data.ptr)


class Launcher:
    """Launches on the backend's stream; `capturing` while a decode graph is captured."""

    def __init__(self, stream, tuning):
        self.stream, self.tuning = stream, tuning
        self.capturing = False
        self.pdl = PdlLauncher() if tuning.pdl_supported else None
        self.side = cp.cuda.Stream(non_blocking=True)
        self._fork, self._join = cp.cuda.Event(disable_timing=True), cp.cuda.Event(disable_timing=True)

    def launch(self, kind: str, fn, grid, block, args, shared_mem: int = 0, side: bool = False) -> None:
        """fn on the stream (side: on the graph branch segment_branch opened); while a decode
        graph is captured, with programmatic dependent launch if `kind` is enabled: only for
        kernels that pdl_wait() before touching their inputs and outputs."""
        if side:
            with self.side:
                fn(grid, block, args, shared_mem=shared_mem)
        elif self.capturing and kind in self.tuning.pdl_kinds:
            self.pdl(fn, grid, block, args, self.stream, shared_mem)
        else:
            fn(grid, block, args, shared_mem=shared_mem)

    @contextlib.contextmanager
    def segment_branch(self, w):
        """Yields whether a product's segments after the first launch with side=True: while a
        graph is captured they run on a branch beside the first (8B's V rows in Q6_K beside
        Q4_K Q and K), since they need only the input, not each other's output."""
        branch = self.capturing and self.tuning.branch_segments and len(w.segments) > 1
        if branch:
            self._fork.record(self.stream)
            self.side.wait_event(self._fork)
        yield branch
        if branch:
            self._join.record(self.side)
            self.stream.wait_event(self._join)
