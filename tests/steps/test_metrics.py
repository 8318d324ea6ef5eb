"""Hand-checked cases of the evaluation scores in ``insid3_core.metrics``."""

from __future__ import annotations

import numpy as np
import pytest

from insid3_core.metrics import boundary_f_score, default_tolerance, mask_boundary, mask_iou, pck


def square(top: int, left: int, side: int, shape=(10, 10)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_boundary_is_the_inner_ring_and_not_the_image_border():
    ring = mask_boundary(square(3, 3, 4))
    assert ring.sum() == 12 and not ring[4:6, 4:6].any()
    assert not mask_boundary(np.ones((5, 5), dtype=bool)).any()
    assert mask_boundary(square(0, 0, 3, (5, 5))).sum() == 5  # only the sides facing the background


def test_square_shifted_by_one_pixel():
    truth, predicted = square(3, 3, 4), square(3, 4, 4)
    # the two rings share 3 pixels on the top row and 3 on the bottom row: 6 of 12 each
    assert boundary_f_score(predicted, truth, tolerance=0) == (0.5, 0.5, 0.5)
    assert boundary_f_score(predicted, truth, tolerance=1) == (1.0, 1.0, 1.0)


def test_inner_square_precise_but_incomplete():
    truth, predicted = square(3, 3, 4), square(4, 4, 2)
    assert boundary_f_score(predicted, truth, tolerance=0) == (0.0, 0.0, 0.0)
    # every predicted pixel is 1 px from the truth's ring; the ring's 4 corners are sqrt(2) px away
    score = boundary_f_score(predicted, truth, tolerance=1)
    assert score.precision == 1.0 and score.recall == pytest.approx(8 / 12)
    assert score.f == pytest.approx(2 * (8 / 12) / (1 + 8 / 12))
    assert boundary_f_score(predicted, truth, tolerance=1.5) == (1.0, 1.0, 1.0)


def test_empty_boundaries():
    empty, full = np.zeros((10, 10), dtype=bool), square(3, 3, 4)
    assert boundary_f_score(empty, empty) == (1.0, 1.0, 1.0)
    assert boundary_f_score(empty, full) == (0.0, 1.0, 0.0)
    assert boundary_f_score(full, empty) == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        boundary_f_score(full, full[:5])


def test_default_tolerance_is_davis():
    assert default_tolerance((400, 520)) == 6.0  # 0.008 * 656.0 = 5.25
    assert default_tolerance((3, 4)) == 1.0


def test_mask_iou():
    assert mask_iou(square(3, 3, 4), square(3, 4, 4)) == pytest.approx(12 / 20)
    assert mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def test_pck():
    truth = np.array([[0.0, 0.0], [10.0, 10.0], [50.0, 50.0], [0.0, 0.0]])
    predicted = truth + [[0.0, 0.0], [6.0, 8.0], [0.0, 10.1], [30.0, 40.0]]  # distances 0, 10, 10.1, 50
    assert pck(predicted, truth, extent=100.0) == 0.5  # within 10 px, 10 included
    assert pck(predicted, truth, extent=100.0, alpha=0.5) == 1.0
    assert pck(predicted, truth, extent=np.array([1.0, 100.0, 200.0, 100.0])) == 0.75  # 0.1, 10, 20, 10 px
    with pytest.raises(ValueError):
        pck(predicted[:, :1], truth[:, :1], 10.0)
    with pytest.raises(ValueError):
        pck(np.zeros((0, 2)), np.zeros((0, 2)), 10.0)
