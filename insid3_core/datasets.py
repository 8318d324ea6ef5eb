"""Few-shot segmentation datasets in their standard on-disk layouts, and seeded episodes.

Layouts (``ROOT`` is the folder given on the command line):

``coco20i``
    COCO 2014: ``ROOT/annotations/instances_<split>.json`` and ``ROOT/<split>/`` (split
    ``val2014`` by default). The 80 categories, numbered 1..80 in category-id order, form 4 folds
    interleaved as in HSNet: fold ``i`` holds classes ``4k + i + 1``. A class mask is the union of
    all the category's annotations in the image (crowd regions included).
``fss1000``
    ``ROOT/<class>/<N>.jpg`` with ``<N>.png`` (foreground: grey level >= 128).
``isic``
    ISIC 2018 task 1: ``ROOT/ISIC2018_Task1-2_<split>_Input/[<class>/]ISIC_<id>.jpg`` and
    ``ROOT/ISIC2018_Task1_<split>_GroundTruth/ISIC_<id>_segmentation.png`` (split ``Training``
    by default; foreground >= 128). Classes: the input folder's sub-folders (PATNet layout), else
    ``ROOT/class_id.csv`` (columns ``ID,Class``), else one class ``lesion``.
``suim``
    ``ROOT/images/<stem>.jpg`` and colour-coded ``ROOT/masks/<stem>.bmp`` (each RGB channel
    thresholded at 128 gives a 3-bit code; 000 is the background waterbody, the 7 other codes
    are the classes), or per-class binary masks ``ROOT/masks/<class>/<stem>.bmp``.
``folder``
    ``ROOT/<class>/<stem>.<ext>`` with ``<stem>_mask.png`` (foreground: ``> 0`` as stored), the
    layout of ``INSID3_REFERENCE_DIR``.
"""

from __future__ import annotations

import contextlib
import csv
from io import StringIO
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from .io import IMAGE_EXTENSIONS, InputError, _open_oriented, load_mask, read_small_file

LAYOUTS = ("coco20i", "fss1000", "isic", "suim", "folder")
DEFAULT_SPLITS = {"coco20i": "val2014", "isic": "Training"}
COCO_CLASSES = 80
COCO_FOLDS = 4
FOLD_EPISODES = 1000
SUIM_CODES = {"HD": 0b001, "PF": 0b010, "WR": 0b011, "RO": 0b100, "RI": 0b101, "FV": 0b110, "SR": 0b111}
SUIM_MASK_EXTENSIONS = (".bmp", ".png")


class LayoutError(InputError):
    """A dataset folder does not have the layout it was given as; the message names the path."""


@dataclass(frozen=True)
class Sample:
    """One image with the mask of one class.

    Attributes
    ----------
    image : Path
    source : str
        Where the mask comes from (a file, or an annotation file with the image and category).
    load : callable
        Returns the ``(H, W)`` bool mask at the image's size.
    """

    image: Path
    source: str
    load: Callable[[], np.ndarray] = field(compare=False, repr=False)

    def mask(self) -> np.ndarray:
        """The ``(H, W)`` bool mask."""
        return self.load()


@dataclass(frozen=True)
class Dataset:
    """Samples per class and classes per fold.

    Attributes
    ----------
    layout : str
        One of :data:`LAYOUTS`.
    root : Path
    classes : dict of str to tuple of Sample
    folds : dict of int to tuple of str
        Class names of each fold (one fold ``0`` with every class for single-fold layouts).
    sampling : str
        ``"fold"``: episodes are drawn per fold, their class uniformly (COCO-20i);
        ``"class"``: episodes are made per class.
    """

    layout: str
    root: Path
    classes: dict[str, tuple[Sample, ...]]
    folds: dict[int, tuple[str, ...]]
    sampling: str = "class"


@dataclass(frozen=True)
class Episode:
    """References and targets of one class.

    Attributes
    ----------
    index : int
    fold : int
    label : str
        Class name.
    supports : tuple of Sample
        The ``k`` references.
    queries : tuple of Sample
        The targets, none of them a reference.
    """

    index: int
    fold: int
    label: str
    supports: tuple[Sample, ...]
    queries: tuple[Sample, ...]


