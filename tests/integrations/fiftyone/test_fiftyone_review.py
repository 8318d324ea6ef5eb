"""Reviewing a predicted field (``fiftyone_plugin.curation``, behind the review panel) on a real
FiftyOne (own MongoDB): counts, the views behind them, approve/reject tags and the copy of the
approved masks into a ground-truth field."""

from __future__ import annotations

from importlib.util import find_spec

import numpy as np
import pytest
from data import EXAMPLE_REFERENCE as REFERENCE, EXAMPLE_TARGETS as TARGETS
from fiftyone_setup import PLUGIN_URI

pytestmark = pytest.mark.skipif(find_spec("fiftyone") is None, reason="needs the fiftyone extra")

ENGINE = {"image_size": 128, "svd_components": 16, "device": "cpu", "batch_size": 4}


@pytest.fixture
def segmented(dataset):
    """The example dataset, segmented into ``pred`` (masks in the database)."""
    segment(dataset, output_field="pred")
    return dataset


def segment(dataset, **params):
    import fiftyone.operators as foo

    foo.execute_operator(f"{PLUGIN_URI}/segment_by_example", {"dataset": dataset, "view_target": "DATASET"},
                         params={"reference_field": "ground_truth", **ENGINE, **params})
    dataset.reload()


def test_the_summary_counts_what_the_field_holds(segmented):
    from fiftyone_plugin import curation

    verdicts = segmented.values("pred.verdict")
    scores = [score for score in segmented.values("pred.score") if score is not None]
    summary = curation.summarize(segmented, "pred")
    assert summary.kind == "Segmentation" and summary.predicted == len(TARGETS)
    assert summary.verdicts == {**{v: verdicts.count(v) for v in curation.VERDICTS}, "unreadable": 0}
    assert summary.histogram["counts"] == np.histogram(scores, bins=10, range=(0, 1))[0].tolist()
    assert summary.decisions == {"approved": 0, "rejected": 0, "unreviewed": len(TARGETS)}
    assert summary.classes == [], "one class: no class breakdown"
    for verdict, count in summary.verdicts.items():
        view = curation.verdict_view(segmented, "pred", verdict)
        assert len(view) == count and set(view.values("pred.verdict")) <= {verdict}
    with pytest.raises(ValueError, match="verdict must be one of"):
        curation.verdict_view(segmented, "pred", "great")
    with pytest.raises(ValueError, match="'filepath' is no Segmentation or Detections field"):
        curation.summarize(segmented, "filepath")


def test_the_threshold_and_the_bins_split_the_scores(segmented):
    from fiftyone_plugin import curation

    scores = sorted(segmented.exists("pred").values("pred.score"))
    threshold = (scores[2] + scores[3]) / 2  # three below
    below = curation.score_view(segmented, "pred", high=threshold)
    above = curation.score_view(segmented, "pred", low=threshold)
    assert len(below) == 3 and len(above) == len(scores) - 3
    assert max(below.values("pred.score")) < threshold <= min(above.values("pred.score"))
    edges = curation.summarize(segmented, "pred").histogram["edges"]
    in_bins = [len(curation.score_view(segmented, "pred", low, high)) for low, high in zip(edges[:-1], edges[1:])]
    assert in_bins == curation.summarize(segmented, "pred").histogram["counts"]


def test_approve_and_reject_tag_the_predicted_samples_and_a_new_run_drops_them(segmented):
    from fiftyone_plugin import curation

    targets = segmented.exists("pred")
    assert curation.decide(segmented, "pred", "approved") == len(TARGETS), "the reference has no prediction"
    assert "insid3:pred:approved" not in segmented.match_tags("reference").first().tags
    rejected = targets.limit(2)
    assert curation.decide(rejected, "pred", "rejected") == 2
    summary = curation.summarize(segmented, "pred")
    assert summary.decisions == {"approved": len(TARGETS) - 2, "rejected": 2, "unreviewed": 0}
    assert sorted(curation.decision_view(segmented, "pred", "rejected").values("id")) == sorted(rejected.values("id"))
    assert not set(curation.decision_view(segmented, "pred", "approved").values("id")) & set(rejected.values("id"))
    with pytest.raises(ValueError, match="decision must be one of approved, rejected"):
        curation.decide(segmented, "pred", "maybe")

    segment(segmented, output_field="pred", overwrite=True, tau=0.7)  # new masks: the old decisions go
    assert not [tag for tag in segmented.distinct("tags") if tag in ("insid3:pred:approved", "insid3:pred:rejected")]


