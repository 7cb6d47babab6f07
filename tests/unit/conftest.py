"""Fixtures for unit tests that build megatron-core modules in a single-process world."""

from __future__ import annotations

import pytest

from moc_megatron.platform import initialize_distributed


@pytest.fixture(scope="session")
def mcore_world():
    """A one-process gloo world with megatron-core's parallel state (TP=PP=EP=1)."""
    initialize_distributed()
    yield
