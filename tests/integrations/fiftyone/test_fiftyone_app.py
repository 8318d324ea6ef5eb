"""Optional: the curator's path in the real FiftyOne App, driven by Playwright in Chromium.

Skipped unless ``playwright`` is installed and a Chromium is found (``INSID3_CHROMIUM``, else
``/usr/bin/chromium``; Debian's ``chromium`` package works). The App runs on the test
database; the form's engine defaults come from the dataset's plugin settings.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from importlib.util import find_spec

import pytest
from data import ARTIFACTS, EXAMPLES
from fiftyone_setup import PLUGIN_URI, free_port
from videos import reference_and_target

CHROMIUM = os.environ.get("INSID3_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = [pytest.mark.live, pytest.mark.skipif(
    find_spec("fiftyone") is None or find_spec("playwright") is None or not os.path.exists(CHROMIUM),
    reason="needs the fiftyone extra, playwright and a Chromium",
)]


@pytest.fixture
def dataset(fo):
    samples = [fo.Sample(filepath=str(EXAMPLES / "reference" / "disks.png"), tags=["reference"],
                         ground_truth=fo.Segmentation(mask_path=str(EXAMPLES / "reference" / "disks_mask.png")))]
    samples += [fo.Sample(filepath=str(path)) for path in sorted((EXAMPLES / "targets").glob("*.png"))]
    collection = fo.Dataset("insid3-app-test", overwrite=True)
    collection.persistent = True  # the App server is another process
    collection.add_samples(samples)
    collection.app_config.plugins = {PLUGIN_URI: {"image_size": 128, "svd_components": 16, "device": "cpu"}}
    collection.save()
    yield collection
    collection.delete()


@contextlib.contextmanager
def app_page(fo, dataset):
    """A Chromium page on the App serving ``dataset`` (a server of its own), once the grid shows."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    session = fo.launch_app(dataset, remote=True, port=port, auto=False)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/datasets/{dataset.name}", timeout=120_000)
            page.get_by_text("ground_truth").first.wait_for(timeout=120_000)
            yield page
            browser.close()
    finally:
        session.close()


def test_segment_by_example_from_the_operator_browser(fo, dataset):
    reference_id = dataset.match_tags("reference").first().id
    with app_page(fo, dataset) as page:
        dataset.untag_samples("reference")
        open_form(page)
        page.get_by_text("No sample is tagged 'reference'").first.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "fiftyone_no_reference.png"))
        page.get_by_role("button", name="Cancel").click()

        dataset.select(reference_id).tag_samples("reference")
        open_form(page)
        page.screenshot(path=str(ARTIFACTS / "fiftyone_form.png"))
        page.get_by_role("button", name="Execute").click()
        page.get_by_text("masks in 'insid3'").first.wait_for(timeout=300_000)  # the run's notification
        page.get_by_text("insid3", exact=True).first.wait_for(timeout=60_000)  # the new field in the sidebar
        page.wait_for_timeout(1500)  # let the sidebar finish its animation before the screenshot
        page.screenshot(path=str(ARTIFACTS / "fiftyone_done.png"))

    dataset.reload()
    assert dataset[reference_id].insid3 is None
    targets = dataset.match_tags("reference", bool=False)
    assert len(targets.exists("insid3")) == len(targets) == 8


CALIBRATE_FORM = ("calibrate from references", "calibrate_references", "Use the chosen settings on this dataset")


def open_operator(page, search: str, name: str, ready: str) -> None:
    """Find operator ``name`` in the operator browser by ``search``, open it, and wait for the
    form text ``ready``."""
    page.keyboard.press("Backquote")
    page.keyboard.type(search)
    page.get_by_text(name, exact=True).click()
    page.get_by_text(ready).first.wait_for(timeout=60_000)


def open_form(page) -> None:
    """Open ``segment_by_example`` from the operator browser and wait for its form."""
    open_operator(page, "Segment by example", "segment_by_example", "Reference mask field")


