"""End to end with a real Label Studio 1.23: annotate, connect, retrieve predictions, webhook, preannotate,
verdicts in the Data Manager."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flask")
pytest.importorskip("label_studio_sdk")

import requests  # noqa: E402
from PIL import Image  # noqa: E402
from labelstudio_fixtures import (  # noqa: E402
    BRUSH_CONFIG, EXAMPLES, LABEL, TARGETS, brush_region, insid3_parser, reference_folder,
    scene_reference_folder, small_segmenter, two_disk_scenes, verdict_images, verdict_segmenter,
)
from labelstudio_live import BackendServer, LabelStudio, label_studio_executable  # noqa: E402

from insid3_core.instances import split_instances  # noqa: E402
from insid3_core.io import load_mask  # noqa: E402
from insid3_core.quality import VERDICTS  # noqa: E402
from insid3_core.metrics import mask_iou  # noqa: E402
from labelstudio_backend.build import build_backend  # noqa: E402
from labelstudio_backend.connect import WEBHOOK_ACTIONS, basic_auth_header  # noqa: E402
from labelstudio_backend.preannotate import Report, preannotate  # noqa: E402
from labelstudio_backend.rle import rle_to_mask  # noqa: E402
from labelstudio_backend.settings import Settings  # noqa: E402

BASIC_AUTH = ("insid3-lead", "s3cret-pass")

pytestmark = [pytest.mark.live, pytest.mark.skipif(label_studio_executable() is None, reason="label-studio is not installed")]


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
    region = brush_region(load_mask(EXAMPLES / "masks" / name))
    return label_studio.api("POST", f"/api/tasks/{task['id']}/annotations/", json={"result": [region]})


def run_connect(label_studio, monkeypatch, capsys, project_id, backend_url, basic_auth=None) -> str:
    """``insid3 labelstudio connect`` with the environment a lead would set; returns what it printed."""
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.personal_access_token)
    monkeypatch.setenv("BASIC_AUTH_USER", basic_auth[0] if basic_auth else "")
    monkeypatch.setenv("BASIC_AUTH_PASS", basic_auth[1] if basic_auth else "")
    arguments = insid3_parser().parse_args(
        ["labelstudio", "connect", "--project", str(project_id), "--backend-url", backend_url])
    assert arguments.handler(arguments) == 0, capsys.readouterr().err
    return capsys.readouterr().err


def check_connection(label_studio, project_id, backend_url, basic_auth=None):
    """One ML backend and one webhook (annotation events, auth header) to the backend, no duplicate."""
    (ml_backend,) = [b for b in label_studio.api("GET", f"/api/ml?project={project_id}") if b["url"] == backend_url]
    assert ml_backend["auth_method"] == ("BASIC_AUTH" if basic_auth else "NONE")
    hooks = [h for h in label_studio.api("GET", f"/api/webhooks/?project={project_id}")
             if h["url"].startswith(backend_url)]
    (hook,) = hooks
    assert hook["url"] == f"{backend_url}/webhook" and not hook["send_for_all_actions"] and hook["send_payload"]
    assert sorted(hook["actions"]) == sorted(WEBHOOK_ACTIONS)
    assert (hook["headers"] or {}) == basic_auth_header(basic_auth)


def expected_masks(segmenter, reference_names):
    references = segmenter.encode({"object": [(EXAMPLES / "targets" / n, EXAMPLES / "masks" / n) for n in reference_names]})
    return dict(zip((p.name for p in TARGETS), segmenter.segment(references, TARGETS)))


def check_predictions(tasks, expected, model_version, step):
    print(f"{step}: model version {model_version}")
    for name, task in tasks.items():
        predictions = [p for p in task["predictions"] if p["model_version"] == model_version]
        assert len(predictions) == 1, f"{name}: {[p['model_version'] for p in task['predictions']]}"
        (region,) = predictions[0]["result"]
        truth = expected[name]
        decoded = rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])
        overlap = mask_iou(decoded, truth.mask)
        print(f"label studio task {task['id']} {name}: prediction stored, score {predictions[0]['score']:.3f}, "
              f"verdict {truth.quality.verdict}, IoU {overlap:.4f}")
        assert overlap >= 0.99, name
        assert region["meta"]["text"][0].startswith(f"insid3 quality: {truth.quality.verdict} (")


def test_end_to_end(label_studio, project, tiny_backbone, tmp_path, monkeypatch, capsys):
    """With basic auth on: ``connect`` (twice), retrieve predictions, the webhook, preannotate."""
    segmenter = small_segmenter(tiny_backbone)
    first, second = TARGETS[0].name, TARGETS[1].name
    annotate(label_studio, tasks_by_name(label_studio, project)[first], first)
    settings = Settings(label_studio_url=label_studio.url, api_key=label_studio.personal_access_token,
                        model_dir=tmp_path / "model", max_tasks_per_request=4, basic_auth=BASIC_AUTH)
    backend = build_backend(settings, segmenter)
    with BackendServer(backend) as server:
        assert "connected), webhook" in run_connect(label_studio, monkeypatch, capsys, project, server.url, BASIC_AUTH)
        again = run_connect(label_studio, monkeypatch, capsys, project, server.url, BASIC_AUTH)
        assert "already connected), webhook" in again and "(updated), 0 duplicate(s)" in again
        check_connection(label_studio, project, server.url, BASIC_AUTH)

        # 8 tasks > max_tasks_per_request: Label Studio falls back to one request per task
        label_studio.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                         json={"selectedItems": {"all": True, "excluded": []}})
        version = backend.model_version(project)
        check_predictions(tasks_by_name(label_studio, project), expected_masks(segmenter, [first]), version,
                          "retrieve predictions (1 reference)")

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

        # a /train without annotations reads them from Label Studio again (it emptied the cache)
        answer = requests.post(f"{server.url}/train", json={"project": project, "label_config": BRUSH_CONFIG},
                               auth=BASIC_AUTH, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == new_version and len(backend.pool(project)[0][LABEL]) == 2

        assert preannotate(backend, project, batch_size=4, progress=False) == Report(new_version, len(TARGETS), 0, [])
        check_predictions(tasks_by_name(label_studio, project), expected_masks(segmenter, [first, second]), new_version,
                          "preannotate (2 references, the second from the webhook)")
        assert preannotate(backend, project, batch_size=4, progress=False) == Report(new_version, 0, len(TARGETS), [])


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
    width, height = Image.open(TARGETS[0]).size  # the three tasks' pixels together exceed the budget
    monkeypatch.setenv("INSID3_MAX_PIXELS", str(width * height))
    monkeypatch.setenv("INSID3_MAX_PIXELS_IN_FLIGHT", str(2 * width * height))
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
    with BackendServer(backend) as server:
        label_studio.api("POST", "/api/ml", json={"url": server.url, "project": created["id"], "title": "insid3"})
        label_studio.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={created['id']}",
                         json={"selectedItems": {"all": True, "excluded": []}})
    tasks = label_studio.api("GET", f"/api/tasks?project={created['id']}&fields=all&page_size=100")["tasks"]
    assert all(task["data"]["image"].startswith("/data/local-files/?d=") for task in tasks)
    broken = [task for task in tasks if task["data"]["image"].endswith("zz_broken.png")]
    assert len(tasks) == len(TARGETS) + 1 and broken[0]["predictions"] == []
    references = segmenter.encode({"object": [(EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")]})
    expected = dict(zip((p.name for p in TARGETS), segmenter.segment(references, TARGETS)))
    check_predictions({name: next(t for t in tasks if t["data"]["image"].endswith(name)) for name in expected},
                      expected, backend.model_version(created["id"]), "local-files storage, INSID3_REFERENCE_DIR")


def test_verdicts_are_filterable_in_the_data_manager(label_studio, tiny_backbone, tmp_path, monkeypatch, capsys):
    """Every verdict, empty included, is found by a Data Manager view filtering *Prediction results* by its text.

    The references are prepared in the background: while that takes long, connecting succeeds (Label Studio
    waits 3 s for /setup) and retrieving predictions stores none (503) instead of hanging.
    """
    images = verdict_images(tmp_path / "verdicts")
    created = label_studio.api("POST", "/api/projects/", json={"title": "insid3 verdicts", "label_config": BRUSH_CONFIG})
    files = [(f"file{i}", (path.name, path.read_bytes(), "image/png")) for i, path in enumerate(images)]
    label_studio.api("POST", f"/api/projects/{created['id']}/import", files=files)
    segmenter = verdict_segmenter(tiny_backbone)
    settings = Settings(label_studio_url=label_studio.url, api_key=label_studio.personal_access_token,
                        model_dir=tmp_path / "model", reference_dir=reference_folder(tmp_path / "references"),
                        max_tasks_per_request=16, warmup_wait=1)
    backend = build_backend(settings, segmenter)
    release, encode = threading.Event(), backend.predictor.references
    backend.predictor.references = lambda pairs, key: release.wait(120) and encode(pairs, key)
    retrieve = f"/api/dm/actions?id=retrieve_tasks_predictions&project={created['id']}"
    with BackendServer(backend) as server:
        run_connect(label_studio, monkeypatch, capsys, created["id"], server.url)
        run_connect(label_studio, monkeypatch, capsys, created["id"], server.url)
        check_connection(label_studio, created["id"], server.url)
        label_studio.api("POST", retrieve, json={"selectedItems": {"all": True, "excluded": []}})
        tasks = label_studio.api("GET", f"/api/tasks?project={created['id']}&fields=all&page_size=100")["tasks"]
        assert [t["predictions"] for t in tasks] == [[]] * len(images), "predicted before the references were ready"
        release.set()
        deadline = time.monotonic() + 60
        while backend.warmups.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        label_studio.api("POST", retrieve, json={"selectedItems": {"all": True, "excluded": []}})
    references = segmenter.encode({"object": [(EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")]})
    expected = dict(zip((path.name for path in images), segmenter.segment(references, images)))
    tasks = label_studio.api("GET", f"/api/tasks?project={created['id']}&fields=all&page_size=100")["tasks"]
    by_name = {next(name for name in expected if t["data"]["image"].endswith(name)): t for t in tasks}
    check_predictions(by_name, expected, backend.model_version(created["id"]), "verdicts project")
    for verdict in VERDICTS:
        view = label_studio.api("POST", "/api/dm/views", json={"project": created["id"], "data": {"filters": {
            "conjunction": "and", "items": [{"filter": "filter:tasks:predictions_results", "operator": "contains",
                                             "type": "String", "value": f"insid3 quality: {verdict} ("}]}}})
        found = label_studio.api("GET", f"/api/tasks?view={view['id']}&page_size=100")["tasks"]
        names = sorted(name for name, task in by_name.items() if task["id"] in {t["id"] for t in found})
        print(f"data manager filter 'insid3 quality: {verdict}': {names}")
        assert names == sorted(name for name, truth in expected.items() if truth.quality.verdict == verdict)
        assert names, verdict
    # Label Studio averages "Prediction score" over the predictions of the project's selected model version
    label_studio.api("PATCH", f"/api/projects/{created['id']}", json={"model_version": backend.model_version(created["id"])})
    ordered = label_studio.api("GET", f"/api/tasks?project={created['id']}&page_size=100&query="
                               + json.dumps({"ordering": ["tasks:predictions_score"]}))["tasks"]
    assert ordered[0]["id"] == by_name["blank.png"]["id"], "the empty prediction (score 0) sorts first"


def test_instances_project(label_studio, tiny_backbone, tmp_path):
    """INSID3_INSTANCES=necks: Label Studio stores one region per disk, each with its own mask and score."""
    images = two_disk_scenes(tmp_path / "scenes", count=2)
    created = label_studio.api("POST", "/api/projects/", json={"title": "insid3 instances", "label_config": BRUSH_CONFIG})
    files = [(f"file{i}", (path.name, path.read_bytes(), "image/png")) for i, path in enumerate(images)]
    label_studio.api("POST", f"/api/projects/{created['id']}/import", files=files)
    segmenter = small_segmenter(tiny_backbone)
    folder = scene_reference_folder(tmp_path / "references")
    settings = Settings(label_studio_url=label_studio.url, api_key=label_studio.personal_access_token,
                        model_dir=tmp_path / "model", reference_dir=folder, instances="necks")
    backend = build_backend(settings, segmenter)
    with BackendServer(backend) as server:
        label_studio.api("POST", "/api/ml", json={"url": server.url, "project": created["id"], "title": "insid3"})
        label_studio.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={created['id']}",
                         json={"selectedItems": {"all": True, "excluded": []}})
    classes = segmenter.encode({label: [(folder / label / "scene.png", folder / label / "scene_mask.png")]
                                for label in (LABEL, "Other")})
    expected = dict(zip((path.name for path in images), segmenter.segment(classes, images)))
    version = backend.model_version(created["id"])
    tasks = label_studio.api("GET", f"/api/tasks?project={created['id']}&fields=all&page_size=100")["tasks"]
    print(f"instances project: model version {version}")
    for task in tasks:
        name = next(name for name in expected if task["data"]["image"].endswith(name))
        (stored,) = [p for p in task["predictions"] if p["model_version"] == version]
        disks = [r for r in stored["result"] if r["value"]["brushlabels"] == [LABEL]]
        instances = split_instances(expected[name].classes[LABEL], "necks")
        print(f"label studio task {task['id']} {name}: {len(stored['result'])} regions, {len(disks)} {LABEL} "
              f"(scores {[r['score'] for r in disks]}), prediction score {stored['score']:.3f}")
        assert len(disks) == len(instances) == 2
        for region, instance in zip(disks, instances):
            mask = rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])
            assert mask_iou(mask, instance.mask) >= 0.99 and region["score"] == pytest.approx(instance.score, abs=1e-4)
            assert region["meta"]["text"][0].startswith("insid3 quality: ")


def region_config(control: str) -> str:
    return (f'<View><Image name="image" value="$image" smoothing="false"/><{control} name="tag" toName="image">'
            f'<Label value="{LABEL}" background="#ff0000"/></{control}></View>')


@pytest.mark.parametrize("control, kind, token", [
    ("BitmaskLabels", "bitmasklabels", "personal access token"),
    ("PolygonLabels", "polygonlabels", "legacy token"),
])
def test_bitmask_and_polygon_projects(label_studio, tiny_backbone, tmp_path, control, kind, token):
    """A project of each newer region type: its annotation (stored by Label Studio in that type) is
    the reference, the backend reads it with either kind of token, and the predictions Label Studio
    stores are of that type and decode to the engine's masks."""
    from labelstudio_backend.regions import mask_values, value_mask
    from labelstudio_live import LEGACY_TOKEN

    created = label_studio.api("POST", "/api/projects/", json={"title": f"insid3 {control}",
                                                              "label_config": region_config(control)})
    files = [(f"file{i}", (path.name, path.read_bytes(), "image/png")) for i, path in enumerate(TARGETS[:3])]
    label_studio.api("POST", f"/api/projects/{created['id']}/import", files=files)
    tasks = {next(p.name for p in TARGETS if t["data"]["image"].endswith(p.name)): t for t in
             label_studio.api("GET", f"/api/tasks?project={created['id']}&fields=all&page_size=100")["tasks"]}
    truth = load_mask(EXAMPLES / "masks" / TARGETS[0].name)
    (value,) = mask_values(kind, LABEL, truth)[:1]
    region = {"from_name": "tag", "to_name": "image", "type": kind, "original_width": truth.shape[1],
              "original_height": truth.shape[0], "image_rotation": 0, "value": value}
    label_studio.api("POST", f"/api/tasks/{tasks[TARGETS[0].name]['id']}/annotations/", json={"result": [region]})
    api_key = label_studio.personal_access_token if token == "personal access token" else LEGACY_TOKEN
    segmenter = small_segmenter(tiny_backbone)
    settings = Settings(label_studio_url=label_studio.url, api_key=api_key, model_dir=tmp_path / "model")
    backend = build_backend(settings, segmenter)
    with BackendServer(backend) as server:
        label_studio.api("POST", "/api/ml", json={"url": server.url, "project": created["id"], "title": "insid3"})
        label_studio.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={created['id']}",
                         json={"selectedItems": {"all": True, "excluded": []}})
    reference = value_mask(kind, value, *truth.shape)
    expected = segmenter.segment(segmenter.encode({LABEL: [(TARGETS[0], reference)]}), TARGETS[:3])
    version = backend.model_version(created["id"])
    stored = label_studio.api("GET", f"/api/tasks?project={created['id']}&fields=all&page_size=100")["tasks"]
    for task in stored:
        name = next(p.name for p in TARGETS if task["data"]["image"].endswith(p.name))
        (prediction,) = [p for p in task["predictions"] if p["model_version"] == version]
        assert {r["type"] for r in prediction["result"]} == {kind}
        masks = [value_mask(kind, r["value"], r["original_height"], r["original_width"]) for r in prediction["result"]]
        overlap = mask_iou(np.logical_or.reduce(masks), expected[[p.name for p in TARGETS].index(name)].mask)
        print(f"{control} ({token}): task {task['id']} {name}: {len(masks)} region(s) stored, IoU {overlap:.4f}")
        assert overlap >= (0.99 if kind == "bitmasklabels" else 0.9)


