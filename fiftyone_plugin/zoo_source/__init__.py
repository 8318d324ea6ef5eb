"""FiftyOne zoo model source ``insid3``: the entry points FiftyOne calls, kept in the installed
``fiftyone_plugin.zoo`` module (so DataLoader workers can import what they unpickle)."""

from pathlib import Path


NOTE = "insid3-dinov3-torch takes its DINOv3 weights from load_zoo_model(..., weights=PATH)\n"


def download_model(model_name, model_path):
    """Nothing to download: the DINOv3 weights are given to ``load_zoo_model(..., weights=PATH)``.
    Leaves a note at ``model_path`` so FiftyOne counts the model as downloaded."""
    Path(model_path).parent.mkdir(parents=True, exist_ok=True)
    Path(model_path).write_text(NOTE, encoding="utf-8")


def load_model(model_name, model_path, **kwargs):
    from fiftyone_plugin.zoo import load_model as load

    return load(**kwargs)


def resolve_input(model_name, ctx):
    from fiftyone_plugin.zoo import resolve_input as resolve

    return resolve(ctx)


def parse_parameters(model_name, ctx, params):
    from fiftyone_plugin.zoo import parse_parameters as parse

    parse(ctx, params)
