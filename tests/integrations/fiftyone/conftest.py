"""Fixtures of the FiftyOne tests."""

from __future__ import annotations

import pytest
from data import EXAMPLE_REFERENCE as REFERENCE, EXAMPLE_TARGETS as TARGETS


@pytest.fixture
def dataset(fo):
    """The reference (mask file, tagged ``reference``) and the 8 example targets (modules with
    other samples define their own)."""
    samples = [fo.Sample(filepath=str(REFERENCE[0]), tags=["reference"],
                         ground_truth=fo.Segmentation(mask_path=str(REFERENCE[1])))]
    samples += [fo.Sample(filepath=str(target)) for target in TARGETS]
    collection = fo.Dataset()
    collection.add_samples(samples)
    yield collection
    collection.delete()
