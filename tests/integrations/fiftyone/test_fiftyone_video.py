"""Video datasets on a real FiftyOne: the frames are the targets (``frames.<field>``), references
come from a tagged video's masked frames or a tagged frame label, progress counts frames.

The test writes two small H.264 videos of the example scenes (:func:`videos.write_video`)."""

from __future__ import annotations

import shutil
from importlib.util import find_spec

import numpy as np
import pytest
from fiftyone_setup import PLUGIN_URI
from videos import reference_and_target

pytestmark = pytest.mark.skipif(find_spec("fiftyone") is None or shutil.which("ffmpeg") is None,
                                reason="needs the fiftyone extra and ffmpeg")

SEGMENT = f"{PLUGIN_URI}/segment_by_example"
ENGINE = {"image_size": 128, "svd_components": 16, "device": "cpu", "batch_size": 3}


@pytest.fixture
def dataset(fo, tmp_path):
    """:func:`videos.reference_and_target`."""
    collection = reference_and_target(fo.Dataset(), tmp_path)
    yield collection
    collection.delete()


def run(dataset, request_delegation: bool = False, **params):
    import fiftyone.operators as foo

    return foo.execute_operator(SEGMENT, {"dataset": dataset, "view_target": "DATASET",
                                          "request_delegation": request_delegation},
                                params={"reference_field": "ground_truth", **ENGINE, **params})


def expected_masks(dataset, reference_frames: list[int]):
    """The engine on the frames FiftyOne extracted: the reference video's frames as references."""
    from insid3_core import TEST_CHECKPOINT, EngineConfig, Segmenter, load_backbone
    from insid3_core.io import load_mask

    frames = dataset.to_frames(sample_frames=True)
    paths = dict(zip(zip(frames.values("sample_id"), frames.values("frame_number")), frames.values("filepath")))
    reference, target = dataset.first(), dataset.skip(1).first()
    pairs = [(paths[(reference.id, n)], load_mask(reference.frames[n]["ground_truth"].mask_path)) for n in reference_frames]
    segmenter = Segmenter(load_backbone(TEST_CHECKPOINT, device="cpu"), EngineConfig(image_size=128, svd_components=16))
    targets = [paths[(target.id, n)] for n in range(1, 5)]
    return segmenter.segment(segmenter.encode({"object": pairs}), targets)


def test_the_frames_of_target_videos_are_segmented(fo, dataset):
    run(dataset, output_field="pred")
    dataset.reload()
    assert "pred" in dataset.get_frame_field_schema()
    reference, target = dataset.first(), dataset.skip(1).first()
    assert all(frame["pred"] is None for frame in reference.frames.values()), "reference frames are not targets"
    expected = expected_masks(dataset, [1, 2])
    for number, prediction in zip(range(1, 5), expected):
        label = target.frames[number]["pred"]
        assert isinstance(label, fo.Segmentation)
        np.testing.assert_array_equal(label.get_mask() > 0, prediction.mask)
        assert label.verdict == prediction.quality.verdict
    assert dataset.info["insid3"]["pred"]["references"]


def test_a_frames_view_as_the_target_segments_those_frames_and_a_clips_view_is_a_form_problem(fo, dataset):
    """Frame ids were taken for video ids: "No target sample", a false form message."""
    import fiftyone.operators as foo
    from fiftyone import ViewField as F

    target = dataset.skip(1).first()
    frames = dataset.select(target.id).to_frames(sample_frames=True).match(F("frame_number") > 2)
    context = {"dataset": dataset, "view": frames, "view_target": "CURRENT_VIEW"}
    result = foo.execute_operator(SEGMENT, context, params={"reference_field": "ground_truth", "output_field": "pred",
                                                            **ENGINE})
    assert result.error is None, result.error
    dataset.reload()
    target = dataset.skip(1).first()
    expected = expected_masks(dataset, [1, 2])
    for number, prediction in zip(range(1, 5), expected):
        label = target.frames[number]["pred"]
        if number > 2:
            np.testing.assert_array_equal(label.get_mask() > 0, prediction.mask)
        else:
            assert label is None
    from fiftyone.operators.executor import ExecutionError

    clips = dataset.to_clips([[(1, 2)], [(2, 3)]])
    with pytest.raises(ExecutionError, match="The target is a clips view"):
        foo.execute_operator(SEGMENT, {**context, "view": clips},
                             params={"reference_field": "ground_truth", "output_field": "clipped", **ENGINE})