def load_dataset(
    layout: str, root: str | Path, split: str | None = None, class_list: str | Path | None = None
) -> Dataset:
    """Index a dataset folder (no image is decoded, except SUIM masks to find their classes).

    Parameters
    ----------
    layout : str
        One of :data:`LAYOUTS`.
    root : str or Path
    split : str or None
        COCO-20i image set (``val2014``) or ISIC 2018 part (``Training``); ``None`` for the default.
    class_list : str, Path or None
        A text file of class names, one a line (e.g. FSS-1000's test split): only these are kept.

    Raises
    ------
    LayoutError
        Naming the missing or malformed path.
    """
    root = Path(root).expanduser()
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    if not root.is_dir():
        raise LayoutError(f"{root}: no such dataset folder")
    if split is not None and layout not in DEFAULT_SPLITS:
        raise ValueError(f"--split applies to {' and '.join(DEFAULT_SPLITS)} only, not {layout}")
    split = split or DEFAULT_SPLITS.get(layout)
    if layout == "coco20i":
        classes, folds = coco20i(root, split)
        dataset = Dataset(layout, root, classes, folds, sampling="fold")
    else:
        if layout == "isic":
            classes = isic(root, split)
        else:
            classes = {"fss1000": fss1000, "suim": suim, "folder": folder}[layout](root)
        dataset = Dataset(layout, root, classes, {0: tuple(sorted(classes))})
    return dataset if class_list is None else select_classes(dataset, Path(class_list).expanduser())


def select_classes(dataset: Dataset, class_list: Path) -> Dataset:
    """Keep the classes named in ``class_list`` (one a line); a name without samples is an error."""
    try:
        names = [line.strip() for line in read_small_file(class_list).decode("utf-8").splitlines() if line.strip()]
    except OSError as err:
        raise LayoutError(f"{class_list}: cannot read class list ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise LayoutError(f"{class_list}: the class list is not UTF-8 text ({err.reason} at byte {err.start})") from err
    missing = [name for name in names if name not in dataset.classes]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LayoutError(f"{class_list}: {shown}: no such class under {dataset.root}")
    if not names:
        raise LayoutError(f"{class_list}: the class list is empty")
    wanted = set(names)
    classes = {name: samples for name, samples in dataset.classes.items() if name in wanted}
    folds = {fold: tuple(name for name in members if name in wanted) for fold, members in dataset.folds.items()}
    return Dataset(dataset.layout, dataset.root, classes, {f: m for f, m in folds.items() if m}, dataset.sampling)


def coco20i(root: Path, split: str) -> tuple[dict[str, tuple[Sample, ...]], dict[int, tuple[str, ...]]]:
    """COCO-20i classes (category names) and their 4 interleaved folds."""
    from pycocotools.coco import COCO

    annotations = root / "annotations" / f"instances_{split}.json"
    images = root / split
    for path in (annotations, images):
        if not path.exists():
            raise LayoutError(f"{path}: not found (COCO-20i expects ROOT/annotations/instances_{split}.json "
                              f"and the images in ROOT/{split}/)")
    try:
        with contextlib.redirect_stdout(StringIO()):
            coco = COCO(str(annotations))
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        raise LayoutError(f"{annotations}: not a COCO instances file ({type(err).__name__}: {err})") from err
    categories = sorted(coco.getCatIds())
    if len(categories) != COCO_CLASSES:
        raise LayoutError(f"{annotations}: COCO-20i needs the {COCO_CLASSES} COCO categories, found {len(categories)}")
    classes: dict[str, tuple[Sample, ...]] = {}
    folds: dict[int, list[str]] = {fold: [] for fold in range(COCO_FOLDS)}
    for index, category in enumerate(categories):
        name = coco.cats[category]["name"]
        folds[index % COCO_FOLDS].append(name)
        classes[name] = tuple(
            Sample(images / coco.imgs[image]["file_name"], f"{annotations} (image {image}, category {name})",
                   partial(coco_mask, coco, image, category))
            for image in sorted(coco.getImgIds(catIds=[category]))
        )
    return {name: samples for name, samples in classes.items() if samples}, {f: tuple(m) for f, m in folds.items()}


def coco_mask(coco, image: int, category: int) -> np.ndarray:
    """``(H, W)`` bool union of one category's annotations in one image."""
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=image, catIds=category, iscrowd=None))
    return np.logical_or.reduce([coco.annToMask(annotation) > 0 for annotation in annotations])


def fss1000(root: Path) -> dict[str, tuple[Sample, ...]]:
    """FSS-1000 class folders of ``<N>.jpg`` + ``<N>.png``."""
    classes = {}
    for class_dir in sorted(path for path in root.iterdir() if path.is_dir()):
        samples = []
        for image in sorted(class_dir.glob("*.jpg")):
            mask = image.with_suffix(".png")
            if not mask.is_file():
                raise LayoutError(f"{mask}: missing mask of {image.name} (FSS-1000 pairs <N>.jpg with <N>.png)")
            samples.append(Sample(image, str(mask), partial(thresholded_mask, mask)))
        if samples:
            classes[class_dir.name] = tuple(samples)
    if not classes:
        raise LayoutError(f"{root}: no FSS-1000 class folder (expected ROOT/<class>/<N>.jpg with <N>.png)")
    return classes


