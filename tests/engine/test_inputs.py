"""The files users really have, through the public API.

EXIF-rotated photos, greyscale/palette/RGBA/16-bit images, masks in every common encoding,
mismatched or empty masks, broken files, and the atomic writers. Every input is built in
``tmp_path`` with PIL.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from insid3_core import TEST_CHECKPOINT, EngineConfig, InputError, Segmenter, load_backbone, load_image, load_mask
from insid3_core.io import atomic_write, mask_array, write_mask_png

ORIENTATION = 0x0112
CLOCKWISE_QUARTER_TURNS = {6: -1, 8: 1}  # EXIF orientation -> np.rot90 k giving the displayed image


@pytest.fixture(scope="module")
def segmenter():
    """Tiny random-weight backbone at 128 px, positional basis not cached."""
    return Segmenter(load_backbone(TEST_CHECKPOINT, device="cpu"), EngineConfig(image_size=128, svd_components=16), cache=False)


def scene(height: int, width: int) -> np.ndarray:
    """A ``(height, width, 3)`` uint8 picture: colour ramps and a bright disk near the top left."""
    rows, columns = np.mgrid[:height, :width]
    disk = (rows - height // 3) ** 2 + (columns - width // 3) ** 2 < (min(height, width) // 4) ** 2
    return np.stack([columns * 255 // width, rows * 255 // height, np.where(disk, 255, 40)], axis=-1).astype(np.uint8)


def disk_mask(height: int, width: int) -> np.ndarray:
    """The disk of :func:`scene` as an 8-bit 0/255 mask."""
    return np.where(scene(height, width)[..., 2] == 255, 255, 0).astype(np.uint8)


def save(array: np.ndarray, path, **options):
    Image.fromarray(np.ascontiguousarray(array)).save(path, **options)


def exif_jpeg(path, pixels: np.ndarray, orientation: int):
    """Save ``pixels`` as a JPEG whose EXIF asks viewers to rotate it; return the stored pixels."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    save(pixels, path, exif=exif, quality=95)
    with Image.open(path) as stored:  # PIL does not apply the orientation by itself
        return np.asarray(stored.convert("RGB"))


# --- EXIF orientation ------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_jpeg_loads_as_displayed(tmp_path, orientation):
    stored = exif_jpeg(tmp_path / "photo.jpg", scene(64, 96), orientation)

    image = load_image(tmp_path / "photo.jpg")

    assert image.mode == "RGB"
    assert image.size == (64, 96)  # (width, height) once turned upright
    np.testing.assert_array_equal(np.asarray(image), np.rot90(stored, CLOCKWISE_QUARTER_TURNS[orientation]))


@pytest.mark.parametrize("orientation", [6, 8])
def test_reference_mask_of_an_exif_rotated_jpeg_is_in_displayed_orientation(segmenter, tmp_path, orientation):
    exif_jpeg(tmp_path / "photo.jpg", scene(64, 96), orientation)
    upright = np.rot90(disk_mask(64, 96), CLOCKWISE_QUARTER_TURNS[orientation])
    save(upright, tmp_path / "upright_mask.png")
    save(disk_mask(64, 96), tmp_path / "stored_mask.png")

    references = segmenter.encode({"object": [(tmp_path / "photo.jpg", tmp_path / "upright_mask.png")]})

    assert len(references["object"]) == 1
    assert references["object"].masks.any()
    with pytest.raises(InputError, match="96x64.*64x96") as error:
        segmenter.encode({"object": [(tmp_path / "photo.jpg", tmp_path / "stored_mask.png")]})
    assert "stored_mask.png" in str(error.value)


@pytest.mark.parametrize("orientation", [6, 8])
def test_segmenting_an_exif_rotated_jpeg_equals_segmenting_its_upright_pixels(segmenter, tmp_path, orientation):
    turns = CLOCKWISE_QUARTER_TURNS[orientation]
    stored = exif_jpeg(tmp_path / "photo.jpg", scene(64, 96), orientation)
    save(np.rot90(stored, turns), tmp_path / "upright.png")
    save(np.rot90(disk_mask(64, 96), turns), tmp_path / "mask.png")
    references = segmenter.encode({"object": [(tmp_path / "photo.jpg", tmp_path / "mask.png")]})

    rotated, upright = segmenter.segment(references, [tmp_path / "photo.jpg", tmp_path / "upright.png"])

    assert rotated.mask.shape == (96, 64)  # (H, W) as displayed
    assert rotated.mask.any()
    np.testing.assert_array_equal(rotated.mask, upright.mask)
    np.testing.assert_array_equal(rotated.classes["object"].lowres_mask, upright.classes["object"].lowres_mask)
    assert rotated.score == upright.score


