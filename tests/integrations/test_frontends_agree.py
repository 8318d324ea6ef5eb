"""The same non-default engine settings through the command line, the FiftyOne operator and the Label
Studio backend give the same mask and the same verdict (the operator once ignored ``refinement``
and the quality thresholds: IoU 0.86 and ``ok`` instead of ``fragmented``)."""

from __future__ import annotations

import json
from importlib.util import find_spec

import numpy as np
import pytest
from PIL import Image

from data import EXAMPLES
from insid3_core.cli import main
from insid3_core.metrics import mask_iou

pytestmark = pytest.mark.skipif(find_spec("fiftyone") is None or find_spec("flask") is None,
                                reason="needs the fiftyone and labelstudio extras")

REFERENCE = (EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")
SETTINGS = {"refinement": "guided", "tau": 0.7, "merge_threshold": 0.3, "max_components": 1,
            "image_size": 128, "svd_components": 16, "device": "cpu"}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """The example scene beside its mirror image: the object twice, two components."""
    from labelstudio_fixtures import tiled_image

    return tiled_image(tmp_path_factory.mktemp("target") / "tiled.png")


@pytest.fixture(scope="module")
def from_the_command_line(target, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    flags = [part for name, value in SETTINGS.items() for part in (f"--{name.replace('_', '-')}", str(value))]
    assert main(["segment", "--ref", *map(str, REFERENCE), *flags, "--out", str(out), str(target)]) == 0
    mask = np.asarray(Image.open(out / "tiled.png")) > 0
    (entry,) = json.loads((out / "annotations.json").read_text())["annotations"]
    return mask, entry["quality"]["verdict"]


def test_the_fiftyone_operator_agrees(fo, target, from_the_command_line):
    import fiftyone.operators as foo
    from fiftyone_setup import PLUGIN_URI

    dataset = fo.Dataset()
    try:
        dataset.add_samples([fo.Sample(filepath=str(REFERENCE[0]), tags=["reference"],
                                       ground_truth=fo.Segmentation(mask_path=str(REFERENCE[1]))),
                             fo.Sample(filepath=str(target))])
        foo.execute_operator(f"{PLUGIN_URI}/segment_by_example", {"dataset": dataset},
                             params={"reference_field": "ground_truth", "output_field": "pred", **SETTINGS})
        sample = dataset.match_tags("reference", bool=False).first()
        mask, verdict = from_the_command_line
        assert mask_iou(sample.pred.mask > 0, mask) == 1.0
        assert sample.pred.verdict == verdict == "fragmented"
        made_with = dataset.info["insid3"]["pred"]["settings"]
        assert {name: made_with[name] for name in SETTINGS} == SETTINGS
    finally:
        dataset.delete()


def test_the_label_studio_backend_agrees(target, from_the_command_line, tmp_path, monkeypatch):
    """The backend as ``insid3 labelstudio serve`` builds it, its engine settings from ``INSID3_*``."""
    import shutil

    from labelstudio_fixtures import BRUSH_CONFIG, LABEL, UPLOADS, StaticServer, insid3_parser

    from labelstudio_backend.app import create_app
    from labelstudio_backend.commands import backend_from_arguments
    from labelstudio_backend.rle import rle_to_mask
    from labelstudio_backend.settings import Settings

    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(target, served / "tiled.png")
    references = tmp_path / "references" / LABEL
    references.mkdir(parents=True)
    for path in REFERENCE:
        shutil.copy(path, references / path.name)
    with StaticServer(served) as server:
        for name, value in SETTINGS.items():
            monkeypatch.setenv(f"INSID3_{name.upper()}", str(value))
        monkeypatch.setenv("LABEL_STUDIO_URL", server.url)
        monkeypatch.setenv("INSID3_REFERENCE_DIR", str(tmp_path / "references"))
        monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
        backend = backend_from_arguments(insid3_parser().parse_args(["labelstudio", "serve"]),
                                         Settings.from_environment())
        answer = create_app(backend).test_client().post("/predict", json={
            "tasks": [{"id": 1, "data": {"image": UPLOADS + "/tiled.png"}}], "project": "1.1", "label_config": BRUSH_CONFIG})
    assert answer.status_code == 200, answer.get_json()
    (region,) = answer.get_json()["results"][0]["result"]
    mask, verdict = from_the_command_line
    decoded = rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])
    assert mask_iou(decoded, mask) == 1.0
    assert region["meta"]["text"][0].startswith(f"insid3 quality: {verdict} ")
