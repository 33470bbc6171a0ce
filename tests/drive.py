"""A test's own driver of Engine.forward: it reserves the KV blocks first, as the engine's
loops and the serving scheduler do (the engine runs only reserved block tables)."""

from __future__ import annotations


def forward(engine, work, **kwargs):
    engine.reserve(work)
    return engine.forward(work, **kwargs)
