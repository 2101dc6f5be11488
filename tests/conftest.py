"""Shared fixtures: real photo crops cut from the sample photos that ship in installed packages,
and an anchor fitted on them once per session."""
from __future__ import annotations

import glob

import numpy as np
import pytest
from PIL import Image

RUNNER = ["--runner", "FnApiRunner"]
# Hold out by file name, not by the whole path: pytest's temporary folders change from run to run,
# and the held-out count must not.
HOLD_OUT_BY_NAME = ["--calibration_group", r"([^/]+)$"]


def sample_photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}
    photos.update(zip(("china", "flower"), load_sample_images().images))
    return photos


def write_crops(folder, count_per_photo: int, size=(240, 256), seed: int = 0) -> list[str]:
    """Random crops of the sample photos, alternately PNG and high-quality JPEG."""
    rng = np.random.default_rng(seed)
    paths = []
    for name, photo in sample_photos().items():
        for i in range(count_per_photo):
            top = rng.integers(0, photo.shape[0] - size[0])
            left = rng.integers(0, photo.shape[1] - size[1])
            crop = Image.fromarray(photo[top:top + size[0], left:left + size[1]])
            path = folder / f"{name}_{i}.{'png' if i % 2 else 'jpg'}"
            crop.save(path, quality=95)
            paths.append(str(path))
    return paths


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


def read_parquet_rows(pattern: str) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted(glob.glob(pattern))
    assert files, f"no files match {pattern}"
    return pq.read_table(files).to_pylist()