def test_the_mask_targets_of_a_frame_field_name_its_classes(fo, dataset):
    """FiftyOne keeps a frame field's mask targets as ``frames.<field>``; they were not found."""
    dataset.mask_targets = {"frames.ground_truth": {255: "disk"}}
    dataset.save()
    run(dataset, output_field="pred", reference_class="disk")
    dataset.reload()
    target = dataset.skip(1).first()
    for number, prediction in zip(range(1, 5), expected_masks(dataset, [1, 2])):
        np.testing.assert_array_equal(target.frames[number]["pred"].get_mask() > 0, prediction.mask)
    assert dataset.mask_targets["frames.pred"] == {255: "disk"}


def test_the_reference_frames_of_a_video_dataset_calibrate(fo, dataset):
    """calibrate_references read a frame field on the video samples: "has no field 'ground_truth'"."""
    import fiftyone.operators as foo

    from insid3_core.calibration import calibrate
    from insid3_core.io import load_mask
    from insid3_core.settings import EngineSettings

    result = foo.execute_operator(f"{PLUGIN_URI}/calibrate_references", {"dataset": dataset},
                                  params={"reference_field": "ground_truth", **ENGINE}).result
    frames = dataset.match_tags("reference").to_frames(sample_frames=True)
    pairs = [(path, load_mask(label.mask_path)) for path, label in zip(frames.values("filepath"), frames.values("ground_truth"))]
    expected = calibrate(EngineSettings(**ENGINE), {"object": pairs})
    assert [row["chosen"] for row in result["settings"]] == list(expected.settings.values())
    assert result["summary"].startswith("Calibrated: leave-one-out IoU")


def test_a_tagged_frame_label_is_a_reference_and_the_form_lists_frame_fields(fo, dataset):
    """Untag the reference video; tag only its second frame's mask label: that frame alone is the reference."""
    import asyncio
    import json

    from fiftyone.operators import OperatorRegistry
    from fiftyone.operators.executor import resolve_type

    reference = dataset.match_tags("reference").first()
    reference.tags.remove("reference")
    reference.frames[2]["ground_truth"].tags.append("reference")
    reference.save()
    request = {"dataset_name": dataset.name, "params": {}, "target": "inputs"}
    properties = asyncio.run(resolve_type(OperatorRegistry(), SEGMENT, request)).type.properties
    json.dumps({name: prop.to_json() for name, prop in properties.items()})
    assert properties["reference_field"].default == "ground_truth"
    assert "problem" not in properties
    run(dataset, output_field="pred")
    dataset.reload()
    target = dataset.skip(1).first()
    expected = expected_masks(dataset, [2])
    np.testing.assert_array_equal(target.frames[1]["pred"].get_mask() > 0, expected[0].mask)
    assert dataset.first().frames[1]["pred"] is not None, "the untagged video's other frame is a target now"


def test_a_delegated_run_counts_frames(fo, dataset):
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    queued = run(dataset, output_field="pred", request_delegation=True)
    service = DelegatedOperationService()
    service.execute_queued_operations(dataset_name=dataset.name)
    operation = service.get(queued.result["id"])
    assert operation.run_state == ExecutionRunState.COMPLETED, operation.result
    output = operation.result.result
    assert output["targets"] == output["masks_written"] == 4, "the target video's four frames"
    assert operation.status.label == "Segmented 4/4"


def test_no_tagged_reference_is_a_form_problem(fo, dataset):
    from fiftyone.operators.executor import ExecutionError

    dataset.untag_samples("reference")
    with pytest.raises(ExecutionError, match="No sample is tagged 'reference'"):
        run(dataset, output_field="pred")


def test_a_reference_field_that_is_no_segmentation_names_the_video_dataset(fo, dataset):
    from fiftyone.operators.executor import ExecutionError

    with pytest.raises(ExecutionError, match=f"'nothing' is not a Segmentation field of dataset '{dataset.name}'"):
        run(dataset, output_field="pred", reference_field="nothing")


