"""Independent chunks of an array's rows on a thread pool: NumPy releases the GIL inside its
loops, so chunks big enough that those loops take the time run on every core (dequantizing a
model to load it on the CPU, quantizing one, the log-softmax of scored logits)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

MAX_THREADS = 8  # each chunk's temporaries are its own (the quantizer's scale search: ~12 MB)
_NAME = "ntr-rows"
_pool: ThreadPoolExecutor | None = None


def each_chunk(rows: int, step: int, task: Callable[[int], None]) -> None:
    """task(start) for each start in range(0, rows, step), on the pool when there are several
    (in the calling thread when that is one of the pool's: a task waiting for others that no
    free thread would run); a task's error is raised here."""
    starts = range(0, rows, step)
    if len(starts) <= 1 or threading.current_thread().name.startswith(_NAME):
        for start in starts:
            task(start)
        return
    for _ in _threads().map(task, starts):
        pass


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        _pool = ThreadPoolExecutor(max_workers=min(cpus, MAX_THREADS), thread_name_prefix=_NAME)
    return _pool


def _forget_threads() -> None:
    """A forked child has none of its parent's threads: a pool it inherited would take tasks
    and never run them."""
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_threads)
