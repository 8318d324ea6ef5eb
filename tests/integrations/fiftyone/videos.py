"""Small H.264 videos of the example scenes, written with Debian's ffmpeg (which FiftyOne itself
needs to read and sample videos), for the video tests of the plugin and of the App."""

from __future__ import annotations

import subprocess

from data import EXAMPLES
from PIL import Image

SCENES = sorted((EXAMPLES / "targets").glob("*.png"))

SIZE = (320, 256)


def write_video(path, scenes) -> list:
    """A 2 fps H.264 video of ``scenes`` resized to 320 x 256, one frame each; returns the paths
    of their true masks at that size."""
    frames = path.parent / f"{path.stem}_frames"
    frames.mkdir()
    masks = []
    for index, scene in enumerate(scenes, start=1):
        Image.open(scene).convert("RGB").resize(SIZE, Image.BILINEAR).save(frames / f"{index:03d}.png")
        masks.append(frames / f"{index:03d}_mask.png")
        Image.open(EXAMPLES / "masks" / scene.name).convert("L").resize(SIZE, Image.NEAREST).save(masks[-1])
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-framerate", "2", "-i", str(frames / "%03d.png"),
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True)
    return masks


def reference_and_target(dataset, folder):
    """``dataset`` with a reference video of two scenes (tagged ``reference``; its frames hold the
    scenes' true masks in ``ground_truth``) and a target video of four, written into ``folder``."""
    import fiftyone as fo

    masks = write_video(folder / "reference.mp4", SCENES[:2])
    write_video(folder / "target.mp4", SCENES[2:6])
    dataset.add_samples([fo.Sample(filepath=str(folder / "reference.mp4"), tags=["reference"]),
                         fo.Sample(filepath=str(folder / "target.mp4"))])
    reference = dataset.match_tags("reference").first()
    for number, mask in enumerate(masks, start=1):
        reference.frames[number]["ground_truth"] = fo.Segmentation(mask_path=str(mask))
    reference.save()
    return dataset
