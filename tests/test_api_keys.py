"""API keys: 'Authorization: Bearer <key>' with the scheme in any case (RFC 6750), nothing else."""

from __future__ import annotations

import pytest

from cluster.api_keys import authorized

KEYS = frozenset({"k1", "k2"})


@pytest.mark.parametrize("header, ok", [
    ("Bearer k1", True), ("bearer k2", True), ("BEARER k1", True), ("Bearer   k1 ", True),
    ("k1", False), ("Bearer", False), ("Bearer k3", False), ("Basic k1", False), ("Bearerk1", False),
    ("Bearer k1 k2", False), ("", False), (None, False),
])
def test_bearer_scheme_in_any_case_and_nothing_else(header, ok):
    assert authorized(header, KEYS) is ok


def test_without_keys_everything_is_allowed():
    assert authorized(None, frozenset()) and authorized("anything", frozenset())