def isic(root: Path, split: str) -> dict[str, tuple[Sample, ...]]:
    """ISIC 2018 task 1 lesions, by class (input sub-folders or ``class_id.csv``) or as one class."""
    images = root / f"ISIC2018_Task1-2_{split}_Input"
    masks = root / f"ISIC2018_Task1_{split}_GroundTruth"
    for path in (images, masks):
        if not path.is_dir():
            raise LayoutError(f"{path}: not found (ISIC 2018 expects ROOT/ISIC2018_Task1-2_{split}_Input/ "
                              f"and ROOT/ISIC2018_Task1_{split}_GroundTruth/)")
    subfolders = sorted(path for path in images.iterdir() if path.is_dir())
    if subfolders:
        groups = {path.name: sorted(path.glob("*.jpg")) for path in subfolders}
    elif (root / "class_id.csv").is_file():
        groups = isic_class_table(root / "class_id.csv", images)
    else:
        groups = {"lesion": sorted(images.glob("*.jpg"))}
    classes = {}
    for name, files in groups.items():
        samples = []
        for image in files:
            mask = masks / f"{image.stem}_segmentation.png"
            if not mask.is_file():
                raise LayoutError(f"{mask}: missing mask of {image}")
            samples.append(Sample(image, str(mask), partial(thresholded_mask, mask)))
        if samples:
            classes[name] = tuple(samples)
    if not classes:
        raise LayoutError(f"{images}: no ISIC_<id>.jpg image")
    return classes


def isic_class_table(table: Path, images: Path) -> dict[str, list[Path]]:
    """Images of ``images`` grouped by the ``Class`` column of ``table`` (rows ``ID,Class``)."""
    with table.open(newline="", encoding="utf-8-sig") as stream:
        rows = list(csv.DictReader(stream))
    if rows and not {"ID", "Class"} <= set(rows[0]):
        raise LayoutError(f"{table}: expected the columns ID,Class")
    groups: dict[str, list[Path]] = {}
    for row in rows:
        image = images / f"{row['ID']}.jpg"
        if image.is_file():
            groups.setdefault(row["Class"], []).append(image)
    return {name: sorted(files) for name, files in sorted(groups.items())}


def suim(root: Path) -> dict[str, tuple[Sample, ...]]:
    """SUIM classes from colour-coded masks, or from per-class mask folders."""
    images, masks = root / "images", root / "masks"
    for path in (images, masks):
        if not path.is_dir():
            raise LayoutError(f"{path}: not found (SUIM expects ROOT/images/ and ROOT/masks/)")
    class_dirs = sorted(path for path in masks.iterdir() if path.is_dir())
    classes: dict[str, list[Sample]] = {}
    if class_dirs:
        for class_dir in class_dirs:
            for mask in sorted(p for p in class_dir.iterdir() if p.suffix.lower() in SUIM_MASK_EXTENSIONS):
                if thresholded_mask(mask).any():
                    sample = Sample(image_for(images, mask.stem, mask), str(mask), partial(thresholded_mask, mask))
                    classes.setdefault(class_dir.name, []).append(sample)
    else:
        for image in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            mask = next((masks / f"{image.stem}{ext}" for ext in SUIM_MASK_EXTENSIONS
                         if (masks / f"{image.stem}{ext}").is_file()), None)
            if mask is None:
                raise LayoutError(f"{masks / image.stem}.bmp: missing colour-coded mask of {image}")
            present = set(np.unique(suim_codes(mask)).tolist())
            for name, code in SUIM_CODES.items():
                if code in present:
                    classes.setdefault(name, []).append(Sample(image, str(mask), partial(suim_mask, mask, code)))
    if not classes:
        raise LayoutError(f"{masks}: no SUIM mask with a foreground class")
    return {name: tuple(samples) for name, samples in sorted(classes.items())}


def folder(root: Path) -> dict[str, tuple[Sample, ...]]:
    """``ROOT/<class>/<stem>.<ext>`` with ``<stem>_mask.png``."""
    classes = {}
    for class_dir in sorted(path for path in root.iterdir() if path.is_dir()):
        samples = []
        for image in sorted(class_dir.iterdir()):
            if image.suffix.lower() not in IMAGE_EXTENSIONS or image.stem.endswith("_mask"):
                continue
            mask = image.with_name(f"{image.stem}_mask.png")
            if not mask.is_file():
                raise LayoutError(f"{mask}: missing mask of {image.name} (the folder layout pairs "
                                  f"<stem>.<ext> with <stem>_mask.png)")
            samples.append(Sample(image, str(mask), partial(load_mask, mask)))
        if samples:
            classes[class_dir.name] = tuple(samples)
    if not classes:
        raise LayoutError(f"{root}: no class folder with images (expected ROOT/<class>/<stem>.<ext> "
                          f"with <stem>_mask.png)")
    return classes