def test_interactive_pre_annotation_through_label_studio(label_studio, tiny_backbone, tmp_path):
    """Label Studio's interactive-annotating call (what its editor sends when an annotator brushes a
    region with auto-annotation on) reaches the backend as /predict with params.context; the
    answer Label Studio relays holds the other disk of the image."""
    from labelstudio_backend.regions import mask_values, value_mask
    from scenes import disk

    images = two_disk_scenes(tmp_path / "scenes", count=1)
    created = label_studio.api("POST", "/api/projects/", json={"title": "insid3 interactive", "label_config": BRUSH_CONFIG})
    label_studio.api("POST", f"/api/projects/{created['id']}/import",
                     files=[("file0", (images[0].name, images[0].read_bytes(), "image/png"))])
    (task,) = label_studio.api("GET", f"/api/tasks?project={created['id']}&fields=all")["tasks"]
    settings = Settings(label_studio_url=label_studio.url, api_key=label_studio.personal_access_token,
                        model_dir=tmp_path / "model")
    backend = build_backend(settings, small_segmenter(tiny_backbone))
    drawn = disk((384, 320), (100, 160), 60)
    (value,) = mask_values("brushlabels", LABEL, drawn)
    context = {"result": [{"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 384,
                           "original_height": 320, "value": value}]}
    with BackendServer(backend) as server:
        ml = label_studio.api("POST", "/api/ml", json={"url": server.url, "project": created["id"], "title": "insid3",
                                                      "is_interactive": True})
        answer = label_studio.api("POST", f"/api/ml/{ml['id']}/interactive-annotating",
                                  json={"task": task["id"], "context": context})
    assert "errors" not in answer, answer
    regions = [value_mask("brushlabels", r["value"], 320, 384) for r in answer["data"]["result"]]
    other = disk((384, 320), (290, 170), 60)
    best = max((mask_iou(region, other) for region in regions), default=0.0)
    print(f"interactive through Label Studio: {len(regions)} region(s), IoU with the other disk {best:.3f}")
    assert best > 0.5
    assert not any((region & drawn).sum() > 0.5 * region.sum() for region in regions)


