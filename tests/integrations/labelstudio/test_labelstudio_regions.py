"""The backend answers in the project's region type (brush RLE, PNG bitmask, polygons with holes),
reads references in each, and answers interactive requests ("paint one, get all")."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flask")

from labelstudio_fixtures import (  # noqa: E402
    EXAMPLES, LABEL, TARGETS, UPLOADS, StaticServer, reference_folder, small_segmenter, two_disk_scenes,
)
from scenes import disk  # noqa: E402

from insid3_core.io import load_mask  # noqa: E402
from insid3_core.metrics import mask_iou  # noqa: E402
from labelstudio_backend.app import create_app  # noqa: E402
from labelstudio_backend.build import build_backend  # noqa: E402
from labelstudio_backend.regions import mask_values, polygons, value_mask  # noqa: E402
from labelstudio_backend.settings import Settings  # noqa: E402


def config(control: str) -> str:
    return f"""<View>
  <Image name="image" value="$image" smoothing="false"/>
  <{control} name="tag" toName="image">
    <Label value="{LABEL}" background="#ff0000"/>
  </{control}>
  <KeyPointLabels name="points" toName="image"><Label value="{LABEL}"/></KeyPointLabels>
</View>"""


KINDS = {"BrushLabels": "brushlabels", "BitmaskLabels": "bitmasklabels", "PolygonLabels": "polygonlabels"}


@pytest.fixture(scope="module")
def segmenter(tiny_backbone):
    return small_segmenter(tiny_backbone)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    for target in TARGETS:
        (root / target.name).write_bytes(target.read_bytes())
    two_disk_scenes(root, count=1)
    with StaticServer(root) as server:
        yield server


def client_for(segmenter, served, tmp_path, references=True, **changes):
    settings = Settings(label_studio_url=served.url, model_dir=tmp_path / "model",
                        reference_dir=reference_folder(tmp_path / "references") if references else tmp_path / "none",
                        **changes)
    return create_app(build_backend(settings, segmenter)).test_client()


def predict(client, control, tasks, **payload):
    answer = client.post("/predict", json={"tasks": tasks, "project": "7.1", "label_config": config(control), **payload})
    return answer


def decoded(prediction) -> np.ndarray:
    """The union of a prediction's regions, decoded as Label Studio stores them."""
    mask = None
    for region in prediction["result"]:
        part = value_mask(region["type"], region["value"], region["original_height"], region["original_width"])
        mask = part if mask is None else mask | part
    return mask


