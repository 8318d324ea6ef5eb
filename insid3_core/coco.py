"""COCO-style annotation records with RLE masks (pycocotools)."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from .engine import SegmentationResult
from .quality import quality_report


def rle_encode(mask: np.ndarray) -> dict:
    """COCO RLE of a ``(H, W)`` bool mask, ``counts`` as a UTF-8 string (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: dict) -> np.ndarray:
    """Inverse of :func:`rle_encode`: ``(H, W)`` bool."""
    return mask_utils.decode(_binary(rle)).astype(bool)


def annotation_record(file_name: str, mask: np.ndarray, score: float | None, quality: dict) -> dict:
    """One target's image entry and annotation, keyed by ``file_name``."""
    rle = rle_encode(mask)
    return {
        "image": {"file_name": file_name, "height": int(mask.shape[0]), "width": int(mask.shape[1])},
        "annotation": {
            "segmentation": rle,
            "area": int(mask_utils.area(_binary(rle))),
            "bbox": [float(v) for v in mask_utils.toBbox(_binary(rle))],
            "score": score,
            "quality": quality,
            "iscrowd": 0,
        },
    }


def result_record(file_name: str, result: SegmentationResult) -> dict:
    """:func:`annotation_record` of an engine result."""
    return annotation_record(file_name, result.mask, result.score, result.quality.as_dict())


def mask_record(file_name: str, mask: np.ndarray) -> dict:
    """:func:`annotation_record` rebuilt from a mask file alone (no score known)."""
    return annotation_record(file_name, mask, None, quality_report(mask).as_dict())


def coco_document(records: dict[str, dict], category: str, info: dict) -> dict:
    """Assemble a COCO document from records keyed by file name (ids follow sorted names)."""
    images, annotations = [], []
    for image_id, name in enumerate(sorted(records), start=1):
        record = records[name]
        images.append({"id": image_id, **record["image"]})
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 1, **record["annotation"]})
    return {
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": category}],
    }


def records_from_document(document: dict) -> dict[str, dict]:
    """Inverse of :func:`coco_document`: records keyed by file name."""
    by_id = {image["id"]: image for image in document.get("images", [])}
    records = {}
    for annotation in document.get("annotations", []):
        image = by_id[annotation["image_id"]]
        records[image["file_name"]] = {
            "image": {key: image[key] for key in ("file_name", "height", "width")},
            "annotation": {
                key: value for key, value in annotation.items() if key not in ("id", "image_id", "category_id")
            },
        }
    return records


def _binary(rle: dict) -> dict:
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