def test_a_run_that_fails_after_it_started_shows_its_error_in_the_app(fo, dataset, tmp_path):
    """Weights that exist but are no checkpoint pass the form's checks and fail when the run loads
    them: the App showed nothing (it drops exceptions raised in a generator); now it notifies."""
    notes = tmp_path / "weights.pth"
    notes.write_text("these are not weights\n")
    dataset.app_config.plugins = {PLUGIN_URI: {"image_size": 128, "svd_components": 16, "device": "cpu",
                                               "weights": str(notes)}}
    dataset.save()
    with app_page(fo, dataset) as page:
        open_form(page)
        page.get_by_role("button", name="Execute").click()
        page.get_by_text("not a PyTorch checkpoint").first.wait_for(timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "fiftyone_run_error.png"))
    dataset.reload()
    assert "insid3" not in dataset.get_field_schema()


def test_calibration_from_the_app_shows_its_tables_and_stores_the_choice(fo, dataset):
    """Three tagged references (the example's and two targets with their true masks) calibrate
    in the App; its result shows as tables and the choice lands in the dataset's plugin settings."""
    for sample in dataset.match_tags("reference", bool=False).limit(2):
        sample.ground_truth = fo.Segmentation(mask_path=str(EXAMPLES / "masks" / sample.filename))
        sample.tags.append("reference")
        sample.save()
    with app_page(fo, dataset) as page:
        open_operator(page, *CALIBRATE_FORM)
        page.get_by_role("button", name="Execute").click()
        page.get_by_text("Calibrated: leave-one-out IoU").first.wait_for(timeout=300_000)
        page.get_by_text("IoU (chosen)").first.wait_for(timeout=60_000)  # the references' table
        page.get_by_text("svd_components", exact=True).first.wait_for(timeout=60_000)  # the settings' table
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "fiftyone_calibration.png"))
    dataset.reload()
    stored = dataset.app_config.plugins[PLUGIN_URI]
    chosen = dataset.info["insid3_calibration"]["settings"]
    assert {name: stored[name] for name in chosen} == chosen
    assert stored["device"] == "cpu", "the other plugin settings stay"


APPLY_ZOO_MODEL_PLUGIN = '''
import fiftyone.operators as foo
import fiftyone.operators.types as types
import fiftyone.zoo as foz

MODEL = "insid3-dinov3-torch"


class ApplyZooModel(foo.Operator):
    """What FiftyOne's "Apply model" operator (@voxel51/zoo) does with a zoo model's form."""

    @property
    def config(self):
        return foo.OperatorConfig(name="apply_zoo_model_form", label="Apply zoo model (form test)", dynamic=True)

    def resolve_input(self, ctx):
        return foz.get_zoo_model(MODEL).resolve_input(ctx)

    def execute(self, ctx):
        params = dict(ctx.params)
        zoo_model = foz.get_zoo_model(MODEL)
        zoo_model.parse_parameters(ctx, params)
        model = foz.load_zoo_model(MODEL, cache=False, **params)
        ctx.dataset.match_tags("reference", bool=False).apply_model(model, "zoo_pred", batch_size=4)
        ctx.ops.reload_dataset()


def register(plugin):
    plugin.register(ApplyZooModel)
'''


def test_the_zoo_models_form_in_the_app(fo, dataset, tmp_path):
    """The zoo model's ``resolve_input`` form rendered by the App (through a stand-in of FiftyOne's
    "Apply model" operator, whose @voxel51/zoo plugin cannot be installed offline), run from it."""
    plugin = os.path.join(fo.config.plugins_dir, "apply-zoo-model-form-test")
    os.makedirs(plugin)
    with open(os.path.join(plugin, "fiftyone.yml"), "w") as manifest:
        manifest.write('name: "@insid3-tests/apply-zoo-model"\noperators:\n  - apply_zoo_model_form\n')
    with open(os.path.join(plugin, "__init__.py"), "w") as source:
        source.write(APPLY_ZOO_MODEL_PLUGIN)
    try:
        with app_page(fo, dataset) as page:
            open_operator(page, "Apply zoo model", "apply_zoo_model_form", "Reference mask field")
            for label in ("Reference tag", "Output", "Tau", "Image size"):
                page.get_by_text(label, exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "fiftyone_zoo_model_form.png"))
            page.get_by_role("button", name="Execute").click()
            page.get_by_text("zoo_pred", exact=True).first.wait_for(timeout=300_000)  # the new field in the sidebar
    finally:
        shutil.rmtree(plugin)
    dataset.reload()
    targets = dataset.match_tags("reference", bool=False)
    assert len(targets.exists("zoo_pred")) == len(targets) == 8