@pytest.mark.parametrize("control", list(KINDS))
def test_predictions_come_in_the_projects_region_type(segmenter, served, tmp_path, control):
    client = client_for(segmenter, served, tmp_path)
    answer = predict(client, control, [{"id": 1, "data": {"image": f"{UPLOADS}/{TARGETS[0].name}"}}])
    assert answer.status_code == 200, answer.get_json()
    (found,) = answer.get_json()["results"]
    assert {region["type"] for region in found["result"]} == {KINDS[control]}
    assert all(region["meta"]["text"][0].startswith("insid3 quality: ") for region in found["result"])
    references = segmenter.encode({LABEL: [(EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")]})
    expected = segmenter.segment(references, TARGETS[:1])[0].mask
    iou = mask_iou(decoded(found), expected)
    print(f"\n{control}: {len(found['result'])} region(s), IoU with the engine's mask {iou:.4f}")
    assert iou == 1.0 if control != "PolygonLabels" else iou > 0.9


def test_polygons_keep_holes_and_follow_the_tolerance():
    mask = disk((200, 160), (100, 80), 60) & ~disk((200, 160), (100, 80), 25)
    mask |= disk((200, 160), (185, 20), 8)  # a second part
    values = mask_values("polygonlabels", LABEL, mask, tolerance=1.0)
    assert len(values) == 2 and all(value["closed"] and value["polygonlabels"] == [LABEL] for value in values)
    filled = np.logical_or.reduce([value_mask("polygonlabels", value, 160, 200) for value in values])
    assert not filled[70:90, 90:110].any(), "the hole stays a hole"
    assert mask_iou(filled, mask) > 0.95
    coarse = polygons(mask, tolerance=4.0)
    assert sum(map(len, coarse)) < sum(map(len, polygons(mask, tolerance=0.5)))
    assert mask_values("polygonlabels", LABEL, np.zeros((4, 4), bool)) == []


@pytest.mark.parametrize("control", ["BitmaskLabels", "PolygonLabels"])
def test_annotations_in_each_region_type_become_references(segmenter, served, tmp_path, control):
    """An annotation drawn as a bitmask or a polygon (as Label Studio stores them) is a reference."""
    client = client_for(segmenter, served, tmp_path, references=False)
    truth = load_mask(EXAMPLES / "masks" / TARGETS[0].name)
    (value,) = mask_values(KINDS[control], LABEL, truth)[:1]
    region = {"from_name": "tag", "to_name": "image", "type": KINDS[control], "original_width": truth.shape[1],
              "original_height": truth.shape[0], "value": value}
    answer = client.post("/webhook", json={"action": "ANNOTATION_CREATED",
                                           "project": {"id": 7, "label_config": config(control)},
                                           "task": {"id": 1, "data": {"image": f"{UPLOADS}/{TARGETS[0].name}"}},
                                           "annotation": {"id": 51, "result": [region]}})
    assert answer.status_code == 200, answer.get_json()
    found = predict(client, control, [{"id": 2, "data": {"image": f"{UPLOADS}/{TARGETS[1].name}"}}])
    assert found.status_code == 200, found.get_json()
    reference_mask = value_mask(KINDS[control], value, *truth.shape)
    references = segmenter.encode({LABEL: [(TARGETS[0], reference_mask)]})
    expected = segmenter.segment(references, TARGETS[1:2])[0].mask
    assert mask_iou(decoded(found.get_json()["results"][0]), expected) > (0.99 if control == "BitmaskLabels" else 0.9)


def drawn_disk() -> np.ndarray:
    """The left disk of :func:`two_disk_scenes` (384 x 320)."""
    return disk((384, 320), (100, 160), 60)


@pytest.mark.parametrize("how", ["brush", "keypoint"])
def test_paint_one_get_all(segmenter, served, tmp_path, how):
    """An interactive request as Label Studio sends it: params.context holds the drawn region; the
    answer holds the other disk of the same image and not the drawn one."""
    client = client_for(segmenter, served, tmp_path, references=False)
    if how == "brush":
        (value,) = mask_values("brushlabels", LABEL, drawn_disk())
        drawn = {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 384,
                 "original_height": 320, "value": value}
    else:
        drawn = {"from_name": "points", "to_name": "image", "type": "keypointlabels", "original_width": 384,
                 "original_height": 320, "value": {"x": 100 / 384 * 100, "y": 160 / 320 * 100, "width": 1,
                                                    "keypointlabels": [LABEL]}}
    params = {"login": None, "password": None, "context": {"result": [drawn]}}
    answer = predict(client, "BrushLabels", [{"id": 3, "data": {"image": UPLOADS + "/two_disks_0.png"}}], params=params)
    assert answer.status_code == 200, answer.get_json()
    (found,) = answer.get_json()["results"]
    other = disk((384, 320), (290, 170), 60)
    regions = [value_mask("brushlabels", r["value"], 320, 384) for r in found["result"] if r["value"]["rle"]]
    print(f"\ninteractive ({how}): {len(regions)} region(s), IoU with the other disk "
          f"{max((mask_iou(r, other) for r in regions), default=0):.3f}")
    assert any(mask_iou(region, other) > 0.5 for region in regions)
    assert not any((region & drawn_disk()).sum() > 0.5 * region.sum() for region in regions)


def test_drawn_regions_of_the_negative_label_are_negatives_and_never_predicted(segmenter, served, tmp_path):
    """INSID3_NEGATIVE_LABEL in an interactive request: a region drawn with it is a negative of the
    other labels, as in a project's pool, not a class of its own."""
    two_labels = config("BrushLabels").replace('</BrushLabels>', '  <Label value="Other"/>\n  </BrushLabels>')
    client = client_for(segmenter, served, tmp_path, references=False, negative_label="Other")
    task = {"id": 3, "data": {"image": UPLOADS + "/two_disks_0.png"}}

    def drawn(label: str, mask: np.ndarray) -> dict:
        (value,) = mask_values("brushlabels", label, mask)
        return {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 384,
                "original_height": 320, "value": value}

    def ask(*regions):
        return client.post("/predict", json={"tasks": [task], "project": "7.1", "label_config": two_labels,
                                             "params": {"context": {"result": list(regions)}}})

    answer = ask(drawn("Other", drawn_disk()))
    assert answer.status_code == 422 and "only 'Other' (negative) regions" in answer.get_json()["error"]
    background = np.zeros((320, 384), dtype=bool)
    background[5:40, 5:40] = True
    answer = ask(drawn(LABEL, drawn_disk()), drawn("Other", background))
    assert answer.status_code == 200, answer.get_json()
    (found,) = answer.get_json()["results"]
    assert found["result"] and {label for r in found["result"] for label in r["value"]["brushlabels"]} == {LABEL}


def test_interactive_requests_that_cannot_be_answered(segmenter, served, tmp_path):
    client = client_for(segmenter, served, tmp_path, references=False)
    task = {"id": 3, "data": {"image": UPLOADS + "/two_disks_0.png"}}
    wrong = {"type": "rectanglelabels", "from_name": "box", "value": {"x": 1, "y": 1, "rectanglelabels": [LABEL]}}
    answer = predict(client, "BrushLabels", [task], params={"context": {"result": [wrong]}})
    assert answer.status_code == 422 and "hold no brushlabels region or keypoint" in answer.get_json()["error"]
    point = {"type": "keypointlabels", "from_name": "points", "value": {"x": 250, "y": 10, "keypointlabels": [LABEL]}}
    answer = predict(client, "BrushLabels", [task], params={"context": {"result": [point]}})
    assert answer.status_code == 422 and "outside its image" in answer.get_json()["error"]
    answer = predict(client, "BrushLabels", [task, dict(task, id=4)], params={"context": {"result": [point]}})
    assert answer.status_code == 400 and "for one task" in answer.get_json()["error"]
    assert predict(client, "BrushLabels", [task], params="no").status_code == 400


def test_a_label_whose_polygon_mask_is_empty_has_the_empty_verdict(segmenter, tmp_path):
    """An empty mask gives no polygon region, so the verdict columns left its label out: a task
    of one ok and one empty label read ``ok``. The labels segmented are passed now, and one with
    no region is ``empty``."""
    from PIL import Image

    from labelstudio_backend.labelconfig import region_target
    from labelstudio_backend.results import prediction, verdict_fields

    Image.new("RGB", (200, 150), (128, 128, 128)).save(tmp_path / "blank.png")
    references = segmenter.encode({LABEL: [(EXAMPLES / "reference" / "disks.png",
                                            EXAMPLES / "reference" / "disks_mask.png")]})
    found, blank = (result.classes[LABEL] for result in segmenter.segment(references, [TARGETS[0], tmp_path / "blank.png"]))
    assert found.mask.any() and not blank.mask.any()
    target = region_target(config("PolygonLabels").replace(
        f'<Label value="{LABEL}" background="#ff0000"/>', f'<Label value="{LABEL}"/><Label value="Other"/>', 1))

    answer = prediction(target, {LABEL: found, "Other": blank}, "v1")
    assert {region["value"]["polygonlabels"][0] for region in answer["result"]} == {LABEL}
    fields = verdict_fields(answer, [LABEL, "Other"])
    assert fields["insid3_verdicts"] == f"{LABEL}: {found.quality.verdict}, Other: empty"
    assert "empty" in fields["insid3_verdict"].split(", ")
    assert verdict_fields(prediction(target, {LABEL: blank}, "v1"), [LABEL])["insid3_verdicts"] == f"{LABEL}: empty"
