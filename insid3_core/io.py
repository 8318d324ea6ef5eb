"""Reading the images and masks users have, and writing outputs atomically."""

from __future__ import annotations

import collections
import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping
from io import BytesIO
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps

ImageLike = str | Path | Image.Image
MaskLike = str | Path | Image.Image | np.ndarray
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".avif", ".gif")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
MAX_SMALL_FILE_BYTES = 16 * 2**20  # settings, points and class lists: far above any real one


class InputError(ValueError):
    """An input file cannot be used; the message names the file and the problem."""


def broken_link(path: str | Path) -> str | None:
    """What to say of ``path`` when it is a link whose file is gone (``None`` otherwise)."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"{path}: a link to {os.readlink(path)}, which does not exist"
    return None


def target_path(path: Path) -> Path | None:
    """How an entry of a target folder or a glob match is segmented: its path, or ``None`` to leave it out.

    An image file (links followed) is its absolute path, links kept, so that its mask and records
    take the name the user sees (a folder of links into a content-addressed store names masks
    after the links, not the store's hashes). A link whose file is missing is kept too, so that
    loading it fails and the batch reports it rather than losing it without a word. Anything else
    (another extension, a folder, a pipe or device) is ``None``.
    """
    if path.suffix.lower() in IMAGE_EXTENSIONS and (path.is_file() or broken_link(path)):
        return Path(os.path.abspath(path))
    return None


def folder_images(entries: Iterable[Path], left_out: collections.Counter) -> Iterator[Path]:
    """The :func:`target_path` of each of a folder's ``entries`` that is an image; the other files
    (hidden ones aside) are counted in ``left_out`` by :func:`not_image_kind`."""
    for entry in entries:
        target = target_path(entry)
        if target:
            yield target
        elif entry.is_file() and (kind := not_image_kind(entry.name)):
            left_out[kind] += 1


def not_image_kind(name: str) -> str | None:
    """How a folder's file ``name`` that is not an image is counted in :func:`left_out_note`: its
    lower-case extension, or ``no extension``; ``None`` for a hidden file (``.DS_Store``), not counted."""
    name = PurePosixPath(name).name
    if name.startswith("."):
        return None
    return PurePosixPath(name).suffix.lower() or "no extension"


def left_out_note(spec: str, counts: Mapping[str, int]) -> str:
    """The line that says which files of the folder ``spec`` were left out as not images
    (``counts``: :func:`not_image_kind` -> files), so none is left out without a word."""
    listed = ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items()))
    return f"insid3: {spec}: left out {sum(counts.values())} file(s) that are not images insid3 reads ({listed})"


def _open_oriented(path: str | Path, source=None) -> Image.Image:
    """Open, fully decode and apply the EXIF orientation; any failure names the file. ``source``:
    a binary stream holding the file ``path`` names (read from elsewhere, e.g. an object store)."""
    return _decoded(path, source)[0]


def _decoded(path: str | Path, source=None) -> tuple[Image.Image, str | None]:
    """:func:`_open_oriented`'s image and the file's format (``"PNG"``, ``"JPEG"``, ...), which
    the oriented copy no longer carries."""
    if source is None and os.path.exists(path) and not os.path.isfile(path):
        raise InputError(f"{path}: not a regular file (a folder, pipe or device)")
    try:
        with Image.open(path if source is None else source) as handle:
            handle.load()
            return ImageOps.exif_transpose(handle), handle.format
    except FileNotFoundError as err:
        broken = broken_link(path) if source is None else None
        raise InputError(broken or f"{path}: file not found") from err
    except Image.DecompressionBombError as err:
        raise InputError(f"{path}: more pixels than decode safely ({err.args[0].split(',')[0]}; PIL's "
                         "decompression-bomb guard); the engine sees it at image_size anyway: downscale "
                         "it first") from err
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
        detail = str(err).replace(repr(str(path)), "it").replace(str(path), "it")  # PIL repeats the path
        raise InputError(f"{path}: unreadable or truncated image ({type(err).__name__}: {detail})") from err


def read_small_file(path: str | Path, limit: int = MAX_SMALL_FILE_BYTES) -> bytes:
    """The content of a settings, points or class-list file, for a path a user gave.

    Raises ``OSError`` (its ``strerror`` says why, for the caller's message naming the option)
    for a missing file, one that is not a regular file (a FIFO would block the read forever,
    ``/dev/zero`` would fill the memory) or one longer than ``limit`` bytes.
    """
    descriptor = os.open(Path(path).expanduser(), os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without a writer
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a folder, pipe or device)")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"longer than {limit} bytes, more than such a file holds")
    return data


def json_value(text: str | bytes):
    """``json.loads(text)``, with a document nested too deeply for Python's parser (which raises
    ``RecursionError``) a ``ValueError`` like any other malformed document."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to be read") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL image: 16-bit greyscale is scaled to 8 bits, alpha is dropped."""
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        scale = 257.0 if pixels.max(initial=0) > 255 or image.mode != "I" else 1.0
        image = Image.fromarray(np.clip(pixels / scale, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """An image as RGB in its displayed orientation (EXIF applied), from a path or PIL image.

    Grayscale, palette, RGBA and 16-bit images are accepted. Raises ``TypeError`` for anything
    but a path or PIL image, and :class:`InputError`
    naming the file when it is missing, unreadable or truncated.
    """
    if isinstance(image, Image.Image):
        if not image.width or not image.height:
            raise InputError(f"an image of {image.width}x{image.height} pixels has nothing to segment")
        return to_rgb(ImageOps.exif_transpose(image))
    if not isinstance(image, (str, os.PathLike)):
        hint = " (PIL.Image.fromarray makes one of an (H, W, 3) uint8 array)" if isinstance(image, np.ndarray) else ""
        raise TypeError(f"an image must be a file path or a PIL image, got {type(image).__name__}{hint}")
    return to_rgb(_open_oriented(image))


def load_image_bytes(data: bytes, name: str) -> Image.Image:
    """:func:`load_image` of a file's content ``data`` read from ``name`` (a path or URI), which
    errors name."""
    return to_rgb(_open_oriented(name, BytesIO(data)))


ORIENTATION_TAG = 0x0112
"""EXIF orientation; its values 5-8 turn the image a quarter."""


def oriented_size(path: str | Path, source=None) -> tuple[int, int] | None:
    """``(width, height)`` of an image file as the engine sees it (EXIF orientation applied), read
    from its header (``source``: its content as a binary stream); ``None`` when it cannot be read
    (the run reports that target itself)."""
    try:
        with Image.open(path if source is None else source) as image:
            width, height = image.size
            return (height, width) if image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8) else (width, height)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def mask_pixels(image: Image.Image) -> np.ndarray:
    """The pixels of a decoded mask as stored, ``(H, W)`` or ``(H, W, C)``; a CMYK mask (print
    software's) as its RGB rendering, so that what shows white is foreground, not only ink."""
    return np.asarray(image.convert("RGB") if image.mode == "CMYK" else image)


def mask_array(mask: Image.Image | np.ndarray, value: int | None = None) -> np.ndarray:
    """Foreground of a mask as stored: ``array > 0`` (or ``== value`` for one class).

    Palette masks compare their indices; colour masks count a pixel as foreground when any
    colour channel is nonzero and, with an alpha channel, the pixel is not transparent. A mask
    whose colour is black everywhere and whose alpha varies is an alpha mask: its foreground
    is where it is not transparent.

    Returns
    -------
    np.ndarray
        ``(H, W)`` bool.
    """
    array = mask_pixels(mask) if isinstance(mask, Image.Image) else np.asarray(mask)
    if array.ndim not in (2, 3) or (array.ndim == 3 and not 1 <= array.shape[2] <= 4):
        raise ValueError(f"a mask must be (H, W) or (H, W, C) with C from 1 to 4 (channels last), "
                         f"got shape {array.shape}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return array > 0 if value is None else array == value
    if value is not None:
        raise ValueError("a class value selects pixels of single-channel (greyscale or palette) masks only")
    has_alpha = array.shape[2] in (2, 4)
    foreground = (array[..., :-1] if has_alpha else array).max(axis=2) > 0
    if has_alpha:
        alpha = array[..., -1]
        alpha_only = not foreground.any() and alpha.min() < alpha.max()
        foreground = alpha > 0 if alpha_only else foreground & (alpha > 0)
    return np.asarray(foreground, dtype=bool)


LOSSY_FORMATS = frozenset({"JPEG", "MPO"})
"""Formats whose compression changes pixel values: a binary mask stored so rings around its edges."""
PHOTOGRAPH_COLOURS = 4096
"""More distinct colours than any mask holds (binary, class values, colour-coded classes): a photograph."""
_COLOUR_SAMPLE = 1 << 20


def is_photograph(array: np.ndarray) -> bool:
    """Whether a mask as stored, ``(H, W)`` or ``(H, W, C)``, is a colour picture of more than
    :data:`PHOTOGRAPH_COLOURS` colours (among at most 2**20 evenly spread pixels) whose alpha, if
    any, is opaque: an image given as its mask. A cut-out (a photograph whose transparency is the
    mask) is a mask."""
    if array.ndim != 3 or array.shape[2] < 3 or (array.shape[2] == 4 and (array[..., 3] < array[..., 3].max()).any()):
        return False
    pixels = array.reshape(-1, array.shape[2]).astype(np.uint32)
    pixels = pixels[:: max(1, len(pixels) // _COLOUR_SAMPLE)]
    return len(np.unique(pixels[:, 0] << 16 | pixels[:, 1] << 8 | pixels[:, 2])) > PHOTOGRAPH_COLOURS


def load_mask(
    path: str | Path, image_size: tuple[int, int] | None = None, value: int | None = None, source=None
) -> np.ndarray:
    """Load a reference mask (EXIF applied) as ``(H, W)`` bool.

    Foreground is any nonzero pixel (:func:`mask_array`), except in a JPEG file, whose
    compression leaves faint rings around a mask's edges (:func:`lossy_foreground`).

    Parameters
    ----------
    path : str or Path
    image_size : (W, H) or None
        Size of the image the mask belongs to; a different mask size raises
        :class:`InputError` naming both sizes.
    value : int or None
        Take only pixels equal to this class value (multi-class and palette masks; not JPEG,
        which cannot keep class values exact).
    source : binary stream, optional
        The content of the file ``path`` names, read from elsewhere (an object store).

    Raises
    ------
    InputError
        Naming ``path``: unreadable, of another size than ``image_size``, a JPEG read for a
        class value, or a photograph (:func:`is_photograph`: an image given as its own mask, or
        image and mask swapped).
    """
    image, file_format = _decoded(path, source)
    if image_size is not None and image.size != tuple(image_size):
        raise InputError(
            f"{path}: mask is {image.size[0]}x{image.size[1]} but its image is "
            f"{image_size[0]}x{image_size[1]} (width x height, EXIF orientation applied)"
        )
    array = mask_pixels(image)
    if is_photograph(array):
        raise InputError(f"{path}: more than {PHOTOGRAPH_COLOURS} distinct colours: a photograph, not a mask "
                         "(a mask holds 0 and a foreground value, or a few class values); is it the image "
                         "instead of its mask?")
    if file_format in LOSSY_FORMATS:
        if value is not None:
            raise InputError(f"{path}: a JPEG mask cannot hold exact class values (its compression changes "
                             "them); store class masks as PNG")
        return lossy_foreground(array)
    return mask_array(array, value)


def lossy_foreground(array: np.ndarray) -> np.ndarray:
    """Foreground of a mask read from a JPEG file, ``(H, W)`` or ``(H, W, C)`` -> ``(H, W)`` bool.

    Compression leaves faint nonzero rings around a mask's edges, so a pixel counts where a
    channel is nonzero and at half of that channel's brightest value or more (128 and more in a
    0/255 mask, 1 and more in a 0/1 one); otherwise as :func:`mask_array`.
    """
    array = np.asarray(array)
    return mask_array((array > 0) & (array >= array.max(axis=(0, 1)) / 2))


def label_masks(path: str | Path, max_classes: int = 255) -> dict[int, np.ndarray]:
    """The classes of a multi-class (greyscale, palette or 16-bit) mask, EXIF applied.

    A mask holding more than ``max_classes`` class values (e.g. a photograph given as a mask)
    raises :class:`InputError` naming the file.

    Returns
    -------
    dict of int to np.ndarray
        ``value -> (H, W)`` bool for every stored value other than 0 (background) and, in
        8-bit masks, 255 (void, as in Pascal VOC), in increasing order.
    """
    image, file_format = _decoded(path)
    array = np.asarray(image)
    if array.ndim != 2:
        raise InputError(f"{path}: a {image.mode} mask has no class values; give a greyscale or palette mask")
    if file_format in LOSSY_FORMATS:
        raise InputError(f"{path}: a JPEG mask cannot hold exact class values (its compression changes them); "
                         "store multi-class masks as PNG")
    values = [int(v) for v in np.unique(array) if v != 0 and not (v == 255 and array.dtype == np.uint8)]
    if not values:
        raise InputError(f"{path}: multi-class mask holds no class (only 0 and 255)")
    if len(values) > max_classes:
        raise InputError(f"{path}: {len(values)} class values, more than {max_classes}; is it really a label mask?")
    return {value: array == value for value in values}


TEMPORARY_SUFFIX = ".tmp"


TEMPORARY_NAME_CHARS = 200
"""Characters of a file's name kept in its temporary's (a name of up to 255 stays legal)."""


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for the file being written (``.<name>.<12 hex>.tmp``,
    the name cut to :data:`TEMPORARY_NAME_CHARS`)."""
    return path.with_name(f".{path.name[:TEMPORARY_NAME_CHARS]}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}")


def is_temporary_of(candidate: str, name: str) -> bool:
    """Whether the file name ``candidate`` is one :func:`temporary_name` gives a file named ``name``."""
    pattern = rf"\.{re.escape(name[:TEMPORARY_NAME_CHARS])}\.[0-9a-f]{{12}}{re.escape(TEMPORARY_SUFFIX)}"
    return re.fullmatch(pattern, candidate) is not None


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb"):
    """Open a temporary file beside ``path`` and move it into place only on success.

    Text is written as UTF-8; a character it cannot hold (a file name that is not UTF-8 comes
    back from the file system with lone surrogates) is written as its ``\\udcXX`` escape.

    The file is created with mode ``0o666`` less the process's umask, as ``open`` would
    (``tempfile.mkstemp`` makes it ``0o600`` whatever the umask, which locks out a second user
    sharing a cache or an output folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temporary = temporary_name(path)
        try:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        text = {} if "b" in mode else {"encoding": "utf-8", "errors": "backslashreplace"}  # undecodable file names too
        with os.fdopen(handle, mode, **text) as stream:
            yield stream
        os.replace(temporary, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(err, OSError) and err.filename is None:  # a full disk: name the file it was for
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def write_mask_png(path: str | Path, mask: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Write a ``(H, W)`` bool mask as a 0/255 8-bit PNG, atomically (``text``: PNG text chunks)."""
    write_label_png(path, np.where(mask, 255, 0).astype(np.uint8), text)


def write_label_png(path: str | Path, labels: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Write :func:`label_png` of ``labels`` and ``text`` to ``path``, atomically."""
    with atomic_write(path) as stream:
        stream.write(label_png(labels, text))


def label_png(labels: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """A ``(H, W)`` uint8 label map as the bytes of an 8-bit greyscale PNG, with ``text`` as
    compressed PNG text chunks (``zTXt``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value, zip=True)
    encoded = BytesIO()
    Image.fromarray(labels, mode="L").save(encoded, format="PNG", pnginfo=info)
    return encoded.getvalue()


def file_digest(path: str | Path, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def reference_mask(name: str, image: Image.Image, mask: MaskLike) -> np.ndarray:
    """The ``(H, W)`` bool foreground of a reference ``mask`` for its decoded ``image`` (named
    ``name`` in errors); :class:`InputError` when the sizes differ or the mask is empty."""
    if isinstance(mask, (str, Path)):
        array = load_mask(mask, image.size)
        name = str(mask)
    else:
        try:
            array = mask_array(mask)
        except ValueError as err:
            raise InputError(f"{name}: {err}") from None
        if array.shape != (image.height, image.width):
            raise InputError(
                f"{name}: mask is {array.shape[1]}x{array.shape[0]} but its image is "
                f"{image.width}x{image.height} (width x height)"
            )
    if not array.any():
        raise InputError(f"{name}: reference mask is empty (no foreground pixel)")
    return array


def check_references(pairs, names=None) -> None:
    """Decode ``(image, mask)`` file pairs and check them as the engine will (:func:`reference_mask`),
    so a bad reference is reported before a backbone is loaded. ``names`` (one per pair) name the
    masks given as arrays (a label map's class, say) in errors; a mask file names itself."""
    for index, (image, mask) in enumerate(pairs):
        reference_mask(names[index] if names else str(image), load_image(image), mask)


def check_writable_folder(folder: str | Path, what: str) -> None:
    """Create ``folder`` and write a probe file in it; :class:`InputError` naming ``what`` (an option
    or setting) when that fails, so a run finds out before its work rather than after."""
    if not str(folder).strip():
        raise InputError(f"{what}: an empty name; give a folder")
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(folder / "write-check")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as err:
        raise InputError(f"{what} {folder}: cannot write there ({err.strerror or err})") from None


def overwritten_inputs(paths, inputs) -> list[str]:
    """Those of the files ``paths`` that are, links followed, one of the files ``inputs`` (sorted)."""
    given = {os.path.realpath(Path(path).expanduser()) for path in inputs}
    return sorted(str(path) for path in paths if os.path.realpath(Path(path).expanduser()) in given)


def check_output_files(paths, what: str, overwrite: bool, inputs=()) -> None:
    """Refuse, before any work, to write the files ``paths``: :class:`InputError` naming ``what``
    when one is a folder, one is among ``inputs`` (whatever ``overwrite`` says), one exists (a
    dangling link too) without ``overwrite``, or a folder they go in cannot be written."""
    paths = [Path(path).expanduser() for path in paths]
    clobbered = overwritten_inputs(paths, inputs)
    if clobbered:
        raise InputError(f"{what}: writing {clobbered[0]} would overwrite an input file; choose another {what}")
    existing = []
    for path in paths:
        if path.is_dir():
            raise InputError(f"{what}: {path} is a folder where an output file goes; move it away")
        if path.exists() or path.is_symlink():
            existing.append(str(path))
    for folder in dict.fromkeys(path.parent for path in paths):  # one probe a folder
        check_writable_folder(folder, what)
    if existing and not overwrite:
        raise InputError(f"{what}: {', '.join(existing)} already exist(s); pass --overwrite to replace, "
                         f"or choose another {what}")


WRITER_LOCK = ".insid3.lock"
"""The file of an output folder that the run writing there holds locked (its pid inside)."""


@contextlib.contextmanager
def writer_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s :data:`WRITER_LOCK` while a run writes there, so that two runs never
    merge into its ``annotations.json`` at once (each would drop the other's entries).

    Raises :class:`InputError` naming ``what`` (the option) and the holder's pid when another
    process holds it. A file system without locks (some network mounts) runs unlocked. The
    lock file stays (removing it would let a third run lock a file the second one no longer sees).
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        yield
        return
    path = Path(folder) / WRITER_LOCK
    try:  # not through a link: a planted one would have the run truncate the file it points to
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        raise InputError(f"{what} {folder}: cannot open its lock file {path.name} "
                         f"({'a link' if path.is_symlink() else err.strerror or err}); remove it") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise InputError(f"{what} {folder}: another insid3 run (pid {holder}) is writing there; wait for it "
                             f"to finish, or choose another {what}") from None
        except OSError:  # ENOLCK and the like: no locks on this file system
            pass
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)


def remove_stale_temporaries(folder: str | Path, names) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left beside ``names`` in ``folder`` when a
    process was killed; returns what was removed."""
    removed = []
    for name in names:
        for stale in Path(folder).glob(f".{glob.escape(name[:TEMPORARY_NAME_CHARS])}.*{TEMPORARY_SUFFIX}"):
            if not is_temporary_of(stale.name, name):
                continue  # a file of the user's that merely looks like one
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
                removed.append(stale)
    return removed


def write_json(path: str | Path, payload) -> None:
    """Write JSON atomically (UTF-8, indented)."""
    with atomic_write(path, "w") as stream:
        json.dump(payload, stream, indent=1)