def test_saved_failure_views_show_without_a_reload(fo, dataset):
    """Saving failure views (of the field insid3 wrote last, the form's default) notifies what was
    saved and lists the views at once in the open App page, with no browser reload."""
    import fiftyone.operators as foo

    foo.execute_operator(f"{PLUGIN_URI}/segment_by_example", {"dataset": dataset, "view_target": "DATASET"},
                         params={"reference_field": "ground_truth", "output_field": "pred", "min_area_ratio": 0.5,
                                 "image_size": 128, "svd_components": 16, "device": "cpu"})
    with app_page(fo, dataset) as page:
        open_operator(page, "save failure views", "save_failure_views", "Predicted mask field")
        page.get_by_role("button", name="Execute").click()
        page.get_by_text("Saved 1 view(s) of 'pred': pred too_small").first.wait_for(timeout=60_000)
        page.keyboard.press("Escape")  # close what the operator left open
        page.wait_for_timeout(500)
        page.get_by_text("Unsaved view").first.click()
        page.get_by_text("pred too_small").first.wait_for(timeout=30_000)
        page.wait_for_timeout(1000)  # the list's opening animation
        page.screenshot(path=str(ARTIFACTS / "fiftyone_saved_views.png"))
    dataset.reload()
    assert "pred too_small" in dataset.list_saved_views()


def test_a_calibration_that_fails_shows_its_error_in_the_app(fo, dataset, tmp_path):
    """A non-generator operator (calibrate) failing after its form's checks: the App shows the message."""
    notes = tmp_path / "weights.pth"
    notes.write_text("these are not weights\n")
    for sample in dataset.match_tags("reference", bool=False).limit(1):
        sample.ground_truth = fo.Segmentation(mask_path=str(EXAMPLES / "masks" / sample.filename))
        sample.tags.append("reference")
        sample.save()
    dataset.app_config.plugins = {PLUGIN_URI: {"image_size": 128, "svd_components": 16, "device": "cpu",
                                               "weights": str(notes)}}
    dataset.save()
    with app_page(fo, dataset) as page:
        open_operator(page, *CALIBRATE_FORM)
        page.get_by_role("button", name="Execute").click()
        page.get_by_text("not a PyTorch checkpoint").first.wait_for(timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "fiftyone_calibration_error.png"))


def test_the_quality_reports_histogram_is_readable(fo, dataset):
    """The score histogram in the App: 300 px or taller, titled axes, no toolbar over the bars."""
    import fiftyone.operators as foo

    foo.execute_operator(f"{PLUGIN_URI}/segment_by_example", {"dataset": dataset, "view_target": "DATASET"},
                         params={"reference_field": "ground_truth", "output_field": "pred",
                                 "image_size": 128, "svd_components": 16, "device": "cpu"})
    with app_page(fo, dataset) as page:
        open_operator(page, "quality report", "quality_report", "Predicted mask field")
        page.get_by_role("button", name="Execute").click()
        plot = page.locator(".js-plotly-plot").first
        plot.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "fiftyone_quality_report.png"))
        assert plot.bounding_box()["height"] >= 300
        assert page.locator(".js-plotly-plot .modebar").count() == 0
        for title in ("score", "masks"):
            assert page.locator(".js-plotly-plot text", has_text=title).count() >= 1