def test_approved_masks_are_copied_into_the_ground_truth_and_stay_when_the_run_is_redone(fo, segmented, tmp_path):
    from fiftyone_plugin import curation

    segment(segmented, output_field="filed", mask_dir=str(tmp_path))  # masks as PNG files
    approved = segmented.exists("filed").limit(3)
    curation.decide(approved, "filed", "approved")
    first = approved.first()
    first.ground_truth = fo.Segmentation(mask=np.ones((4, 4), np.uint8))  # earlier truth
    first.save()

    result = curation.copy_approved(segmented, "filed", "ground_truth")
    assert (result.copied, result.kept) == (2, 1)
    first.reload()
    assert first.ground_truth.mask.shape == (4, 4), "existing ground truth stays without replace"
    predicted = {sample.id: sample.filed.get_mask() for sample in approved}
    for sample in approved.skip(1):
        assert sample.ground_truth.mask_path is None, "the copy holds its mask itself"
        np.testing.assert_array_equal(sample.ground_truth.mask, predicted[sample.id])
    reference = segmented.match_tags("reference").first()
    assert reference.ground_truth.mask_path == str(REFERENCE[1]), "the references are untouched"

    assert curation.copy_approved(segmented, "filed", "ground_truth", replace=True).copied == 3
    first.reload()
    np.testing.assert_array_equal(first.ground_truth.mask, predicted[first.id])

    segment(segmented, output_field="filed", mask_dir=str(tmp_path), overwrite=True, tau=0.99)  # rewrites the PNGs
    for sample in approved:
        np.testing.assert_array_equal(segmented[sample.id].ground_truth.mask, predicted[sample.id])


def test_a_copy_into_ground_truth_of_other_mask_targets_is_refused(segmented):
    """0/255 masks of one class must not land in a field whose masks say 1 = cat, 2 = dog."""
    from fiftyone_plugin import curation

    segmented.mask_targets = {**segmented.mask_targets, "truth": {1: "cat", 2: "dog"}}
    segmented.save()
    curation.decide(segmented, "pred", "approved")
    with pytest.raises(ValueError, match=r"'truth' has other mask targets than 'pred' \({1: 'cat', 2: 'dog'}"):
        curation.copy_approved(segmented, "pred", "truth")
    legacy = dict(segmented.mask_targets)
    del legacy["pred"]  # a field written before runs named their mask targets
    segmented.mask_targets = legacy
    segmented.save()
    with pytest.raises(ValueError, match="against none"):
        curation.copy_approved(segmented, "pred", "truth")
    assert not segmented.exists("truth").count()


@pytest.mark.parametrize("target, message", [
    ("pred", "is the predicted field itself"),
    ("2nd", "not a valid field name"),
    ("filepath", "does not hold Segmentation labels"),
])
def test_a_copy_into_an_unfit_field_is_refused(segmented, target, message):
    from fiftyone_plugin import curation

    curation.decide(segmented, "pred", "approved")
    with pytest.raises(ValueError, match=message):
        curation.copy_approved(segmented, "pred", target)


def test_the_run_description_names_weights_references_and_settings(segmented):
    from fiftyone_plugin import curation

    text = curation.run_description(segmented, "pred")
    assert f"| object | {REFERENCE[0]} |" in text
    assert "| image_size | 128 |" in text and "| tau | 0.6 |" in text and "smoke-test weights" in text
    assert "| weights |" not in text, "settings left unset are not listed"
    assert "not written by insid3" in curation.run_description(segmented, "ground_truth")
    assert curation.default_field(segmented) == "pred"


def test_curation_names_labels_as_given_and_refuses_fields_without_predictions(segmented):
    from fiftyone_plugin import curation
    from fiftyone_plugin.labels import class_key

    assert class_key("cat.x") == class_key(class_key("cat.x")) == "cat_x"
    with pytest.raises(ValueError, match="'nothing' is no Segmentation or Detections field"):
        curation.decide(segmented, "nothing", "approved")
