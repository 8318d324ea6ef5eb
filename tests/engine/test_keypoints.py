"""Keypoint transfer (``insid3_core.keypoints``) and ``insid3 match`` with the bundled tiny checkpoint.

The test image is a mosaic of 16x16 blocks of random colour noise, each block mirror-symmetric
left to right: the random-weight checkpoint tells the blocks apart, and a horizontal flip of the
whole image moves blocks without changing any of them, so the right answer is known exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from insid3_core import EngineConfig, InputError, Segmenter
from insid3_core.cli import main
from insid3_core.keypoints import best_matches, encode_points, load_points, match_points, to_grid

SIDE = 160  # image side = input size, a 10x10 patch grid
PATCH = 16
FAST = ["--image-size", str(SIDE), "--svd-components", "16", "--device", "cpu", "--batch-size", "2"]


@pytest.fixture(scope="module")
def segmenter(tiny_backbone):
    return Segmenter(tiny_backbone, EngineConfig(image_size=SIDE, svd_components=16), cache=False)


@pytest.fixture(scope="module")
def mosaic() -> np.ndarray:
    rng = np.random.default_rng(0)
    blocks = SIDE // PATCH
    half = rng.integers(0, 256, (blocks, PATCH, blocks, PATCH // 2, 3), dtype=np.uint8)
    return np.concatenate([half, half[:, :, :, ::-1]], axis=3).reshape(SIDE, SIDE, 3)


@pytest.fixture(scope="module")
def points() -> np.ndarray:
    return np.random.default_rng(1).uniform(0, SIDE - 1, (24, 2))


def errors(predicted: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return np.linalg.norm(predicted - expected, axis=1)


@pytest.mark.parametrize("debiased", [True, False])
def test_points_follow_a_flip_and_a_shift(segmenter, mosaic, points, debiased):
    reference = encode_points(segmenter.encoder, Image.fromarray(mosaic), points, debiased=debiased)
    flipped = Image.fromarray(np.ascontiguousarray(mosaic[:, ::-1]))
    shifted = Image.fromarray(np.roll(mosaic, (2 * PATCH, 3 * PATCH), axis=(0, 1)))
    flip, shift = match_points(segmenter.encoder, reference, [flipped, shifted], mutual=True)

    assert errors(flip.points, np.c_[SIDE - 1 - points[:, 0], points[:, 1]]).max() < PATCH
    assert errors(shift.points, (points + [3 * PATCH, 2 * PATCH]) % SIDE).max() < PATCH
    for match in (flip, shift):
        assert match.size == (SIDE, SIDE) and match.points.shape == (len(points), 2)
        assert match.mutual.all() and ((match.scores > 0.5) & (match.scores <= 1.0 + 1e-6)).all()


def test_points_map_back_to_the_targets_own_size_and_orientation(segmenter, mosaic, points, tmp_path):
    reference = encode_points(segmenter.encoder, Image.fromarray(mosaic), points)
    wide = Image.fromarray(mosaic).resize((2 * SIDE, 3 * SIDE // 2), Image.NEAREST)
    rotated = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed after a 90 degree clockwise turn
    Image.fromarray(np.ascontiguousarray(np.rot90(mosaic))).save(rotated, exif=exif)
    plain, stretched, oriented = match_points(segmenter.encoder, reference, [Image.fromarray(mosaic), wide, rotated])

    np.testing.assert_allclose(oriented.points, plain.points, atol=1e-4)
    assert oriented.size == (SIDE, SIDE) and stretched.size == (3 * SIDE // 2, 2 * SIDE)
    expected = (points + 0.5) * [2.0, 1.5] - 0.5
    offset = np.abs(stretched.points - expected)
    assert (offset[:, 0] < 2 * PATCH).all() and (offset[:, 1] < 1.5 * PATCH).all()
    assert plain.mutual is None


def test_one_backbone_call_per_batch(segmenter, mosaic, points):
    calls = []
    hook = segmenter.backbone.model.patch_embed.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        reference = encode_points(segmenter.encoder, Image.fromarray(mosaic), points)
        results = match_points(segmenter.encoder, reference, [Image.fromarray(mosaic)] * 5, batch_size=2, workers=0)
    finally:
        hook.remove()
    assert calls == [1, 2, 2, 1] and len(results) == 5


def test_matching_arguments_and_unreadable_targets_are_named(segmenter, mosaic, points, tiny_backbone, tmp_path):
    reference = encode_points(segmenter.encoder, Image.fromarray(mosaic), points)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        match_points(segmenter.encoder, reference, [Image.fromarray(mosaic)], batch_size=0)
    larger = Segmenter(tiny_backbone, EngineConfig(image_size=SIDE + 32, svd_components=16), cache=False)
    with pytest.raises(ValueError, match=f"points were encoded at {SIDE}px, this encoder runs at {SIDE + 32}px"):
        match_points(larger.encoder, reference, [Image.fromarray(mosaic)])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png: unreadable or truncated image"):
        match_points(segmenter.encoder, reference, [Image.fromarray(mosaic), tmp_path / "broken.png"], workers=0)


def test_soft_argmax_lands_between_two_equally_similar_patches():
    grid = (5, 5)
    features = torch.eye(25)[None]  # patch i is the unit vector e_i
    point = F.normalize(features[0, 12] + features[0, 13], dim=0)[None]  # patches (2, 2) and (2, 3)
    refined, scores, best = best_matches(point, features, grid, window=3, temperature=0.05)
    torch.testing.assert_close(refined[0, 0], torch.tensor([3.0, 2.5]), atol=1e-5, rtol=0)
    assert best.item() == 12 and scores.item() == pytest.approx(2**-0.5, abs=1e-6)
    centre, _, _ = best_matches(point, features, grid, window=1)
    torch.testing.assert_close(centre[0, 0], torch.tensor([2.5, 2.5]))
    corner, _, _ = best_matches(features[0, :1], features, grid, window=5)
    torch.testing.assert_close(corner[0, 0], torch.tensor([0.5, 0.5]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="odd"):
        best_matches(point, features, grid, window=2)


def test_grid_coordinates_follow_the_non_square_resize():
    pixels = torch.tensor([[0.0, 0.0], [319.0, 239.0], [159.5, 119.5]])
    grid = to_grid(pixels, (240, 320), (10, 10))
    torch.testing.assert_close(grid, torch.tensor([[0.5 / 32, 0.5 / 24], [10 - 0.5 / 32, 10 - 0.5 / 24], [5.0, 5.0]]))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a readable JSON"),
        ('{"x": 1, "y": 2}', "non-empty JSON list"),
        ("[]", "non-empty JSON list"),
        ("[[1, 2, 3]]", "point 0"),
        ('[[1, 2], {"name": "tail", "x": "3", "y": 4}]', "point 1"),
        ("[[1, NaN]]", "finite"),
        ("[[true, 2]]", "finite"),
        ('[{"name": "eye", "x": 1, "y": 2}, {"name": "eye", "x": 3, "y": 4}]', "repeat: eye"),
    ],
)
def test_bad_points_files_are_named(tmp_path, content, message):
    path = tmp_path / "points.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as error:
        load_points(path)
    assert str(path) in str(error.value)


def test_points_file_formats(tmp_path):
    path = tmp_path / "points.json"
    path.write_text('[[1, 2.5], {"name": "nose", "x": 3, "y": 4}]')
    names, points = load_points(path)
    assert names == ("0", "nose")
    np.testing.assert_array_equal(points, [[1.0, 2.5], [3.0, 4.0]])
    with pytest.raises(InputError, match="not found"):
        load_points(tmp_path / "missing.json")


def test_points_outside_the_reference_name_the_file(segmenter, mosaic):
    with pytest.raises(InputError, match=r"pts\.json: .*outside the reference image \(160x160.*nose \(160, 3\)"):
        encode_points(segmenter.encoder, Image.fromarray(mosaic), np.array([[3.0, 3.0], [160.0, 3.0]]), ["eye", "nose"],
                      source="pts.json")
    with pytest.raises(InputError, match=r"-0\.5, 3"):
        encode_points(segmenter.encoder, Image.fromarray(mosaic), np.array([[-0.5, 3.0]]))
    with pytest.raises(InputError, match="non-empty"):
        encode_points(segmenter.encoder, Image.fromarray(mosaic), np.zeros((0, 2)))


def test_match_command(tmp_path, mosaic, points, capsys):
    reference, flipped = tmp_path / "ref.png", tmp_path / "flipped.png"
    Image.fromarray(mosaic).save(reference)
    Image.fromarray(np.ascontiguousarray(mosaic[:, ::-1])).save(flipped)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    points_file = tmp_path / "points.json"
    points_file.write_text(json.dumps([{"name": f"p{i}", "x": x, "y": y} for i, (x, y) in enumerate(points[:4])]))
    out = tmp_path / "out" / "matches.json"

    code = main(["match", "--ref", str(reference), str(points_file), "--out", str(out), "--mutual", *FAST,
                 str(flipped), str(tmp_path / "broken.png")])
    assert code == 1
    error = capsys.readouterr().err
    assert "matched 1, failed 1" in error
    assert error.count("broken.png") == 1, "the failure names its file once"
    document = json.loads(out.read_text())
    assert document["features"] == "debiased" and document["smoke_test"] is True
    assert [p["name"] for p in document["reference"]["points"]] == ["p0", "p1", "p2", "p3"]
    (target,) = document["targets"]
    assert target["image"] == str(flipped) and (target["width"], target["height"]) == (SIDE, SIDE)
    predicted = np.array([[p["x"], p["y"]] for p in target["points"]])
    assert errors(predicted, np.c_[SIDE - 1 - points[:4, 0], points[:4, 1]]).max() < PATCH
    assert all(p["mutual"] is True and -1.0 <= p["score"] <= 1.0 for p in target["points"])
    assert document["failed"][0]["image"].endswith("broken.png")

    again = ["match", "--ref", str(reference), str(points_file), "--out", str(out), "--original-features", *FAST,
             str(flipped)]
    assert main(again) == 2 and "already exist" in capsys.readouterr().err  # an existing result is kept
    assert json.loads(out.read_text())["features"] == "debiased"
    assert main([*again, "--overwrite"]) == 0
    assert json.loads(out.read_text())["features"] == "original"
    points_copy = out.with_name("points_copy.json")
    points_copy.write_text(points_file.read_text())
    assert main(["match", "--ref", str(reference), str(points_copy), "--out", str(points_copy), "--overwrite",
                 *FAST, str(flipped)]) == 2  # never its own input, --overwrite or not
    assert "would overwrite an input file" in capsys.readouterr().err
    assert points_copy.read_text() == points_file.read_text()


def test_match_command_reports_bad_points(tmp_path, mosaic, capsys):
    reference = tmp_path / "ref.png"
    Image.fromarray(mosaic).save(reference)
    points_file = tmp_path / "points.json"
    points_file.write_text("[[10, 500]]")
    code = main(["match", "--ref", str(reference), str(points_file), "--out", str(tmp_path / "m.json"), *FAST,
                 str(reference)])
    assert code == 2
    error = capsys.readouterr().err
    assert f"{points_file}: point(s) outside the reference image" in error
    assert "SMOKE TEST" not in error, "told before the model loads"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["match", "--ref", str(broken), str(points_file), "--out", str(tmp_path / "m.json"), *FAST,
                 str(reference)]) == 2
    error = capsys.readouterr().err
    assert f"{broken}: unreadable or truncated image" in error and "SMOKE TEST" not in error


def test_match_takes_a_folder_holding_two_images_of_one_stem(tmp_path, mosaic, points, capsys):
    """``match`` writes one JSON file, no mask per target, yet it refused a folder holding
    ``a.png`` and ``a.jpg`` as if their masks would collide; both are matched now."""
    reference, folder = tmp_path / "ref.png", tmp_path / "targets"
    folder.mkdir()
    Image.fromarray(mosaic).save(reference)
    Image.fromarray(mosaic).save(folder / "a.png")
    Image.fromarray(np.ascontiguousarray(mosaic[:, ::-1])).save(folder / "a.jpg", quality=95)
    points_file = tmp_path / "points.json"
    points_file.write_text(json.dumps([{"name": "p0", "x": int(points[0, 0]), "y": int(points[0, 1])}]))
    out = tmp_path / "matches.json"

    assert main(["match", "--ref", str(reference), str(points_file), "--out", str(out), *FAST, str(folder)]) == 0
    assert [t["image"] for t in json.loads(out.read_text())["targets"]] == [str(folder / "a.jpg"), str(folder / "a.png")]