HIDDEN_COLUMNS = [f"tasks:{name}" for name in (
    "inner_id", "completed_at", "total_annotations", "cancelled_annotations", "total_predictions", "annotators",
    "annotations_results", "annotations_ids", "predictions_results", "predictions_model_versions", "file_upload",
    "storage_filename", "created_at", "updated_at", "updated_by", "avg_lead_time", "draft_exists", "comment_count",
    "unresolved_comment_count", "comment_authors", "predictions_score")]
"""Data Manager columns the screenshot's view hides, so the insid3 columns are in sight."""


def test_verdict_columns_after_preannotate(label_studio, tiny_backbone, tmp_path):
    """After ``preannotate`` each task's verdict is a Data Manager column (task data
    ``insid3_verdict``): filterable and sortable, and always that of the current model version
    (a new reference makes a new version; the next preannotate moves every task's column to it).
    The live test takes the README's screenshots of the recipe."""
    import shutil as shell

    from insid3_core.io import write_mask_png
    from labelstudio_backend.preannotate import preannotate

    images = verdict_images(tmp_path / "verdicts")
    created = label_studio.api("POST", "/api/projects/", json={"title": "insid3 verdict columns", "label_config": BRUSH_CONFIG})
    project = created["id"]
    files = [(f"file{i}", (path.name, path.read_bytes(), "image/png")) for i, path in enumerate(images)]
    label_studio.api("POST", f"/api/projects/{project}/import", files=files)
    folder = reference_folder(tmp_path / "references")
    segmenter = verdict_segmenter(tiny_backbone)
    settings = Settings(label_studio_url=label_studio.url, api_key=label_studio.personal_access_token,
                        model_dir=tmp_path / "model", reference_dir=folder)
    backend = build_backend(settings, segmenter)
    references = [(EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")]
    for step in ("one reference", "two references"):
        report = preannotate(backend, project, batch_size=4, progress=False)
        version = report.model_version
        expected = dict(zip((p.name for p in images), segmenter.segment(segmenter.encode({LABEL: references}), images)))
        tasks = label_studio.api("GET", f"/api/tasks?project={project}&fields=all&page_size=100")["tasks"]
        by_name = {next(n for n in expected if t["data"]["image"].endswith(n)): t for t in tasks}
        for name, task in by_name.items():
            assert task["data"]["insid3_model_version"] == version, (step, name)
            verdict = expected[name].quality.verdict
            assert task["data"]["insid3_verdict"] == verdict and task["data"]["insid3_verdicts"] == f"{LABEL}: {verdict}"
        print(f"{step}: version {version}, verdict column {sorted((t['data']['insid3_verdict'], n) for n, t in by_name.items())}")
        shell.copy(TARGETS[1], folder / LABEL / "second.png")
        write_mask_png(folder / LABEL / "second_mask.png", load_mask(EXAMPLES / "masks" / TARGETS[1].name))
        references = references + [(TARGETS[1], EXAMPLES / "masks" / TARGETS[1].name)]
    view = label_studio.api("POST", "/api/dm/views", json={"project": project, "data": {"title": "too small, current version",
        "filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:data.insid3_verdict", "operator": "contains", "type": "String", "value": "too_small"},
            {"filter": "filter:tasks:data.insid3_model_version", "operator": "equal", "type": "String", "value": version}]},
        "ordering": ["tasks:data.insid3_score"], "hiddenColumns": {"explore": HIDDEN_COLUMNS, "labeling": HIDDEN_COLUMNS}}})
    found = label_studio.api("GET", f"/api/tasks?view={view['id']}&page_size=100")["tasks"]
    assert sorted(t["data"]["image"].rsplit("/", 1)[-1].split("-", 1)[-1] for t in found) == sorted(
        name for name, truth in expected.items() if truth.quality.verdict == "too_small")
    ordered = label_studio.api("GET", f"/api/tasks?project={project}&page_size=100&query="
                               + json.dumps({"ordering": ["tasks:data.insid3_verdict"]}))["tasks"]
    assert [t["data"]["insid3_verdict"] for t in ordered] == sorted(t["data"]["insid3_verdict"] for t in ordered)
    data_manager_screenshot(label_studio, f"/projects/{project}/data?tab={view['id']}", "labelstudio_verdict_filter.png")


