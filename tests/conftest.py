"""Fixtures shared by the test modules: real photo crops and an anchor fitted on them once per
session; every test runs behind a guard that refuses connections outside loopback."""

from __future__ import annotations

import os

# Read by google-auth when it is imported: never probe the cloud metadata server (link-local).
os.environ["NO_GCE_CHECK"] = "true"

import pytest

from anchorscan.anchors.threads import limit_blas_threads
from helpers import HOLD_OUT_BY_NAME, RUNNER, write_crops
from servers import LoopbackGuard

limit_blas_threads()  # as every command does (anchors/threads.py), also for the tests' own fits

_guard = LoopbackGuard()


@pytest.fixture(scope="session", autouse=True)
def loopback_guard():
    _guard.install()
    yield _guard
    _guard.uninstall()


@pytest.fixture(autouse=True)
def nothing_leaves_loopback(loopback_guard):
    """Fails a test in which anything tried to connect outside loopback, even if the code
    under test turned the refusal into an error row."""
    loopback_guard.refused.clear()
    yield
    refused, loopback_guard.refused[:] = list(loopback_guard.refused), []
    assert not refused, f"connections outside loopback were attempted: {refused}"


@pytest.fixture(scope="session")
def real_photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    write_crops(folder, count_per_photo=6)
    return folder


@pytest.fixture(scope="session")
def fitted_anchor(real_photos, tmp_path_factory):
    from anchorscan.pipelines import fit

    anchor = tmp_path_factory.mktemp("anchor") / "anchor.safetensors"
    summary = fit.run(
        [
            "--input",
            str(real_photos),
            "--anchor",
            str(anchor),
            "--calibration_fraction",
            "0.3",
            *HOLD_OUT_BY_NAME,
            *RUNNER,
        ]
    )
    return anchor, summary


def pytest_collection_modifyitems(items):
    """Tests that run the backbone through a pipeline take seconds each: they are `slow`, and
    `make test-fast` leaves them out (`make test` and CI run everything)."""
    for item in items:
        if {"fitted_anchor", "real_photos"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
