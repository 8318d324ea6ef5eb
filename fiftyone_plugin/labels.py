"""Engine results as FiftyOne labels: a ``Segmentation`` holding each class's mask value, and
``Detections`` with one instance mask per object."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from .references import hex_rgb


@dataclass(frozen=True)
class Outputs:
    """What a run writes for each target.

    Attributes
    ----------
    classes : tuple of (str, int or str)
        ``(label, value)`` per class, in the order the engine segments them: the label names
        the class's detections and attributes, the value fills its pixels in the
        ``Segmentation`` (an integer, or ``"#rrggbb"`` for RGB masks).
    multiclass : bool
        Whether the ``Segmentation`` describes several classes: its quality attributes judge
        their union and a ``classes`` attribute holds each one's; otherwise they are the one
        class's own.
    segmentation_field, instances_field : str or None
        Fields receiving the ``Segmentation`` and the ``Detections``; ``None``: not written.
    instance_method : str
        How a class's mask is split into instances (:func:`insid3_core.instances.split_instances`).
    min_instance_patches : int
        Instances with fewer feature patches are dropped.
    mask_dir : str or None
        Folder for mask PNGs under ``<folder>/<field>/``; ``None``: masks stored inline.
    mask_targets : dict or None
        Mask targets given to ``segmentation_field`` once written (``None``: the field's earlier
        ones are removed, so they never name values its new masks do not hold).
    """

    classes: tuple[tuple[str, int | str], ...]
    multiclass: bool
    segmentation_field: str | None
    instances_field: str | None
    instance_method: str = "necks"
    min_instance_patches: int = 1
    mask_dir: str | None = None
    mask_targets: dict | None = None

    def __post_init__(self) -> None:
        from insid3_core.instances import INSTANCE_METHODS

        if self.instance_method not in INSTANCE_METHODS:
            known = ", ".join(INSTANCE_METHODS)
            raise ValueError(f"instance method must be one of {known}, got '{self.instance_method}'")
        if self.min_instance_patches < 1:
            raise ValueError(f"min_instance_patches must be >= 1, got {self.min_instance_patches}")

    @property
    def fields(self) -> list[str]:
        """The fields written, ``Segmentation`` one first."""
        return [field for field in (self.segmentation_field, self.instances_field) if field]


def sample_labels(result, outputs: Outputs, sample_id: str, thresholds) -> tuple[dict, str]:
    """The labels of one target and the verdict on its mask.

    Parameters
    ----------
    result : insid3_core.Prediction
    outputs : Outputs
    sample_id : str
        Names the target's mask files.
    thresholds : insid3_core.QualityThresholds
        Judge the union of several classes.

    Returns
    -------
    labels : dict
        ``{field: label}`` for each field of ``outputs``.
    verdict : str
    """
    attributes = quality_attributes(result, outputs, thresholds)
    labels = {}
    if outputs.segmentation_field:
        stem = _mask_stem(outputs, outputs.segmentation_field, sample_id)
        labels[outputs.segmentation_field] = segmentation(result.label_map, outputs, attributes, stem)
    if outputs.instances_field:
        stem = _mask_stem(outputs, outputs.instances_field, sample_id)
        labels[outputs.instances_field] = detections(result, outputs, attributes, stem)
    return labels, attributes["verdict"]


def quality_attributes(result, outputs: Outputs, thresholds) -> dict:
    """``score``, the quality verdict and its numbers, and for several classes ``classes``.

    With several classes, ``score`` is the mean score of the classes found (0 when none is),
    the verdict judges their union, and ``classes`` maps each class label to its own
    ``score`` and quality.
    """
    from insid3_core import quality_report

    per_class = list(result.classes.values())
    if not outputs.multiclass:
        return dict(score=per_class[0].score, **per_class[0].quality.as_dict())
    found = [class_result.score for class_result in per_class if class_result.mask.any()]
    union = quality_report(result.label_map > 0, thresholds)
    classes = {
        class_key(label): dict(score=class_result.score, **class_result.quality.as_dict())
        for (label, _), class_result in zip(outputs.classes, per_class)
    }
    return dict(score=float(np.mean(found)) if found else 0.0, **union.as_dict(), classes=classes)


def segmentation(label_map: np.ndarray, outputs: Outputs, attributes: dict, mask_stem: str | None):
    """A ``Segmentation`` whose pixels hold each class's value (inline, or a PNG ``<mask_stem>.png``)."""
    import fiftyone as fo

    mask = class_values(label_map, [value for _, value in outputs.classes])
    if mask_stem is None:
        return fo.Segmentation(mask=mask, **attributes)
    _write_png(f"{mask_stem}.png", mask)
    return fo.Segmentation(mask_path=f"{mask_stem}.png", **attributes)


