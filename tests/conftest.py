"""Fixtures of every test: a cache of positional bases of its own, and the bundled tiny DINOv3 checkpoint."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """Keep positional-basis caches of the test run out of the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("INSID3_CACHE_DIR", str(tmp_path_factory.mktemp("insid3-cache")))
    patch.delenv("INSID3_WEIGHTS", raising=False)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_backbone():
    from insid3_core import TEST_CHECKPOINT, load_backbone

    return load_backbone(TEST_CHECKPOINT, device="cpu")
