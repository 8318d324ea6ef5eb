"""The FiftyOne zoo model ``insid3-dinov3-torch``: segment by example through ``apply_model``.

FiftyOne reads every ``manifest.json`` under ``fo.config.model_zoo_dir`` as a remotely-sourced
zoo model source; ``insid3 fiftyone install`` copies :data:`SOURCE` (a manifest and an
``__init__.py`` calling this module) there. Then::

    model = foz.load_zoo_model("insid3-dinov3-torch", references=[("cat.jpg", "cat_mask.png")],
                               weights="dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth")
    dataset.apply_model(model, "insid3", batch_size=8, num_workers=4)

The model follows FiftyOne's torch conventions (``TorchModelMixin``, ``SupportsGetItem``): the
DataLoader workers decode and resize each target (:class:`TargetItem`), the model sends the batch
through the backbone once and segments it with the references encoded when it was loaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import fiftyone.core.models as fom
import fiftyone.utils.torch as fout

from .labels import Outputs, sample_labels

log = logging.getLogger(__name__)

MODEL_NAME = "insid3-dinov3-torch"
SOURCE = Path(__file__).resolve().parent / "zoo_source"
"""The zoo source folder: ``manifest.json`` (top-level ``name`` ``insid3``) and ``__init__.py``."""
OUTPUTS = ("segmentation", "instances", "both")
SINGLE_VALUE = 255


class TargetItem(fout.GetItem):
    """What a DataLoader worker makes of one sample: its image decoded (EXIF orientation applied)
    and resized to the model's input, and its size; or, for an image that cannot be read, why
    (``problem``): one such sample gets no label and the rest of its batch goes on."""

    def __init__(self, image_size: int, field_mapping=None):
        self.image_size = image_size
        super().__init__(field_mapping=field_mapping)

    @property
    def required_keys(self) -> list[str]:
        return ["filepath"]

    def __call__(self, d: dict) -> dict:
        from insid3_core.features import resized_pixels
        from insid3_core.io import InputError, load_image

        try:
            image = load_image(d["filepath"])
        except InputError as err:
            return {"problem": str(err)}
        return {"pixels": resized_pixels(image, self.image_size), "size": (image.height, image.width)}


def collate_targets(items: list[dict]) -> dict:
    """A batch of :class:`TargetItem` outputs: ``pixels`` ``(B', 3, s, s)`` uint8 and ``sizes`` of
    the ``B'`` readable images, and ``problems``: per item, ``None`` or why it cannot be read."""
    import torch

    readable = [item for item in items if "problem" not in item]
    return {"pixels": torch.stack([item["pixels"] for item in readable]) if readable else None,
            "sizes": [item["size"] for item in readable], "problems": [item.get("problem") for item in items]}


class SegmentByExample(fom.Model, fom.TorchModelMixin, fom.SupportsGetItem):
    """Segment each image like the references (INSID3 on DINOv3), one batch per backbone call.

    Parameters
    ----------
    engine : insid3_core.settings.EngineSettings
    classes : dict
        ``{class label: [(image, mask), ...]}``; class ``i`` fills its pixels with ``i + 1`` in
        a multi-class ``Segmentation`` (255 for a single class).
    negatives : sequence of (image, mask)
        "Not this" regions shared by the classes.
    output : {"segmentation", "instances", "both"}
        A ``Segmentation``, ``Detections`` (one instance mask per object), or both (stored by
        ``apply_model(model, "F")`` as ``F_segmentation`` and ``F_instances``).
    """

    def __init__(self, engine, classes: dict, negatives=(), output: str = "segmentation") -> None:
        from .models import segmenter

        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        self.engine = engine
        self.segmenter = segmenter(engine)
        self.references = self.segmenter.encode(classes, list(negatives))
        values = [SINGLE_VALUE] if len(classes) == 1 else range(1, len(classes) + 1)
        self.outputs = Outputs(
            tuple(zip(classes, values)), len(classes) > 1,
            "segmentation" if output != "instances" else None, "instances" if output != "segmentation" else None,
            engine.instance_method, engine.min_instance_patches,
        )
        self._preprocess = True

    @property
    def media_type(self) -> str:
        return "image"

    @property
    def ragged_batches(self) -> bool:
        return False

    @property
    def transforms(self):
        return None  # the DataLoader items come from :class:`TargetItem`

    @property
    def preprocess(self) -> bool:
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value: bool) -> None:
        self._preprocess = value

    @property
    def has_collate_fn(self) -> bool:
        return True

    @staticmethod
    def collate_fn(batch):
        return collate_targets(batch)

    @property
    def _using_gpu(self) -> bool:
        return self.segmenter.backbone.device.type == "cuda"

    def build_get_item(self, field_mapping=None) -> TargetItem:
        return TargetItem(self.engine.image_size, field_mapping=field_mapping)

    def predict(self, arg):
        return self.predict_all([arg])[0]

    def predict_all(self, args):
        """Labels of a batch: a collated :class:`TargetItem` batch, or ``(H, W, 3)`` uint8 images
        (or PIL images)."""
        if not isinstance(args, dict):
            args = collate_targets([_array_item(array, self.engine.image_size) for array in args])
        for problem in filter(None, args["problems"]):
            log.warning("insid3: no label: %s", problem)
        labels = iter(self._labels(args["pixels"], args["sizes"]) if args["sizes"] else ())
        if len(self.outputs.fields) == 1:
            return [None if problem else next(labels)[self.outputs.fields[0]] for problem in args["problems"]]
        return [None if problem else next(labels) for problem in args["problems"]]

    def _labels(self, pixels, sizes: list) -> list[dict]:
        """The labels of each output field for ``pixels`` ``(B, 3, s, s)`` uint8 of images of ``sizes``."""
        pixels = pixels.to(self.segmenter.backbone.device, non_blocking=True)
        features = self.segmenter.encoder.features(pixels)
        predictions = self.segmenter.segment_features(self.references, features, sizes, pixels)
        return [sample_labels(prediction, self.outputs, "", self.segmenter.quality)[0] for prediction in predictions]