# --- image modes -----------------------------------------------------------------------


def grey(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0]


IMAGE_MODES = {
    # name: (PIL image from the scene, expected RGB pixels after loading)
    "L": (lambda rgb: Image.fromarray(grey(rgb)), lambda rgb: np.repeat(grey(rgb)[..., None], 3, axis=2)),
    "RGBA": (
        lambda rgb: Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])),
        lambda rgb: rgb,
    ),
    "P": (
        lambda rgb: Image.fromarray(rgb).quantize(colors=16),
        lambda rgb: np.asarray(Image.fromarray(rgb).quantize(colors=16).convert("RGB")),
    ),
    "I;16": (
        lambda rgb: Image.fromarray(grey(rgb).astype(np.uint16) * 257),
        lambda rgb: np.repeat(grey(rgb)[..., None], 3, axis=2),
    ),
}


@pytest.mark.parametrize("mode", sorted(IMAGE_MODES))
def test_image_modes_load_as_rgb(tmp_path, mode):
    make, expected = IMAGE_MODES[mode]
    rgb = scene(40, 48)
    image = make(rgb)
    assert image.mode == mode
    image.save(tmp_path / "image.png")

    loaded = load_image(tmp_path / "image.png")

    assert loaded.mode == "RGB"
    assert loaded.size == (48, 40)
    np.testing.assert_array_equal(np.asarray(loaded), expected(rgb))


def test_sixteen_bit_values_are_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257, 32896, 65535], [200, 1000, 50000, 65000]], dtype=np.uint16)
    save(levels, tmp_path / "depth.png")

    loaded = np.asarray(load_image(tmp_path / "depth.png"))[..., 0]

    np.testing.assert_array_equal(loaded, [[0, 1, 128, 255], [0, 3, 194, 252]])


# --- mask encodings --------------------------------------------------------------------


def foreground() -> np.ndarray:
    """The ``(40, 48)`` boolean foreground every mask encoding below stores."""
    mask = np.zeros((40, 48), dtype=bool)
    mask[5:20, 10:30] = True
    mask[np.arange(40), np.arange(40)] = True
    return mask


def palette_image(indices: np.ndarray, colours: list[tuple[int, int, int]]) -> Image.Image:
    image = Image.frombytes("P", indices.shape[::-1], indices.astype(np.uint8).tobytes())
    image.putpalette([channel for colour in colours for channel in colour])
    return image