def image_for(images: Path, stem: str, mask: Path) -> Path:
    """The image of ``images`` named ``stem`` with any image extension."""
    for ext in IMAGE_EXTENSIONS:
        if (images / f"{stem}{ext}").is_file():
            return images / f"{stem}{ext}"
    raise LayoutError(f"{images / stem}.jpg: missing image of the mask {mask}")


def thresholded_mask(path: Path, threshold: int = 128) -> np.ndarray:
    """``(H, W)`` bool: grey level ``>= threshold`` (FSS-1000, ISIC and SUIM binary masks)."""
    return np.asarray(_open_oriented(path).convert("L")) >= threshold


def suim_codes(path: Path) -> np.ndarray:
    """``(H, W)`` uint8 SUIM class codes ``4 R + 2 G + B``, each channel thresholded at 128."""
    bits = np.asarray(_open_oriented(path).convert("RGB")) >= 128
    return (bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]).astype(np.uint8)


def suim_mask(path: Path, code: int) -> np.ndarray:
    """``(H, W)`` bool pixels of one SUIM class code."""
    return suim_codes(path) == code


def make_episodes(
    dataset: Dataset,
    shots: int,
    queries: int = 1,
    episodes: int | None = None,
    folds: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[list[Episode], dict[str, str]]:
    """Seeded episodes: ``shots`` references and ``queries`` other images of one class each.

    With ``sampling == "fold"`` (COCO-20i) each fold gets ``episodes`` episodes (default
    :data:`FOLD_EPISODES`), each of a class drawn uniformly among the fold's classes, its images
    drawn uniformly. With ``sampling == "class"`` each class gets ``episodes`` episodes of
    randomly drawn images or, by default, every image of the class is a query once (in groups of
    ``queries``). References are drawn among the class's other images. Each fold (or class) has
    its own generator seeded by ``seed`` and the fold (class name), so selecting folds or classes
    leaves the others' episodes unchanged.

    Returns
    -------
    episodes : list of Episode
    skipped : dict of str to str
        Classes left out, with the reason (fewer than ``shots + queries`` images).
    """
    if shots < 1 or queries < 1 or (episodes is not None and episodes < 1):
        raise ValueError("shots, queries and episodes must be >= 1")
    folds = sorted(dataset.folds) if folds is None else list(folds)
    unknown = [fold for fold in folds if fold not in dataset.folds]
    if unknown:
        raise ValueError(f"fold {unknown[0]} does not exist in this {dataset.layout} dataset "
                         f"(folds: {', '.join(map(str, sorted(dataset.folds)))})")
    needed = shots + queries
    skipped = {name: f"{len(dataset.classes.get(name, ()))} image(s), {needed} needed"
               for fold in folds for name in dataset.folds[fold] if len(dataset.classes.get(name, ())) < needed}
    made: list[Episode] = []
    for fold in folds:
        eligible = [name for name in dataset.folds[fold] if name not in skipped]
        if not eligible:
            raise ValueError(f"fold {fold} has no class with at least {needed} images "
                             f"({shots} shot(s) + {queries} query)")
        if dataset.sampling == "fold":
            rng = np.random.default_rng([seed, fold])
            for _ in range(episodes or FOLD_EPISODES):
                label = eligible[rng.integers(len(eligible))]
                samples = dataset.classes[label]
                made.append(_episode(len(made), fold, label, samples, rng.choice(len(samples), queries, replace=False),
                                     shots, rng))
        else:
            for label in eligible:
                samples = dataset.classes[label]
                rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
                if episodes is None:
                    groups = [np.arange(start, min(start + queries, len(samples)))
                              for start in range(0, len(samples), queries)]
                else:
                    groups = [rng.choice(len(samples), queries, replace=False) for _ in range(episodes)]
                for group in groups:
                    made.append(_episode(len(made), fold, label, samples, group, shots, rng))
    return made, skipped


def _episode(index: int, fold: int, label: str, samples: Sequence[Sample], query_indices: np.ndarray,
             shots: int, rng: np.random.Generator) -> Episode:
    pool = np.setdiff1d(np.arange(len(samples)), query_indices)
    supports = rng.choice(pool, shots, replace=False)
    return Episode(index, fold, label, tuple(samples[i] for i in supports), tuple(samples[i] for i in query_indices))