def open_review_panel(page) -> None:
    """Open the review panel from the grid's "New panel" menu and wait for its counts."""
    page.keyboard.press("Escape")  # a popover the App may leave open over the tab bar
    page.get_by_title("New panel").click()
    page.get_by_text("insid3: review masks").first.click()
    page.get_by_text("masks in").first.wait_for(timeout=60_000)


def drag_threshold(page, value: float) -> None:
    """Drag the review panel's threshold slider (the one over [0, 1]) to ``value`` with the mouse."""
    slider = page.locator('.MuiSlider-root:has(input[type="range"][max="1"])').first
    slider.scroll_into_view_if_needed()
    rail, thumb = slider.bounding_box(), slider.locator(".MuiSlider-thumb").bounding_box()
    y = thumb["y"] + thumb["height"] / 2
    page.mouse.move(thumb["x"] + thumb["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(rail["x"] + rail["width"] * value, y, steps=12)
    page.mouse.up()


def test_the_review_panel_counts_loads_views_and_records_decisions(fo, dataset):
    """The curator's review in the panel: a histogram bar and a verdict count load their samples,
    the dragged threshold moves the split and loads the samples below it, approve and reject tag
    what is in view, the approved masks are copied into the ground truth (the references' own
    kept), and a copy into an unfit field says why it copied nothing."""
    import fiftyone.operators as foo
    from fiftyone_plugin import curation

    foo.execute_operator(f"{PLUGIN_URI}/segment_by_example", {"dataset": dataset, "view_target": "DATASET"},
                         params={"reference_field": "ground_truth", "output_field": "pred",
                                 "image_size": 128, "svd_components": 16, "device": "cpu"})
    scores = sorted(dataset.exists("pred").values("pred.score"))
    threshold = round((scores[2] + scores[3]) / 2, 2)  # three masks below it
    assert scores[2] < threshold <= scores[3], "the example's scores leave room for a 0.01 step between them"
    bins = curation.summarize(dataset, "pred").histogram["counts"]
    tallest = bins.index(max(bins))
    verdict, count = max(dataset.count_values("pred.verdict").items(), key=lambda item: item[1])
    assert len(dataset) != max(bins) != count != 3, "each click below changes the grid's count"
    with app_page(fo, dataset) as page:
        page.set_viewport_size({"width": 1400, "height": 1500})  # the whole panel in the screenshots
        open_review_panel(page)
        bar = page.locator(".js-plotly-plot .trace.bars .point").nth(tallest).bounding_box()
        page.mouse.click(bar["x"] + bar["width"] / 2, bar["y"] + bar["height"] / 2)
        page.get_by_text(f"{max(bins)} samples").first.wait_for(timeout=30_000)  # the grid shows that bin's
        page.get_by_role("button", name=f"{verdict} · {count}").click()
        page.get_by_text(f"{count} samples").first.wait_for(timeout=30_000)  # and now that verdict's

        drag_threshold(page, threshold)
        page.get_by_role("button", name=f"3 below {threshold:.2f}").wait_for(timeout=30_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "fiftyone_review_panel.png"))
        page.get_by_role("button", name=f"3 below {threshold:.2f}").click()
        page.get_by_text("3 samples").first.wait_for(timeout=30_000)
        page.get_by_role("button", name="Reject the samples in view").click()
        page.get_by_text("Rejected 3 sample(s) of 'pred'").first.wait_for(timeout=30_000)

        page.get_by_role("button", name=f"{len(scores) - 3} at or above {threshold:.2f}").click()
        page.get_by_text(f"{len(scores) - 3} samples").first.wait_for(timeout=30_000)
        page.get_by_role("button", name="Approve the samples in view").click()
        page.get_by_text(f"Approved {len(scores) - 3} sample(s) of 'pred'").first.wait_for(timeout=30_000)
        page.get_by_role("button", name=f"approved · {len(scores) - 3}").wait_for(timeout=30_000)

        page.get_by_role("button", name=f"Copy {len(scores) - 3} approved masks").click()
        page.get_by_text(f"Copied {len(scores) - 3} approved mask(s) of 'pred' into 'ground_truth'").first.wait_for(
            timeout=30_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "fiftyone_review_decisions.png"))
        ground_truth = page.get_by_text("Ground-truth field").first.locator("xpath=following::input[1]")
        ground_truth.fill("pred")
        ground_truth.press("Tab")
        page.get_by_role("button", name=f"Copy {len(scores) - 3} approved masks").click()
        page.get_by_text("Nothing copied: 'pred' is the predicted field itself").first.wait_for(timeout=30_000)

    dataset.reload()
    below = curation.score_view(dataset, "pred", high=threshold)
    assert sorted(curation.decision_view(dataset, "pred", "rejected").values("id")) == sorted(below.values("id"))
    approved = curation.decision_view(dataset, "pred", "approved")
    assert len(approved) == len(scores) - 3 and min(approved.values("pred.score")) >= threshold
    for sample in approved:
        assert (sample.ground_truth.mask == sample.pred.get_mask()).all()
    assert dataset.match_tags("reference").first().ground_truth.mask_path.endswith("disks_mask.png")
    assert not below.exists("ground_truth"), "rejected masks are not copied"


