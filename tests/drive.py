"""A test's own drivers: of Engine.forward, which reserves the KV blocks first, as the
engine's loops and the serving scheduler do (the engine runs only reserved block tables);
of a Scheduler, stepped as the ComputeWorker's loop steps it; and a fixed mix of passes whose
logits two engines (one process and pipeline stages, CPU and GPU) must agree on."""

from __future__ import annotations

from collections import deque

import numpy as np

from workers.engine.engine import Sequence


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


def mixed_passes(engine):
    """Logits of: a batched prefill of two sequences (every row), three batched decode steps, a
    third sequence's prefill in two chunks beside a decode, and single decodes."""
    a, b, c = Sequence([1, 2, 3, 4, 5, 6, 7]), Sequence([9, 8, 7]), Sequence([3, 1, 4, 1, 5, 9, 2, 6])
    out = []

    def step(work, **kw):
        out.append(forward(engine, work, **kw))
        return out[-1]

    try:
        logits = step([(a, 7), (b, 3)], all_logits=True)
        last = logits[[6, 9]]
        for _ in range(3):
            for s, t in zip((a, b), np.argmax(last, axis=-1).tolist()):
                s.token_ids.append(t)
            last = step([(a, 1), (b, 1)])
        step([(c, 5)])
        a.token_ids.append(int(np.argmax(last[0])))
        last = step([(a, 1), (c, 3)])
        for _ in range(2):
            c.token_ids.append(int(np.argmax(last[-1])))
            last = step([(c, 1)])
    finally:
        for s in (a, b, c):
            engine.release(s)
    return out
