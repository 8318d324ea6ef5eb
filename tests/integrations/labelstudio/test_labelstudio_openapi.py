"""The backend's OpenAPI description: it lists exactly the app's routes, and schemathesis, run over
it against the live server (waitress on 127.0.0.1), finds no failure and no server error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

pytest.importorskip("flask")
pytest.importorskip("schemathesis")

from labelstudio_fixtures import Listener, reference_folder, small_segmenter  # noqa: E402
from labelstudio_live import BackendServer  # noqa: E402

from labelstudio_backend.app import OPENAPI, create_app  # noqa: E402
from labelstudio_backend.build import build_backend  # noqa: E402
from labelstudio_backend.settings import Settings  # noqa: E402

USER, PASSWORD = "reviewer", "s3cret"
EXAMPLES_PER_OPERATION = 60


def schemathesis_command() -> list[str]:
    beside = Path(sys.executable).with_name("schemathesis")
    return [str(beside)] if beside.exists() else [shutil.which("schemathesis") or "schemathesis"]


def test_the_description_lists_exactly_the_routes(tiny_backbone, tmp_path):
    app = create_app(build_backend(Settings(model_dir=tmp_path), small_segmenter(tiny_backbone)))
    routes = {(rule.rule, method.lower()) for rule in app.url_map.iter_rules() if rule.endpoint != "static"
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    described = {(path, method) for path, operations in json.loads(OPENAPI.read_text())["paths"].items()
                 for method in operations}
    assert routes == described


@pytest.mark.live
@pytest.mark.parametrize("basic_auth", [None, (USER, PASSWORD)], ids=["open", "basic-auth"])
def test_schemathesis_finds_no_failure_against_the_live_server(tiny_backbone, tmp_path, basic_auth):
    label_studio = Listener("127.0.0.1")  # serves an image at any address
    settings = Settings(label_studio_url=label_studio.url, model_dir=tmp_path / "model", basic_auth=basic_auth,
                        reference_dir=reference_folder(tmp_path / "references"))
    try:
        with BackendServer(build_backend(settings, small_segmenter(tiny_backbone))) as server:
            auth = ["--auth", f"{USER}:{PASSWORD}"] if basic_auth else []
            served = requests.get(server.url + "/openapi.json", auth=basic_auth, timeout=10).json()
            assert served == json.loads(OPENAPI.read_text())
            # positive_data_acceptance is left out: a schema-valid string is rarely a valid labelling
            # config (XML with a BrushLabels on an Image), which JSON Schema cannot express
            run = subprocess.run(
                [*schemathesis_command(), "run", server.url + "/openapi.json", *auth, "--checks", "all",
                 "--exclude-checks", "positive_data_acceptance", "--max-examples", str(EXAMPLES_PER_OPERATION),
                 "--workers", "1", "--request-timeout", "60", "--no-color"],
                capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache stays out of the checkout
    finally:
        label_studio.close()
    summary = run.stdout[-3000:]
    assert run.returncode == 0, summary
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", summary).groups())
    assert generated == passed and generated > 8 * 10, summary
