"""End to end with a real Label Studio 1.23: annotate, connect, retrieve predictions, webhook, preannotate."""

from __future__ import annotations

import re
import shutil
import time

import pytest

pytest.importorskip("flask")
pytest.importorskip("label_studio_sdk")

from PIL import Image  # noqa: E402
from labelstudio_fixtures import (  # noqa: E402
    BRUSH_CONFIG, EXAMPLES, LABEL, TARGETS, insid3_parser, iou, reference_folder, small_segmenter,
)
from labelstudio_live import BackendServer, LabelStudio, label_studio_executable  # noqa: E402

from insid3_core.io import load_mask  # noqa: E402
from labelstudio_backend.app import create_app  # noqa: E402
from labelstudio_backend.build import build_backend  # noqa: E402
from labelstudio_backend.preannotate import preannotate  # noqa: E402
from labelstudio_backend.rle import mask_to_rle, rle_to_mask  # noqa: E402
from labelstudio_backend.settings import Settings  # noqa: E402

pytestmark = pytest.mark.skipif(label_studio_executable() is None, reason="label-studio is not installed")


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    server = LabelStudio(tmp_path_factory.mktemp("label-studio"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def project(label_studio):
    """A BrushLabels project with the example targets uploaded; ``{file name: task}``."""
    created = label_studio.api("POST", "/api/projects/", json={"title": "insid3 e2e", "label_config": BRUSH_CONFIG})
    files = [(f"file{i}", (path.name, path.read_bytes(), "image/png")) for i, path in enumerate(TARGETS)]
    label_studio.api("POST", f"/api/projects/{created['id']}/import", files=files)
    return created["id"]


def tasks_by_name(label_studio, project_id) -> dict:
    tasks = label_studio.api("GET", f"/api/tasks?project={project_id}&fields=all&page_size=100")["tasks"]
    return {next(p.name for p in TARGETS if t["data"]["image"].endswith(p.name)): t for t in tasks}


def annotate(label_studio, task, name):
    truth = load_mask(EXAMPLES / "masks" / name)
    region = {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": truth.shape[1],
              "original_height": truth.shape[0], "image_rotation": 0,
              "value": {"format": "rle", "rle": mask_to_rle(truth), "brushlabels": [LABEL]}}
    return label_studio.api("POST", f"/api/tasks/{task['id']}/annotations/", json={"result": [region]})


def expected_masks(segmenter, reference_names):
    references = segmenter.encode_references([(EXAMPLES / "targets" / n, EXAMPLES / "masks" / n) for n in reference_names])
    return dict(zip((p.name for p in TARGETS), segmenter.segment(references, TARGETS)))


def check_predictions(tasks, expected, model_version):
    for name, task in tasks.items():
        predictions = [p for p in task["predictions"] if p["model_version"] == model_version]
        assert len(predictions) == 1, f"{name}: {[p['model_version'] for p in task['predictions']]}"
        regions = predictions[0]["result"]
        truth = expected[name].mask
        if not truth.any():
            assert regions == []
            continue
        (region,) = regions
        decoded = rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])
        overlap = iou(decoded, truth)
        print(f"label studio task {task['id']} {name}: prediction stored, score {predictions[0]['score']:.3f}, IoU {overlap:.4f}")
        assert overlap >= 0.99, name
        assert region["meta"]["text"][0].startswith("insid3 quality:")


def test_end_to_end(label_studio, project, tiny_backbone, tmp_path):
    segmenter = small_segmenter(tiny_backbone)
    first, second = TARGETS[0].name, TARGETS[1].name
    annotate(label_studio, tasks_by_name(label_studio, project)[first], first)
    settings = Settings(label_studio_url=label_studio.url, api_key=label_studio.personal_access_token,
                        model_dir=tmp_path / "model", max_tasks_per_request=4)
    backend = build_backend(settings, segmenter)
    with BackendServer(create_app(backend)) as server:
        label_studio.api("POST", "/api/ml", json={"url": server.url, "project": project, "title": "insid3"})
        label_studio.api("POST", "/api/webhooks/", json={
            "project": project, "url": f"{server.url}/webhook", "send_payload": True, "send_for_all_actions": False,
            "actions": ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]})

        # 8 tasks > max_tasks_per_request: Label Studio falls back to one request per task
        label_studio.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                         json={"selectedItems": {"all": True, "excluded": []}})
        version = backend.model_version(project)
        check_predictions(tasks_by_name(label_studio, project), expected_masks(segmenter, [first]), version)

        # an expired access token is refreshed from the personal access token
        backend.fetcher.credentials._access = "expired"
        fetched = backend.fetcher.fetch(tasks_by_name(label_studio, project)[first]["data"]["image"])
        assert fetched.size == Image.open(TARGETS[0]).size

        annotate(label_studio, tasks_by_name(label_studio, project)[second], second)
        deadline = time.monotonic() + 30
        while backend.model_version(project) == version and time.monotonic() < deadline:
            time.sleep(0.5)
        new_version = backend.model_version(project)
        assert new_version != version, "the webhook did not change the reference pool"
        assert len(backend.pool(project)[0][LABEL]) == 2

        assert preannotate(backend, project, batch_size=4, progress=False) == (new_version, len(TARGETS), 0, [])
        check_predictions(tasks_by_name(label_studio, project), expected_masks(segmenter, [first, second]), new_version)
        assert preannotate(backend, project, batch_size=4, progress=False) == (new_version, 0, len(TARGETS), [])


