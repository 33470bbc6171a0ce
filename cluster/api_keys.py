"""API keys: `Authorization: Bearer <key>` (HTTP header or gRPC metadata), nothing else.

The scheme is matched in any case, as RFC 6750 (and RFC 9110 for auth schemes) says; a bare
key without the scheme is not accepted.
"""

from __future__ import annotations


def authorized(authorization: str | None, keys: frozenset[str]) -> bool:
    """Whether the Authorization value carries one of keys; with no keys configured, all pass."""
    if not keys:
        return True
    scheme, _, key = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and key.strip() in keys
