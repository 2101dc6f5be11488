"""Fixtures shared by the test modules: real photo crops and an anchor fitted on them once per
session."""
from __future__ import annotations

import pytest

from helpers import HOLD_OUT_BY_NAME, RUNNER, write_crops


@pytest.fixture(scope="session")
def real_photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    write_crops(folder, count_per_photo=6)
    return folder


@pytest.fixture(scope="session")
def fitted_anchor(real_photos, tmp_path_factory):
    from anchorscan.pipelines import fit

    anchor = tmp_path_factory.mktemp("anchor") / "anchor.safetensors"
    summary = fit.run(["--input", str(real_photos), "--anchor", str(anchor),
                       "--calibration_fraction", "0.3", *HOLD_OUT_BY_NAME, *RUNNER])
    return anchor, summary


def pytest_collection_modifyitems(items):
    """Tests that run the backbone through a pipeline take seconds each: they are `slow`, and
    `make test-fast` leaves them out (`make test` and CI run everything)."""
    for item in items:
        if {"fitted_anchor", "real_photos"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
