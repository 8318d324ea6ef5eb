"""Reference and negative samples: found by tag, their masks (of one class, of several, or every
nonzero pixel) read from a ``Segmentation`` field and checked before any target is touched."""

from __future__ import annotations

import os

import numpy as np

SHOWN = 5  # sample names listed in a message
BACKGROUND = ("0", "#000000")  # mask values of no class
ORIENTATION_TAG = 0x0112  # EXIF
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # rotations by 90 degrees: width and height swap


class ReferenceProblem(ValueError):
    """The references cannot be used; the message is meant for the App user."""


def segmentation_fields(collection) -> list[str]:
    """Top-level ``Segmentation`` fields of a collection's samples (of its frames for videos), sorted."""
    import fiftyone as fo

    from .video import label_schema

    return sorted(label_schema(collection, embedded_doc_type=fo.Segmentation))


def field_mask_targets(collection, field: str) -> dict | None:
    """``field``'s own mask targets; a video dataset's frame field keeps them as ``frames.<field>``
    (FiftyOne's key, which a frames view and the video dataset itself both read here)."""
    targets = collection.mask_targets.get(field)
    root = collection._root_dataset
    if not targets and root.media_type == "video":
        targets = root.mask_targets.get("frames." + field)
    return dict(targets) if targets else None


def mask_classes(dataset, field: str) -> dict:
    """The dataset's mask targets for ``field`` (its own, else the default ones), maybe empty."""
    return field_mask_targets(dataset, field) or dict(dataset.default_mask_targets or {})


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
        if isinstance(choice, float) and not choice.is_integer():
            raise ValueError(choice)
        return int(choice)
    except ValueError:
        known = ", ".join(f"{value} ({label})" for value, label in classes.items()) or "none defined"
        raise ReferenceProblem(f"'{choice}' is not a class of '{field}' (mask targets: {known})") from None


def chosen_classes(dataset, field: str, choices, every: bool = False) -> dict:
    """``{mask value: label}`` of the classes to segment in one pass, in the order chosen.

    ``choices`` are mask values or labels (see :func:`class_value`); ``every`` takes every
    class of the mask targets of ``field`` except the background (``0``, ``"#000000"``).
    """
    classes = mask_classes(dataset, field)
    if every:
        chosen = {value: label for value, label in classes.items() if str(value) not in BACKGROUND}
        if not chosen:
            raise ReferenceProblem(f"'{field}' has no mask targets to take every class from; choose classes by value")
        return chosen
    values = dict.fromkeys(class_value(dataset, field, choice) for choice in choices if choice not in (None, ""))
    return {value: str(classes.get(value, value)) for value in values}


def stored_mask(label) -> tuple[np.ndarray, str | None]:
    """A ``Segmentation``'s mask as stored, ``(H, W)`` or ``(H, W, 3|4)``, and the format of its
    file (``"PNG"``, ``"JPEG"``, ...; ``None`` for a mask held in the label).

    Mask files are read in their EXIF orientation, as the engine reads images (a CMYK file as
    its RGB rendering: :func:`insid3_core.io.mask_pixels`).
    """
    if label.mask is not None:
        return np.asarray(label.mask), None
    from PIL import Image, ImageOps

    from insid3_core.io import mask_pixels

    with Image.open(label.mask_path) as handle:
        return mask_pixels(ImageOps.exif_transpose(handle)), handle.format


def class_mask(array: np.ndarray, value: int | str | None = None) -> np.ndarray:
    """``(H, W)`` bool pixels of ``array`` holding ``value``, or every nonzero pixel for ``None``.

    ``value`` is an integer for greyscale or palette masks, ``"#rrggbb"`` for RGB masks.
    """
    from insid3_core.io import mask_array

    if isinstance(value, str):
        if array.ndim != 3:
            raise ReferenceProblem(f"class {value} is an RGB colour but the mask has one channel")
        return np.all(array[..., :3] == np.array(hex_rgb(value)), axis=2)
    return mask_array(array, value)


def hex_rgb(value: str) -> tuple[int, int, int]:
    """``(r, g, b)`` of a ``"#rrggbb"`` colour."""
    digits = value.lstrip("#")
    return tuple(int(digits[i:i + 2], 16) for i in (0, 2, 4))


def reference_pairs(dataset, tag: str, field: str, value=None, role: str = "reference") -> list[tuple[str, np.ndarray]]:
    """``(image path, bool mask)`` of every sample of ``dataset`` tagged ``tag``.

    Raises
    ------
    ReferenceProblem
        No sample carries the tag, ``field`` is not a ``Segmentation`` field, or a sample
        has no mask in ``field`` or an empty one (for the chosen class); the message names the
        samples, as ``role`` s.
    """
    pairs, empty = [], []
    for filepath, array in tagged_masks(dataset, tag, field, role, by_value=value is not None):
        mask = class_mask(array, value)
        if mask.any():
            pairs.append((filepath, mask))
        else:
            empty.append(os.path.basename(filepath))
    if empty:
        chosen = "" if value is None else f" for class {value}"
        raise ReferenceProblem(f"{len(empty)} {role}(s) have an empty mask{chosen} in '{field}': {_names(empty)}")
    return pairs


