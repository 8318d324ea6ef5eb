"""Video datasets: their frames are the targets, written to ``frames.<field>``.

A run on a video dataset works on FiftyOne's frames view of it (``to_frames(sample_frames=True)``:
each frame a sample with its image extracted by ffmpeg, its fields the frame's, writes going
through to the video's frames). References and negatives are frames holding a mask in the
reference field whose video carries the tag, or whose mask label carries it (label tags are how
the App tags a single frame's content); both are mirrored as tags of the frames view, so the
image code reads them unchanged. Targets are the other frames of the chosen videos.
"""

from __future__ import annotations


def is_video(collection) -> bool:
    """Whether ``collection`` holds videos (its frames are then the targets)."""
    return collection.media_type == "video"


def label_schema(dataset, **kwargs) -> dict:
    """The fields labels live in: the frames' of a video dataset, else the samples'."""
    if is_video(dataset):
        return dataset.get_frame_field_schema(**kwargs) or {}
    return dataset.get_field_schema(**kwargs)


def frames_collection(dataset, chosen: dict):
    """The frames view of a video ``dataset``, its frames tagged as references or negatives
    (see the module docstring) afresh for this run's tags and reference field."""
    frames = dataset.to_frames(sample_frames=True)
    field = chosen["reference_field"]
    for tag in (chosen["reference_tag"], chosen["negative_tag"]):
        frames.match_tags(tag).untag_samples(tag)
        if not field or field not in frames.get_field_schema():
            continue
        videos = set(dataset.match_tags(tag).values("id"))
        ids, sample_ids, label_tags = frames.exists(field).values(["id", "sample_id", f"{field}.tags"])
        tagged = [frame for frame, video, tags in zip(ids, sample_ids, label_tags) if video in videos or tag in (tags or [])]
        if tagged:
            frames.select(tagged).tag_samples(tag)
    return frames


def target_frames(target_videos, frames, chosen: dict):
    """The frames of ``target_videos`` that are neither references nor negatives."""
    from bson import ObjectId
    from fiftyone import ViewField as F

    videos = [ObjectId(video) for video in target_videos.values("id")]
    untagged = frames.match_tags([chosen["reference_tag"], chosen["negative_tag"]], bool=False)
    return untagged.match(F("_sample_id").is_in(videos))
