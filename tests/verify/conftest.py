"""Fixtures of the verifier tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from unprivileged import Unprivileged, unprivileged_tree


@pytest.fixture(scope="session")
def unprivileged() -> Iterator[Unprivileged]:
    """tapd's verifier, runnable as an unprivileged uid (the test process is root)."""
    with unprivileged_tree() as u:
        yield u
