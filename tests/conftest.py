"""Shared fixtures: the bundled tiny DINOv3 checkpoint, the parity episodes, example images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARITY = FIXTURES / "parity"
EXAMPLES = ROOT / "examples"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
EPISODES = json.loads((PARITY / "manifest.json").read_text())


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