def class_values(label_map: np.ndarray, values) -> np.ndarray:
    """Replace class indices by mask values.

    Parameters
    ----------
    label_map : np.ndarray
        ``(H, W)`` integer: 0 for background, ``i + 1`` for the ``i``-th class.
    values : sequence of int or str
        Each class's value: integers (an 8-bit mask when all fit, else 16-bit) or
        ``"#rrggbb"`` colours.

    Returns
    -------
    np.ndarray
        ``(H, W)`` uint8 or uint16, or ``(H, W, 3)`` uint8 for colours.
    """
    if any(isinstance(value, str) for value in values):
        lookup = np.array([(0, 0, 0)] + [hex_rgb(value) for value in values], dtype=np.uint8)
    else:
        lookup = np.array([0, *values], dtype=np.uint8 if max(values) <= 255 else np.uint16)
    return lookup[label_map]


def detections(result, outputs: Outputs, attributes: dict, mask_stem: str | None):
    """``Detections`` of every class's instances, carrying the target's quality ``attributes``.

    Each ``Detection`` has the class label, the instance's score as ``confidence``, its box
    relative to the image, and its mask cropped to the box (inline, or a PNG named
    ``<mask_stem>_<n>.png``).
    """
    import fiftyone as fo

    from insid3_core.instances import split_instances

    found = []
    for (label, _), class_result in zip(outputs.classes, result.classes.values()):
        for instance in split_instances(class_result, outputs.instance_method, outputs.min_instance_patches):
            path = None if mask_stem is None else f"{mask_stem}_{len(found) + 1}.png"
            found.append(detection(label, instance, path))
    return fo.Detections(detections=found, **attributes)


def detection(label: str, instance, mask_path: str | None = None):
    """One ``Detection`` of an :class:`insid3_core.instances.Instance`.

    The box is ``[x / W, y / H, w / W, h / H]`` of the instance's pixel box in its ``(H, W)``
    image; the mask, ``(h, w)`` bool, is the instance's mask inside that box.
    """
    import fiftyone as fo

    height, width = instance.mask.shape
    x, y, w, h = (int(round(number)) for number in instance.box)
    box = [x / width, y / height, w / width, h / height]
    crop = instance.mask[y:y + h, x:x + w]
    if mask_path is None:
        return fo.Detection(label=label, bounding_box=box, mask=crop, confidence=instance.score)
    from insid3_core.io import write_mask_png

    write_mask_png(mask_path, crop)
    return fo.Detection(label=label, bounding_box=box, mask_path=mask_path, confidence=instance.score)


def _mask_stem(outputs: Outputs, field: str, sample_id: str) -> str | None:
    return None if outputs.mask_dir is None else os.path.join(outputs.mask_dir, field, sample_id)


def _write_png(path: str, array: np.ndarray) -> None:
    from PIL import Image

    from insid3_core.io import atomic_write

    with atomic_write(path) as stream:
        Image.fromarray(array).save(stream, format="PNG")


def class_key(label: str) -> str:
    """A class label usable as a database key (no ``.``, no leading ``$``): its key in a
    multi-class ``Segmentation``'s ``classes`` attribute (a key is its own key)."""
    return re.sub(r"^\$|\.", "_", label)
