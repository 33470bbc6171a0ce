"""ComputeWorker's watchdog: a forward pass that never returns (a wedged device) fails the worker
instead of leaving its requests waiting while every health check passes. The loop itself is
not run: the watchdog reads when the loop began its step (`busy_since`), which is all a wedged
loop leaves behind (a stuck stage of a pipeline, the other case, is tests/test_pipeline.py's)."""

from __future__ import annotations

import threading
import time

import pytest

from workers.compute_worker import STALL_GRACE_S, ComputeWorker, WorkerFailed

STEP_TIMEOUT_S = 300.0


def stepping_worker(stepping_for: float):
    """The worker's state as its loop leaves it stepping_for seconds into a step, two requests
    running (one with a token not yet polled)."""
    worker = object.__new__(ComputeWorker.__ray_actor_class__)
    worker.lock, worker.failure, worker.poll_waiting = threading.Lock(), None, False
    worker.stall_s = STEP_TIMEOUT_S + STALL_GRACE_S
    worker.outbox = {"a": [], "b": [{"token_id": 7, "text": "x", "finish_reason": None}]}
    worker.busy_since = time.monotonic() - stepping_for
    return worker


def test_a_step_within_its_limit_is_left_alone():
    worker = stepping_worker(STEP_TIMEOUT_S + STALL_GRACE_S - 5)
    worker._check_alive()
    worker._watch()
    assert worker.failure is None and worker.outbox["a"] == []


@pytest.mark.parametrize("loop_holds_the_lock", [False, True])
def test_a_step_past_its_limit_fails_every_request_and_every_later_call(loop_holds_the_lock):
    worker = stepping_worker(STEP_TIMEOUT_S + STALL_GRACE_S + 1)
    if loop_holds_the_lock:  # stuck inside a planning or committing call: the requests still end
        assert worker.lock.acquire()
    with pytest.raises(WorkerFailed, match=r"TimeoutError: a forward pass has not finished in 330 s") as failed:
        worker._check_alive()
    for request_id in ("a", "b"):  # the requests are told what the later calls are
        assert worker.outbox[request_id][-1]["error"] == str(failed.value)
    assert "not finished in 330 s (step_timeout_s + 30 s)" in str(failed.value)
    assert worker.outbox["b"][0]["token_id"] == 7  # what was made before it is still delivered
    worker.busy_since = None  # even if the step returns after all, the worker stays failed
    with pytest.raises(WorkerFailed):
        worker._check_alive()
