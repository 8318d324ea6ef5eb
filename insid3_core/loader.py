"""Decoding and resizing targets in worker threads, ahead of the device."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .features import resized_pixels
from .io import InputError, load_image

_END = object()  # the end of a target stream (a None target is a target, refused as such)


@dataclass
class LoadedBatch:
    """Targets decoded and resized for one backbone call.

    Attributes
    ----------
    entries : list of (target, InputError or None)
        Every target met for this batch, in input order, with its error if it could not be read.
    pixels : torch.Tensor or None
        ``(B, 3, s, s)`` uint8 of the readable targets, in pinned memory when requested;
        ``None`` when none was readable.
    sizes : list of (H, W)
        Each readable target's size in its displayed orientation.
    """

    entries: list[tuple[object, InputError | None]] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    sizes: list[tuple[int, int]] = field(default_factory=list)


class InlineExecutor:
    """An executor that runs each task when it is submitted, in the caller's thread."""

    def submit(self, function, *arguments) -> Future:
        future: Future = Future()
        try:
            future.set_result(function(*arguments))
        except BaseException as err:  # delivered by future.result(), as a pool would
            future.set_exception(err)
        return future

    def __enter__(self) -> InlineExecutor:
        return self

    def __exit__(self, *exc_info) -> None:
        return None


def executor(workers: int, name: str) -> ThreadPoolExecutor | InlineExecutor:
    """``workers`` threads, or the caller's own thread when ``workers`` is 0."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) if workers else InlineExecutor()


def default_workers(device: torch.device) -> int:
    """Threads around the device: 4 beside an accelerator, 2 when the backbone itself runs on the CPU."""
    return 2 if device.type == "cpu" else 4


def load_target(target, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """A target (path or PIL image) as ``(3, s, s)`` uint8 pixels and its displayed ``(H, W)``."""
    image = load_image(target)
    return resized_pixels(image, image_size), (image.height, image.width)


def load_batches(
    targets: Iterable,
    image_size: int,
    batch_size: int,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[LoadedBatch]:
    """Yield batches of decoded targets while the next ones load in ``workers`` threads.

    PIL decodes and resizes outside the GIL, so threads overlap the device's work; with
    ``workers=0`` targets load in the caller's thread. At most two batches are in flight.
    """
    pending: deque[tuple[object, Future]] = deque()
    source = iter(targets)
    with executor(workers, "insid3-load") as pool:

        def refill() -> None:
            while len(pending) < 2 * batch_size:
                target = next(source, _END)
                if target is _END:
                    return
                pending.append((target, pool.submit(load_target, target, image_size)))

        refill()
        while pending:
            batch = LoadedBatch()
            tensors = []
            while pending and len(tensors) < batch_size:
                target, future = pending.popleft()
                refill()
                try:
                    pixels, size = future.result()
                except InputError as err:
                    batch.entries.append((target, err))
                    continue
                batch.entries.append((target, None))
                tensors.append(pixels)
                batch.sizes.append(size)
            if tensors:
                batch.pixels = torch.stack(tensors)
                if pin_memory:
                    batch.pixels = batch.pixels.pin_memory()
            yield batch