def class_references(dataset, tag: str, field: str, classes: dict, skip_absent: bool = False) -> dict:
    """References per class: ``{value: [(image path, bool mask), ...]}`` in the order of ``classes``.

    Parameters
    ----------
    classes : dict
        ``{mask value: label}`` of the classes to segment.
    skip_absent : bool
        Leave out a class that no reference shows instead of raising.

    A reference contributes to each class its mask shows; a class shown by no reference
    raises :class:`ReferenceProblem` unless ``skip_absent`` (and another class is shown).
    """
    pairs: dict = {value: [] for value in classes}
    for filepath, array in tagged_masks(dataset, tag, field, by_value=True):
        for value in classes:
            mask = class_mask(array, value)
            if mask.any():
                pairs[value].append((filepath, mask))
    absent = [f"{classes[value]} ({value})" for value, found in pairs.items() if not found]
    if absent and (not skip_absent or len(absent) == len(pairs)):
        raise ReferenceProblem(f"no reference shows class(es) {', '.join(absent)} in '{field}'")
    return {value: found for value, found in pairs.items() if found}


def negative_pairs(dataset, tag: str, field: str, reference_tag: str) -> list[tuple[str, np.ndarray]]:
    """``(image path, bool mask)`` of the samples tagged ``tag``: their nonzero pixels are "not this".

    No sample with the tag gives no negatives. A negative also tagged ``reference_tag``, or
    without a mask in ``field``, or with an empty one raises :class:`ReferenceProblem`.
    """
    if tag == reference_tag:
        raise ReferenceProblem(f"The negative tag and the reference tag are both '{tag}'")
    both = dataset.match_tags(tag).match_tags(reference_tag)
    if len(both):
        raise ReferenceProblem(
            f"{len(both)} sample(s) are tagged both '{reference_tag}' and '{tag}': "
            f"{_names([os.path.basename(path) for path in both.values('filepath')])}"
        )
    if not len(dataset.match_tags(tag)):
        return []
    return reference_pairs(dataset, tag, field, role="negative")


def check_files(pairs: list[tuple[str, np.ndarray]], role: str = "reference") -> None:
    """:class:`ReferenceProblem` naming the first sample whose image file is gone or unreadable, or
    whose mask's size differs from its image's (EXIF orientation applied); reads headers only."""
    from PIL import Image

    for filepath, mask in pairs:
        name = os.path.basename(filepath)
        try:
            with Image.open(filepath) as image:
                width, height = image.size
                if image.getexif().get(ORIENTATION_TAG, 1) in TRANSPOSING_ORIENTATIONS:
                    width, height = height, width
        except FileNotFoundError:
            raise ReferenceProblem(f"The {role} image {name} no longer exists ({filepath})") from None
        except OSError as err:
            raise ReferenceProblem(f"The {role} image {name} is unreadable: {err}") from None
        if mask.shape != (height, width):
            raise ReferenceProblem(f"The mask of {role} {name} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                                   f"{width}x{height} (width x height)")


def tagged_masks(dataset, tag: str, field: str, role: str = "reference",
                 by_value: bool = False) -> list[tuple[str, np.ndarray]]:
    """``(image path, stored mask)`` of every sample tagged ``tag``; a JPEG mask file comes as
    its ``(H, W)`` foreground (:func:`insid3_core.io.lossy_foreground`: its compression rings are
    no foreground).

    Parameters
    ----------
    by_value : bool
        The masks will be read by class value, which a JPEG mask file cannot hold exactly.

    Raises
    ------
    ReferenceProblem
        ``field`` is not a ``Segmentation`` field, no sample carries the tag, one has no
        mask in ``field`` (the message names the samples), or, ``by_value``, a JPEG mask file.
    """
    if field is None:
        raise ReferenceProblem(f"Dataset '{dataset._root_dataset.name}' has no Segmentation field to take {role} "
                               "masks from")
    if field not in segmentation_fields(dataset):
        raise ReferenceProblem(f"'{field}' is not a Segmentation field of dataset '{dataset._root_dataset.name}'")
    samples = dataset.match_tags(tag)
    if not len(samples):
        raise ReferenceProblem(
            f"No sample is tagged '{tag}': tag the samples whose '{field}' mask shows the object to find"
        )
    masks, missing = [], []
    for filepath, label in zip(*samples.values(["filepath", field])):
        if label is None or (label.mask is None and not label.mask_path):
            missing.append(os.path.basename(filepath))
        else:
            masks.append((filepath, _readable_mask(label, f"{role} {os.path.basename(filepath)}", by_value)))
    if missing:
        raise ReferenceProblem(f"{len(missing)} {role}(s) tagged '{tag}' have no mask in '{field}': {_names(missing)}")
    return masks


def _readable_mask(label, whose: str, by_value: bool) -> np.ndarray:
    """:func:`stored_mask` (a JPEG file's as its foreground), or a :class:`ReferenceProblem` saying
    why the mask of ``whose`` cannot be used (see :func:`tagged_masks`)."""
    from PIL import Image

    try:
        array, file_format = stored_mask(label)
    except FileNotFoundError:
        raise ReferenceProblem(f"The mask file of {whose} no longer exists ({label.mask_path})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ReferenceProblem(f"The mask file of {whose} is unreadable ({label.mask_path}): {err}") from None
    from insid3_core.io import LOSSY_FORMATS, PHOTOGRAPH_COLOURS, is_photograph, lossy_foreground

    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ReferenceProblem(f"The mask of {whose} has shape {array.shape}, not (H, W) or (H, W, 3|4)")
    if is_photograph(array):
        raise ReferenceProblem(f"The mask of {whose} has more than {PHOTOGRAPH_COLOURS} distinct colours: a photograph, "
                               f"not a mask ({label.mask_path or 'stored in the label'}); is it the image instead?")
    if file_format in LOSSY_FORMATS:
        if by_value:
            raise ReferenceProblem(f"The mask file of {whose} is a JPEG, whose compression changes class values "
                                   f"({label.mask_path}); store class masks as PNG")
        return lossy_foreground(array)
    return array


def _names(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more