def with_alpha(colour: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Colour everywhere, opaque on the foreground and fully transparent elsewhere."""
    return np.dstack([colour, np.where(fg, 255, 0).astype(np.uint8)])


MASK_ENCODINGS = {
    # index 0 is white and index 1 black: palette masks compare indices, not colours
    "palette": lambda fg: palette_image(fg, [(255, 255, 255), (0, 0, 0)]),
    "zero-one": lambda fg: Image.fromarray(fg.astype(np.uint8)),
    "zero-255": lambda fg: Image.fromarray(np.where(fg, 255, 0).astype(np.uint8)),
    "one-bit": lambda fg: Image.fromarray(fg),
    "rgb": lambda fg: Image.fromarray(np.where(fg[..., None], [0, 128, 0], 0).astype(np.uint8)),
    "rgba": lambda fg: Image.fromarray(with_alpha(np.full((*fg.shape, 3), 255, np.uint8), fg)),
    "grey-alpha": lambda fg: Image.fromarray(with_alpha(np.full(fg.shape, 255, np.uint8), fg)),
    # black everywhere, the mask only in the alpha channel (read as empty before)
    "black-alpha": lambda fg: Image.fromarray(with_alpha(np.zeros((*fg.shape, 3), np.uint8), fg)),
    "black-grey-alpha": lambda fg: Image.fromarray(with_alpha(np.zeros(fg.shape, np.uint8), fg)),
    # white (no ink) object on black (full key ink), as print software saves it (read as empty before)
    "cmyk": lambda fg: Image.frombytes("CMYK", fg.shape[::-1], np.dstack(
        [np.zeros((*fg.shape, 3), np.uint8), np.where(fg, 0, 255).astype(np.uint8)]).tobytes()),
}


@pytest.mark.parametrize("encoding", sorted(MASK_ENCODINGS))
def test_mask_encodings_give_the_same_foreground(tmp_path, encoding):
    image = MASK_ENCODINGS[encoding](foreground())
    path = tmp_path / ("mask.tif" if image.mode == "CMYK" else "mask.png")  # PNG holds no CMYK
    image.save(path)

    mask = load_mask(path)

    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, foreground())
    np.testing.assert_array_equal(mask_array(image), foreground())  # an image given to the API


@pytest.mark.parametrize("alpha", [0, 255])
def test_a_black_mask_of_uniform_alpha_is_empty_not_whole(alpha):
    """The alpha-only reading applies where alpha varies: a black, fully opaque (or fully
    transparent) mask stays empty."""
    black = np.dstack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8), alpha, np.uint8)])
    assert not mask_array(black).any()


def test_load_mask_value_picks_one_class(tmp_path):
    classes = np.zeros((40, 48), dtype=np.uint8)
    classes[5:20, 10:30] = 1
    classes[25:35, 5:40] = 2
    palette_image(classes, [(0, 0, 0), (128, 0, 0), (0, 128, 0)]).save(tmp_path / "classes.png")

    np.testing.assert_array_equal(load_mask(tmp_path / "classes.png", value=2), classes == 2)
    np.testing.assert_array_equal(load_mask(tmp_path / "classes.png", value=1), classes == 1)
    np.testing.assert_array_equal(load_mask(tmp_path / "classes.png"), classes > 0)


@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 160), (200, 30, 0)], ids=["white", "navy", "red"])
def test_jpeg_mask_is_read_without_its_compression_rings(tmp_path, colour):
    stored = np.where(foreground()[..., None], colour, 0).astype(np.uint8)
    Image.fromarray(stored).save(tmp_path / "mask.jpg", quality=75)
    Image.fromarray(stored).convert("L").save(tmp_path / "grey.jpg", quality=75)

    for name in ("mask.jpg", "grey.jpg"):
        rings = np.asarray(Image.open(tmp_path / name)).reshape(40, 48, -1).max(axis=2) > 0
        assert (rings != foreground()).sum() > 100  # what `> 0` would take as the mask
        assert (load_mask(tmp_path / name) != foreground()).sum() <= 25


def test_jpeg_mask_cannot_give_class_values(tmp_path):
    from insid3_core.io import label_masks

    Image.fromarray(np.where(foreground(), 2, 0).astype(np.uint8)).save(tmp_path / "classes.jpg")

    for read in (lambda path: load_mask(path, value=2), label_masks):
        with pytest.raises(InputError, match=r"classes\.jpg: a JPEG mask cannot hold exact class values"):
            read(tmp_path / "classes.jpg")


@pytest.mark.parametrize("size", [(80, 96), (1500, 1500)], ids=["small", "sampled"])
def test_photograph_given_as_mask_is_refused(tmp_path, size):
    photo = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    save(photo, tmp_path / "photo.png")
    few_colours = np.where(foreground()[..., None], [[10, 200, 30]], [[0, 0, 0]]).astype(np.uint8)
    few_colours[:5] = np.arange(48 * 5 * 3).reshape(5, 48, 3) % 256  # 240 colours: still a mask
    save(few_colours, tmp_path / "colours.png")
    opaque = np.dstack([photo, np.full(size, 255, np.uint8)])
    save(opaque, tmp_path / "opaque.png")
    cut_out = opaque.copy()
    cut_out[: size[0] // 2, ..., 3] = 0  # the top half transparent: the alpha is the mask
    save(cut_out, tmp_path / "cut_out.png")

    for name in ("photo.png", "opaque.png"):
        with pytest.raises(InputError, match=rf"{name}: more than 4096 distinct colours: a photograph, not a mask"):
            load_mask(tmp_path / name)
    assert load_mask(tmp_path / "colours.png")[20:].tolist() == foreground()[20:].tolist()
    assert load_mask(tmp_path / "cut_out.png").tolist() == ((cut_out[..., 3] > 0) & (photo.max(axis=2) > 0)).tolist()


# --- reference masks that cannot be used -----------------------------------------------


def test_mask_of_another_size_names_both_sizes_and_the_file(segmenter, tmp_path):
    save(scene(40, 48), tmp_path / "image.png")
    save(np.full((30, 50), 255, np.uint8), tmp_path / "wrong_size_mask.png")

    with pytest.raises(InputError) as error:
        segmenter.encode({"object": [(tmp_path / "image.png", tmp_path / "wrong_size_mask.png")]})

    message = str(error.value)
    assert "50x30" in message and "48x40" in message
    assert "wrong_size_mask.png" in message


def test_empty_reference_mask_is_an_input_error(segmenter, tmp_path):
    save(scene(40, 48), tmp_path / "image.png")
    save(np.zeros((40, 48), np.uint8), tmp_path / "blank_mask.png")

    with pytest.raises(InputError, match="empty") as error:
        segmenter.encode({"object": [(tmp_path / "image.png", tmp_path / "blank_mask.png")]})

    assert "blank_mask.png" in str(error.value)


def test_tiny_reference_object_in_a_large_image_is_not_a_crash(segmenter, tmp_path):
    # a 1-pixel object that the nearest resize to 128 px skips (it samples every 4th pixel)
    save(scene(512, 512), tmp_path / "large.png")
    mask = np.zeros((512, 512), np.uint8)
    mask[1, 1] = 255
    save(mask, tmp_path / "speck_mask.png")

    try:
        references = segmenter.encode({"object": [(tmp_path / "large.png", tmp_path / "speck_mask.png")]})
    except InputError as error:
        assert "speck_mask.png" in str(error)
    else:
        assert int(references["object"].masks.sum()) == 1


# --- broken files ----------------------------------------------------------------------


def random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(2048))


def truncated(fmt: str):
    def write(path):
        save(scene(64, 64), path, format=fmt)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return write


@pytest.mark.parametrize(
    ("name", "write"),
    [("noise.png", random_bytes), ("half.png", truncated("PNG")), ("half.jpg", truncated("JPEG"))],
    ids=["random-bytes", "truncated-png", "truncated-jpeg"],
)
def test_unreadable_image_is_an_input_error_naming_the_file(tmp_path, name, write):
    write(tmp_path / name)

    with pytest.raises(InputError, match=name):
        load_image(tmp_path / name)


def test_an_image_too_large_to_decode_safely_says_so(tmp_path):
    """A 20000x20000 PNG header (400 megapixels) over one real pixel: refused before decoding."""
    Image.new("L", (1, 1)).save(tmp_path / "huge.png")
    data = bytearray((tmp_path / "huge.png").read_bytes())
    data[16:24] = struct.pack(">II", 20000, 20000)  # IHDR width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    (tmp_path / "huge.png").write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"huge.png: more pixels than decode safely \(Image size \(400000000 "
                                         r"pixels\) exceeds limit of \d+ pixels; PIL's decompression-bomb guard\)"):
        load_image(tmp_path / "huge.png")


def test_missing_image_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="absent.png: file not found"):
        load_image(tmp_path / "absent.png")


# --- writing outputs -------------------------------------------------------------------


def test_write_mask_png_writes_an_8_bit_0_255_mask(tmp_path):
    write_mask_png(tmp_path / "out" / "mask.png", foreground())

    with Image.open(tmp_path / "out" / "mask.png") as written:
        assert (written.format, written.mode, written.size) == ("PNG", "L", (48, 40))
        pixels = np.asarray(written)
    np.testing.assert_array_equal(pixels, np.where(foreground(), 255, 0))
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["mask.png"]


def test_atomic_write_leaves_nothing_behind_when_the_body_raises(tmp_path):
    (tmp_path / "kept.txt").write_text("old")

    for name in ("new.txt", "kept.txt"):
        with pytest.raises(RuntimeError, match="interrupted"):
            with atomic_write(tmp_path / name, "w") as stream:
                stream.write("partial")
                raise RuntimeError("interrupted")

    assert sorted(path.name for path in tmp_path.iterdir()) == ["kept.txt"]
    assert (tmp_path / "kept.txt").read_text() == "old"


def test_text_outputs_are_utf8_and_hold_file_names_that_are_not(tmp_path):
    """A file name of bytes that are not UTF-8 reads back with lone surrogates ('r\\udcff.png'):
    reports naming it are still written, with the escape."""
    with atomic_write(tmp_path / "report.md", "w") as stream:
        stream.write("é r\udcff.png")
    assert (tmp_path / "report.md").read_bytes() == "é r\\udcff.png".encode()