def test_preannotate_command_resumes(label_studio, project, monkeypatch, tmp_path, capsys):
    tasks = tasks_by_name(label_studio, project)
    if not any(task["annotations"] for task in tasks.values()):
        annotate(label_studio, tasks[TARGETS[0].name], TARGETS[0].name)
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.personal_access_token)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    command = ["labelstudio", "preannotate", "--project", str(project), "--image-size", "128",
               "--svd-components", "16", "--device", "cpu", "--batch-size", "3"]
    arguments = insid3_parser().parse_args(command + ["--no-progress"])
    assert arguments.handler(arguments) == 0
    version = re.search(r"model version (\S+):", capsys.readouterr().err).group(1)
    tasks = tasks_by_name(label_studio, project)

    for task in list(tasks.values())[:3]:
        for prediction in task["predictions"]:
            if prediction["model_version"] == version:
                label_studio.api("DELETE", f"/api/predictions/{prediction['id']}/")
    arguments = insid3_parser().parse_args(command)
    assert arguments.handler(arguments) == 0
    assert f"{version}: 3 task(s) predicted, {len(TARGETS) - 3} already had" in capsys.readouterr().err
    tasks = tasks_by_name(label_studio, project)
    assert all(sum(p["model_version"] == version for p in task["predictions"]) == 1 for task in tasks.values())


def test_local_files_storage_and_reference_folder(label_studio, tiny_backbone, tmp_path):
    """Tasks from local-files storage, references from INSID3_REFERENCE_DIR, one unreadable image."""
    folder = label_studio.files / "scenes"
    folder.mkdir()
    for path in TARGETS:
        shutil.copy(path, folder / path.name)
    (folder / "zz_broken.png").write_bytes(b"not a png")
    created = label_studio.api("POST", "/api/projects/", json={"title": "insid3 local files", "label_config": BRUSH_CONFIG})
    storage = label_studio.api("POST", "/api/storages/localfiles", json={
        "project": created["id"], "path": str(folder), "regex_filter": r".*\.png", "use_blob_urls": True, "title": "scenes"})
    label_studio.api("POST", f"/api/storages/localfiles/{storage['id']}/sync")
    segmenter = small_segmenter(tiny_backbone)
    settings = Settings(label_studio_url=label_studio.url, api_key=label_studio.personal_access_token,
                        model_dir=tmp_path / "model", reference_dir=reference_folder(tmp_path / "references"),
                        max_tasks_per_request=16)
    backend = build_backend(settings, segmenter)
    with BackendServer(create_app(backend)) as server:
        label_studio.api("POST", "/api/ml", json={"url": server.url, "project": created["id"], "title": "insid3"})
        label_studio.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={created['id']}",
                         json={"selectedItems": {"all": True, "excluded": []}})
    tasks = label_studio.api("GET", f"/api/tasks?project={created['id']}&fields=all&page_size=100")["tasks"]
    assert all(task["data"]["image"].startswith("/data/local-files/?d=") for task in tasks)
    broken = [task for task in tasks if task["data"]["image"].endswith("zz_broken.png")]
    assert len(tasks) == len(TARGETS) + 1 and broken[0]["predictions"] == []
    references = segmenter.encode_references([(EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")])
    expected = dict(zip((p.name for p in TARGETS), segmenter.segment(references, TARGETS)))
    check_predictions({name: next(t for t in tasks if t["data"]["image"].endswith(name)) for name in expected},
                      expected, backend.model_version(created["id"]))