def test_failure_tags_of_frames_are_label_tags_on_the_videos_frames(fo, dataset):
    """A frame's failure tag went to FiftyOne's generated frames dataset (a frames view's sample
    tags), unseen on the video. It is now a tag of the frame's label, which the App filters by;
    a rerun drops the earlier tags and the video's review decision on the field."""
    run(dataset, output_field="pred", max_area_ratio=0.001)
    dataset.reload()
    target = dataset.skip(1).first()
    verdicts = [target.frames[number]["pred"].verdict for number in range(1, 5)]
    assert "too_large" in verdicts
    for number in range(1, 5):
        label = target.frames[number]["pred"]
        assert label.tags == ([] if label.verdict == "ok" else [f"insid3:pred:{label.verdict}"])
    assert dataset.count_label_tags()["insid3:pred:too_large"] == verdicts.count("too_large")

    dataset.select(target.id).tag_samples("insid3:pred:approved")
    run(dataset, output_field="pred", overwrite=True)
    dataset.reload()
    target = dataset.skip(1).first()
    assert "insid3:pred:approved" not in target.tags
    assert all(target.frames[n]["pred"].tags == ([] if target.frames[n]["pred"].verdict == "ok"
                                                  else [f"insid3:pred:{target.frames[n]['pred'].verdict}"])
               for n in range(1, 5))


def test_a_video_datasets_frame_field_is_reviewed(fo, dataset):
    """The review read sample fields only: a video dataset's ``frames.<field>`` had no quality
    report, failure views or panel. Its verdicts and scores now count frames, its views hold the
    videos with the matching frames only, decisions tag the videos, and the approved frames'
    masks are copied into ``frames.<ground truth>``."""
    from fiftyone import ViewField as F

    from fiftyone_plugin import curation

    run(dataset, output_field="pred", max_area_ratio=0.2)
    dataset.reload()
    assert curation.predicted_fields(dataset) == ["frames.pred", "frames.ground_truth"]
    assert curation.default_field(dataset) == "frames.pred"
    target = dataset.skip(1).first()
    verdicts = [target.frames[number]["pred"].verdict for number in range(1, 5)]
    summary = curation.summarize(dataset, "frames.pred")
    assert summary.kind == "Segmentation" and summary.predicted == 4
    assert {v: n for v, n in summary.verdicts.items() if n} == {v: verdicts.count(v) for v in set(verdicts)}
    assert sum(summary.histogram["counts"]) == 4 and summary.decisions["unreviewed"] == 1  # the target video
    failing = next(v for v in verdicts if v != "ok")
    view = curation.verdict_view(dataset, "frames.pred", failing)
    assert view.values("id") == [target.id] and view.count("frames") == verdicts.count(failing)
    scores = [target.frames[number]["pred"].score for number in range(1, 5)]
    assert curation.score_view(dataset, "frames.pred", high=0.5).count("frames") == sum(s < 0.5 for s in scores)
    import fiftyone.operators as foo

    from fiftyone_setup import PLUGIN_URI as plugin

    report = foo.execute_operator(f"{plugin}/quality_report", {"dataset": dataset},
                                  params={"field": "frames.pred", "view_target": "DATASET"})
    assert report.error is None and report.result["counts"][failing] == verdicts.count(failing)
    saved = foo.execute_operator(f"{plugin}/save_failure_views", {"dataset": dataset}, params={"field": "frames.pred"})
    assert saved.result["views"] == [f"frames.pred {failing}"]
    assert dataset.load_saved_view(f"frames.pred {failing}").count("frames") == verdicts.count(failing)

    assert curation.decide(dataset, "frames.pred", "approved") == 1
    assert "insid3:pred:approved" in dataset.skip(1).first().tags
    assert curation.summarize(dataset, "frames.pred").decisions == {"approved": 1, "rejected": 0, "unreviewed": 0}
    assert len(curation.decision_view(dataset, "frames.pred", "approved")) == 1

    result = curation.copy_approved(dataset, "frames.pred", "reviewed")
    assert (result.copied, result.kept) == (4, 0)
    dataset.reload()
    target = dataset.skip(1).first()
    for number in range(1, 5):
        copy, prediction = target.frames[number]["reviewed"], target.frames[number]["pred"]
        assert copy.mask_path is None and np.array_equal(copy.get_mask(), prediction.get_mask())
    assert curation.copy_approved(dataset, "frames.pred", "reviewed") == curation.CopyResult(0, 4)
    assert len(dataset.match_frames(F("reviewed") != None)) == 1  # noqa: E711
    assert "**" in curation.run_description(dataset, "frames.pred")
