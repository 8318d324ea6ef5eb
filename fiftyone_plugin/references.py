"""Reference samples: found by tag, their masks read from a ``Segmentation`` field and checked
before any target is touched."""

from __future__ import annotations

import os

import numpy as np

SHOWN = 5  # sample names listed in a message


class ReferenceProblem(ValueError):
    """The references cannot be used; the message is meant for the App user."""


def segmentation_fields(collection) -> list[str]:
    """Top-level ``Segmentation`` fields of a collection's samples, sorted."""
    import fiftyone as fo

    schema = collection.get_field_schema(embedded_doc_type=fo.Segmentation)
    return sorted(schema)


def mask_classes(dataset, field: str) -> dict:
    """The dataset's mask targets for ``field`` (its own, else the default ones), maybe empty."""
    return dict(dataset.mask_targets.get(field) or dataset.default_mask_targets or {})


def class_value(dataset, field: str, choice) -> int | str | None:
    """The stored mask value that ``choice`` names, or ``None`` for every nonzero pixel.

    ``choice`` is a mask value (``1``, ``"1"``, or ``"#ff0000"`` for RGB masks), or a class
    label of the dataset's mask targets for ``field``.
    """
    if choice in (None, ""):
        return None
    classes = mask_classes(dataset, field)
    for value, label in classes.items():
        if choice == label or str(choice).lower() == str(value).lower():
            return value
    try:
        return int(choice)
    except ValueError:
        known = ", ".join(f"{value} ({label})" for value, label in classes.items()) or "none defined"
        raise ReferenceProblem(f"'{choice}' is not a class of '{field}' (mask targets: {known})") from None


def foreground(label, value: int | str | None = None) -> np.ndarray:
    """``(H, W)`` bool foreground of a ``Segmentation`` (inline ``mask`` or ``mask_path``).

    ``value`` selects one class: an integer for greyscale or palette masks, ``"#rrggbb"`` for
    RGB masks. Mask files are read in their EXIF orientation, as the engine reads images.
    """
    from insid3_core.io import mask_array

    if label.mask is not None:
        array = np.asarray(label.mask)
    else:
        from PIL import Image, ImageOps

        with Image.open(label.mask_path) as handle:
            array = np.asarray(ImageOps.exif_transpose(handle))
    if isinstance(value, str):
        rgb = np.array([int(value.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4)])
        if array.ndim != 3:
            raise ReferenceProblem(f"class {value} is an RGB colour but the mask has one channel")
        return np.all(array[..., :3] == rgb, axis=2)
    return mask_array(array, value)


def reference_pairs(dataset, tag: str, field: str, value=None) -> list[tuple[str, np.ndarray]]:
    """``(image path, bool mask)`` of every sample of ``dataset`` tagged ``tag``.

    Raises
    ------
    ReferenceProblem
        No sample carries the tag, ``field`` is not a ``Segmentation`` field, or a reference
        has no mask in ``field`` or an empty one (for the chosen class); the message names the
        samples.
    """
    if field is None:
        raise ReferenceProblem(f"Dataset '{dataset.name}' has no Segmentation field to take reference masks from")
    if field not in segmentation_fields(dataset):
        raise ReferenceProblem(f"'{field}' is not a Segmentation field of dataset '{dataset.name}'")
    samples = dataset.match_tags(tag)
    if not len(samples):
        raise ReferenceProblem(
            f"No sample is tagged '{tag}': tag the samples whose '{field}' mask shows the object to find"
        )
    pairs, missing, empty = [], [], []
    for filepath, label in zip(*samples.values(["filepath", field])):
        name = os.path.basename(filepath)
        if label is None or (label.mask is None and not label.mask_path):
            missing.append(name)
            continue
        mask = foreground(label, value)
        if mask.any():
            pairs.append((filepath, mask))
        else:
            empty.append(name)
    if missing:
        raise ReferenceProblem(f"{len(missing)} reference(s) tagged '{tag}' have no mask in '{field}': {_names(missing)}")
    if empty:
        chosen = "" if value is None else f" for class {value}"
        raise ReferenceProblem(f"{len(empty)} reference(s) have an empty mask{chosen} in '{field}': {_names(empty)}")
    return pairs


def _names(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more