@pytest.fixture
def video_dataset(fo, tmp_path):
    """:func:`videos.reference_and_target`, in a dataset the App's server process finds."""
    collection = fo.Dataset("insid3-app-video-test", overwrite=True)
    collection.persistent = True
    reference_and_target(collection, tmp_path)
    yield collection
    collection.delete()


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_the_review_panel_reviews_the_frames_of_a_video_dataset(fo, video_dataset):
    """On a video dataset the panel reviews ``frames.pred``: it counts the frames' masks, a
    verdict loads the videos holding such frames, approve tags the video in view, and the copy
    fills the frames' ground truth (the reference video's own kept)."""
    import fiftyone.operators as foo
    from fiftyone_plugin import curation

    foo.execute_operator(f"{PLUGIN_URI}/segment_by_example", {"dataset": video_dataset, "view_target": "DATASET"},
                         params={"reference_field": "ground_truth", "output_field": "pred",
                                 "image_size": 128, "svd_components": 16, "device": "cpu"})
    verdict, count = max(video_dataset.count_values("frames.pred.verdict").items(), key=lambda item: item[1])
    above = len(curation.score_view(video_dataset, "frames.pred", low=0.5))  # the videos the button loads
    with app_page(fo, video_dataset) as page:
        page.set_viewport_size({"width": 1400, "height": 1500})
        open_review_panel(page)
        page.get_by_text("4 masks in frames.pred (Segmentation)").first.wait_for(timeout=30_000)
        page.get_by_role("button", name=f"{above} video(s) at or above 0.50").wait_for(timeout=30_000)
        page.get_by_role("button", name=f"{verdict} · {count}").click()
        page.get_by_text("1 sample", exact=True).first.wait_for(timeout=30_000)  # the target video
        page.get_by_role("button", name="Approve the samples in view").click()
        page.get_by_text("Approved 1 video(s) of 'frames.pred'").first.wait_for(timeout=30_000)
        page.get_by_role("button", name="Copy the masks of 1 approved video(s)").click()
        page.get_by_text("Copied 4 approved mask(s) of 'frames.pred' into 'ground_truth'").first.wait_for(
            timeout=30_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "fiftyone_review_video.png"))

    video_dataset.reload()
    reference, target = video_dataset.first(), video_dataset.skip(1).first()
    assert target.tags == ["insid3:pred:approved"]
    for number in range(1, 5):
        frame = target.frames[number]
        assert (frame["ground_truth"].mask == frame["pred"].get_mask()).all()
    assert reference.frames[1]["ground_truth"].mask_path.endswith("001_mask.png"), "the reference's own is kept"
