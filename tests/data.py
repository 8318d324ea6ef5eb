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
ARTIFACTS = TESTS / "artifacts"
EPISODES = json.loads((PARITY / "manifest.json").read_text())
