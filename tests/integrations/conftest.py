"""Fixtures of the integration tests: one private FiftyOne for the whole session."""

from __future__ import annotations

from importlib.util import find_spec

import pytest


@pytest.fixture(scope="session")
def fo(tmp_path_factory):
    """The ``fiftyone`` module, imported after :func:`fiftyone_setup.start_fiftyone` pointed it at
    a MongoDB, configs and a plugins folder of this session (with the plugin installed)."""
    if find_spec("fiftyone") is None:
        pytest.skip("needs the fiftyone extra")
    from fiftyone_setup import start_fiftyone, stop_fiftyone

    started = start_fiftyone(tmp_path_factory.mktemp("fiftyone"))
    try:
        import fiftyone

        yield fiftyone
    finally:
        stop_fiftyone(**started)
