"""COCO-style annotation records with RLE masks (pycocotools)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import PurePosixPath

import numpy as np
from pycocotools import mask as mask_utils

from .results import SegmentationResult
from .instances import split_instances
from .quality import quality_report


def rle_encode(mask: np.ndarray) -> dict:
    """COCO RLE of a ``(H, W)`` bool mask, ``counts`` as a UTF-8 string (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: dict) -> np.ndarray:
    """Inverse of :func:`rle_encode`: ``(H, W)`` bool."""
    return mask_utils.decode(_binary(rle)).astype(bool)


def annotation(mask: np.ndarray, category: str, score: float | None, quality: dict, **extra) -> dict:
    """One COCO annotation (without ids) of a ``(H, W)`` bool mask; ``category`` is a name."""
    rle = rle_encode(mask)
    return {
        "category": category,
        "segmentation": rle,
        "area": int(mask_utils.area(_binary(rle))),
        "bbox": [float(v) for v in mask_utils.toBbox(_binary(rle))],
        "score": score,
        "quality": quality,
        "iscrowd": 0,
        **extra,
    }


def image_entry(file_name: str, shape: tuple[int, int]) -> dict:
    return {"file_name": file_name, "height": int(shape[0]), "width": int(shape[1])}


def result_record(
    file_name: str,
    results: Mapping[str, SegmentationResult],
    instance_method: str | None = None,
    min_instance_patches: int = 1,
) -> dict:
    """One target's image entry and annotations: one per class, or one per instance of each class.

    Parameters
    ----------
    file_name : str
    results : mapping of class name to SegmentationResult
    instance_method : str or None
        Split each class's mask into instances (see :func:`insid3_core.instances.instance_labels`);
        an instance annotation carries its own score and box, its class's quality report and
        its ``instance`` number.
    """
    shape = next(iter(results.values())).mask.shape
    annotations = []
    for category, result in results.items():
        quality = result.quality.as_dict()
        if instance_method is None:
            annotations.append(annotation(result.mask, category, result.score, quality))
            continue
        for number, instance in enumerate(split_instances(result, instance_method, min_instance_patches), start=1):
            annotations.append(annotation(instance.mask, category, instance.score, quality, instance=number))
    return {"image": image_entry(file_name, shape), "annotations": annotations}


def mask_record(file_name: str, label_map: np.ndarray, categories: Sequence[str]) -> dict:
    """:func:`result_record` rebuilt from a written mask alone (no score known).

    ``label_map`` is ``(H, W)``: 0/255 for one category, ``i + 1`` for the ``i``-th of several.
    """
    masks = {categories[0]: label_map > 0} if len(categories) == 1 else {
        category: label_map == index for index, category in enumerate(categories, start=1)
    }
    return {
        "image": image_entry(file_name, label_map.shape),
        "annotations": [
            annotation(mask, category, None, quality_report(mask).as_dict()) for category, mask in masks.items()
        ],
    }


def mask_file_name(file_name: str) -> str:
    """The label PNG a target's mask is written to: ``a.jpg`` and ``a.png`` both give ``a.png``."""
    return f"{PurePosixPath(file_name).stem}.png"


def coco_document(records: dict[str, dict], categories: Sequence[str], info: dict) -> dict:
    """Assemble a COCO document from records keyed by file name (ids follow the sorted names of
    their masks, :func:`mask_file_name`, then the names).

    Records may name categories missing from ``categories`` (an earlier run's); they are
    appended after them.
    """
    names = list(dict.fromkeys([*categories, *(a["category"] for r in records.values() for a in r["annotations"])]))
    category_ids = {name: index for index, name in enumerate(names, start=1)}
    images, annotations = [], []
    ordered = sorted(records, key=lambda name: (mask_file_name(name), name))
    for image, entries in coco_entries((records[name] for name in ordered), category_ids):
        images.append(image)
        annotations.extend(entries)
    return {
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": [{"id": index, "name": name} for name, index in category_ids.items()],
    }


def coco_entries(records: Iterable[dict], category_ids: dict[str, int]) -> Iterator[tuple[dict, list[dict]]]:
    """``(image, annotations)`` of each record in order, as a COCO document holds them: images
    numbered from 1, annotations numbered from 1 across all images, categories by their id in
    ``category_ids`` (a category not in it is added with the next id)."""
    annotation_id = 0
    for image_id, record in enumerate(records, start=1):
        annotations = []
        for entry in record["annotations"]:
            category = entry["category"]
            if category not in category_ids:
                category_ids[category] = len(category_ids) + 1
            annotation_id += 1
            fields = {key: value for key, value in entry.items() if key != "category"}
            annotations.append({"id": annotation_id, "image_id": image_id, "category_id": category_ids[category],
                                **fields})
        yield {"id": image_id, **record["image"]}, annotations


def records_from_document(document: dict) -> dict[str, dict]:
    """Inverse of :func:`coco_document`: records keyed by file name (``TypeError`` when a file or
    category name is not a string)."""
    for image in document.get("images", []):
        if not isinstance(image["file_name"], str):
            raise TypeError(f"an image's file_name is a {type(image['file_name']).__name__}, not a string")
    categories = {}
    for category in document.get("categories", []):
        if not isinstance(category["name"], str):
            raise TypeError(f"a category's name is a {type(category['name']).__name__}, not a string")
        categories[category["id"]] = category["name"]
    records = {
        image["file_name"]: {
            "image": {key: value for key, value in image.items() if key != "id"},
            "annotations": [],
        }
        for image in document.get("images", [])
    }
    by_id = {image["id"]: image["file_name"] for image in document.get("images", [])}
    for entry in document.get("annotations", []):
        fields = {key: value for key, value in entry.items() if key not in ("id", "image_id", "category_id")}
        records[by_id[entry["image_id"]]]["annotations"].append({"category": categories[entry["category_id"]], **fields})
    return records


def _binary(rle: dict) -> dict:
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
