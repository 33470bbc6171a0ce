"""A test's own drivers: of Engine.forward, which reserves the KV blocks first, as the
engine's loops and the serving scheduler do (the engine runs only reserved block tables);
and of a Scheduler, stepped as the ComputeWorker's loop steps it."""

from __future__ import annotations

from collections import deque


def forward(engine, work, **kwargs):
    engine.reserve(work)
    return engine.forward(work, **kwargs)


def drain(scheduler, before_step=lambda i: None, max_steps=400):
    """Step until idle as ComputeWorker._run does: launch steps (Scheduler.plan_next) until
    Scheduler.depth are in flight, then commit the oldest. Returns ({id: [token ids]}, every
    step launched, the pairs of steps that were in flight together)."""
    tokens, launched, steps, together = {}, deque(), [], []
    for i in range(max_steps):
        before_step(i)
        after = scheduler.plan_next()
        if after is None and not launched:
            return tokens, steps, together
        if after is not None:
            together += [(step, after) for step, _ in launched]
            launched.append((after, scheduler.launch(after)))
            steps.append(after)
            if len(launched) < scheduler.depth:
                continue
        step, pending = launched.popleft()
        for rid, e in scheduler.commit(step, pending()):
            tokens.setdefault(rid, []).append(e.token_id)
    raise AssertionError("scheduler did not drain")
