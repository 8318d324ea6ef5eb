"""The parts of a Label Studio labelling config the backend needs: a ``BrushLabels``,
``BitmaskLabels`` or ``PolygonLabels`` control on an image."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

from .errors import BackendError
from .references import label_folder

MAX_FOLDER_NAME = 255


CONTROLS = {"BrushLabels": "brushlabels", "BitmaskLabels": "bitmasklabels", "PolygonLabels": "polygonlabels"}
"""The region controls the backend predicts, and their result ``type``."""


@dataclass(frozen=True)
class RegionTarget:
    """A region control (``<BrushLabels>``, ``<BitmaskLabels>`` or ``<PolygonLabels>``) and the
    ``<Image>`` it labels.

    Attributes
    ----------
    from_name : str
        The control's ``name``.
    to_name : str
        The image tag's ``name``.
    data_key : str
        Task data field holding the image address (``$image`` -> ``image``).
    labels : tuple of str
        The control's label values.
    kind : {"brushlabels", "bitmasklabels", "polygonlabels"}
        The results' ``type`` (RLE brush masks, PNG bitmasks or polygons).
    """

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]
    kind: str = "brushlabels"

    def own_labels(self, names) -> list[str]:
        """Those of a region's label ``names`` (a list, else none) that are the control's."""
        return [name for name in names if name in self.labels] if isinstance(names, list) else []


def region_target(label_config: str) -> RegionTarget:
    """The first region control (:data:`CONTROLS`) of ``label_config`` bound to an ``Image`` tag.

    Raises :class:`BackendError` (400) when the config is missing, not XML, has no region
    control on an image, or a label too long for a folder name.
    """
    if not label_config or not label_config.strip():
        raise BackendError("the project has no labelling config")
    try:
        root = ElementTree.fromstring(label_config)
    except ElementTree.ParseError as err:
        raise BackendError(f"the labelling config is not valid XML: {err}") from err
    images = {tag.get("name"): tag.get("value", "") for tag in root.iter() if tag.tag == "Image"}
    for control in (tag for tag in root.iter() if tag.tag in CONTROLS):
        to_name = control.get("toName", "")
        if to_name in images and images[to_name].startswith("$"):
            labels = tuple(label.get("value", "") for label in control.iter("Label") if label.get("value"))
            if not labels:
                raise BackendError(f"{control.tag} {control.get('name')!r} has no <Label> values")
            too_long = [label for label in labels if len(label_folder(label)) > MAX_FOLDER_NAME]
            if too_long:
                raise BackendError(f"label {too_long[0][:40]!r}... is too long: its reference folder name would be "
                                   f"{len(label_folder(too_long[0]))} characters (URL-quoted), at most {MAX_FOLDER_NAME}")
            return RegionTarget(control.get("name", ""), to_name, images[to_name][1:], labels, CONTROLS[control.tag])
    raise BackendError(
        "the labelling config has no <BrushLabels>, <BitmaskLabels> or <PolygonLabels> bound to an <Image>; "
        "insid3 predicts masks only"
    )
