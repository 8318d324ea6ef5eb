"""Where the tests' data lies: the repository, its examples, the parity episodes, and the folder
for artifacts the tests leave to look at (screenshots, figures)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
FIXTURES = TESTS / "fixtures"
PARITY = FIXTURES / "parity"
EXAMPLES = ROOT / "examples"
EXAMPLE_REFERENCE = (EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")
EXAMPLE_TARGETS = sorted((EXAMPLES / "targets").glob("*.png"))
ARTIFACTS = TESTS / "artifacts"
EPISODES = json.loads((PARITY / "manifest.json").read_text())