def _array_item(image, image_size: int) -> dict:
    """The item of one image given to :meth:`SegmentByExample.predict`: FiftyOne's ``(H, W, 3)``
    uint8 array (``(H, W)`` and 4 channels too) or a PIL image."""
    import numpy as np
    from PIL import Image

    from insid3_core.features import resized_pixels
    from insid3_core.io import to_rgb

    if not isinstance(image, Image.Image):
        array = image if isinstance(image, np.ndarray) else None
        if array is None or array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
            shown = f"{array.dtype} array of shape {array.shape}" if array is not None else type(image).__name__
            raise TypeError(f"{MODEL_NAME}: predict takes (H, W, 3) uint8 arrays or PIL images, got a {shown}")
        image = Image.fromarray(array)
    image = to_rgb(image)
    return {"pixels": resized_pixels(image, image_size), "size": (image.height, image.width)}


def load_model(references=None, classes=None, negatives=(), output: str = "segmentation", **options):
    """The zoo model of ``references`` (one class, ``object``) and/or ``classes``; ``options``:
    any :class:`~insid3_core.settings.EngineSettings` option by name (the rest from the plugin's
    App config settings and ``INSID3_*``, as the operators read them)."""
    from insid3_core.settings import EngineSettings

    from .settings import engine_settings

    unknown = set(options) - set(EngineSettings.names())
    if unknown:
        raise ValueError(f"{MODEL_NAME}: unknown option(s) {', '.join(sorted(unknown))}; options are references, "
                         f"classes, negatives, output and the engine settings {', '.join(EngineSettings.names())}")
    options = {name: os.fspath(value) if isinstance(value, os.PathLike) else value for name, value in options.items()}
    chosen = dict(classes or {})
    if references:
        if "object" in chosen:
            raise ValueError(f"{MODEL_NAME}: references= are the class 'object', which classes= names too; "
                             "give that class's pairs in one place")
        chosen = {"object": list(references), **chosen}
    if not chosen:
        raise ValueError(f"{MODEL_NAME} needs references=[(image, mask), ...] or classes={{name: [(image, mask), ...]}}")
    return SegmentByExample(engine_settings(options), chosen, negatives, output)


def resolve_input(ctx):
    """The App form of the zoo model: which tagged samples are the references, the output, and
    every engine option (defaults from the dataset's plugin settings)."""
    import fiftyone.operators.types as types

    from .operators import engine_inputs
    from .references import segmentation_fields

    inputs = types.Object()
    inputs.str("reference_tag", default="reference", label="Reference tag",
               description="samples carrying this tag are the examples")
    fields = segmentation_fields(ctx.dataset)
    inputs.enum("reference_field", fields, default="ground_truth" if "ground_truth" in fields else next(iter(fields), None),
                label="Reference mask field", view=types.Dropdown(label="Reference mask field"))
    kinds = types.RadioGroup(label="Output")
    for kind in OUTPUTS:
        kinds.add_choice(kind, label=kind)
    inputs.enum("output", kinds.values(), default="segmentation", view=kinds)
    engine_inputs(inputs, ctx.dataset, mask_dir=False)
    return types.Property(inputs)


def parse_parameters(ctx, params: dict) -> None:
    """Turn the App form's ``reference_tag`` and ``reference_field`` into ``references`` (the
    tagged samples' image paths and masks) for :func:`load_model`."""
    from .references import reference_pairs

    tag = params.pop("reference_tag", None) or "reference"
    field = params.pop("reference_field", None)
    params["references"] = reference_pairs(ctx.dataset, tag, field)
    for name in list(params):
        if params[name] in (None, ""):
            del params[name]