def data_manager_screenshot(label_studio, path: str, name: str) -> None:
    """Log in to Label Studio's UI in Chromium, open ``path`` and keep a screenshot in tests/artifacts."""
    import os
    import shutil as shell
    from importlib.util import find_spec

    from data import ARTIFACTS

    chromium = os.environ.get("INSID3_CHROMIUM") or shell.which("chromium") or "/usr/bin/chromium"
    if find_spec("playwright") is None or not os.path.exists(chromium):
        return
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 800})
        page.goto(f"{label_studio.url}/user/login/", timeout=120_000)
        page.fill("input[name=email]", "lead@example.com")
        page.fill("input[name=password]", "insid3-pass")
        page.keyboard.press("Enter")
        page.wait_for_url(lambda url: "/user/login" not in url, timeout=120_000)
        page.goto(f"{label_studio.url}{path}", timeout=120_000)
        page.get_by_text("insid3_verdict").first.wait_for(timeout=120_000)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(ARTIFACTS / name))
        browser.close()


def test_preannotate_gives_a_polygon_task_with_an_empty_mask_the_empty_verdict(label_studio, tiny_backbone, tmp_path):
    """A polygon prediction holds no region for an empty mask: its verdict columns said nothing of
    the label (``insid3_verdicts`` blank). ``preannotate`` passes the labels it segmented, so the
    blank image's task reads ``Disk: empty`` and is found by filtering for ``empty``."""
    from labelstudio_fixtures import blank_image

    images = [shutil.copy(TARGETS[0], tmp_path / TARGETS[0].name), blank_image(tmp_path / "blank.png")]
    images = [Path(path) for path in images]
    project = label_studio.api("POST", "/api/projects/", json={"title": "insid3 polygon verdicts",
                                                              "label_config": region_config("PolygonLabels")})["id"]
    files = [(f"file{i}", (path.name, path.read_bytes(), "image/png")) for i, path in enumerate(images)]
    label_studio.api("POST", f"/api/projects/{project}/import", files=files)
    segmenter = verdict_segmenter(tiny_backbone)
    settings = Settings(label_studio_url=label_studio.url, api_key=label_studio.personal_access_token,
                        model_dir=tmp_path / "model", reference_dir=reference_folder(tmp_path / "references"))

    preannotate(build_backend(settings, segmenter), project, progress=False)
    tasks = label_studio.api("GET", f"/api/tasks?project={project}&fields=all&page_size=100")["tasks"]
    by_name = {next(p.name for p in images if t["data"]["image"].endswith(p.name)): t["data"] for t in tasks}
    assert by_name["blank.png"]["insid3_verdict"] == "empty"
    assert by_name["blank.png"]["insid3_verdicts"] == f"{LABEL}: empty"
    assert by_name[TARGETS[0].name]["insid3_verdicts"].startswith(f"{LABEL}: ")
