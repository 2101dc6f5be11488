"""What several test modules share: real photo crops cut from the sample photos that ship in
installed packages, the runner flags, a synthetic feature spec and a Parquet reader that does
not go through the product's own."""

from __future__ import annotations

import dataclasses
import glob

import numpy as np
from PIL import Image

from anchorscan.anchors.anchor import Anchor, AnchorConfig
from anchorscan.anchors.forensic import ForensicModel
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.anchors.stats import Moments

RUNNER = ["--runner", "FnApiRunner"]
# Hold out by file name, not by the whole path: pytest's temporary folders change from run to run,
# and the held-out count must not.
HOLD_OUT_BY_NAME = ["--calibration_group", r"([^/]+)$"]


D_FORENSIC = 3  # synthetic forensic columns


def synthetic_spec(
    d_semantic: int, d_statistical: int, d_forensic: int = D_FORENSIC, **changes
) -> FeatureSpec:
    """The spec of made-up features, for the maths and file-format tests."""
    base = FeatureSpec(
        "synthetic",
        "0" * 64,
        {"crop": 224},
        {"d_semantic": d_semantic, "d_statistical": d_statistical, "d_forensic": d_forensic},
    )
    return dataclasses.replace(base, **changes)


def with_forensic(rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """Backbone-part rows with D_FORENSIC standard normal forensic columns after them."""
    noise = np.random.default_rng(seed + 1000).normal(size=(len(rows), D_FORENSIC))
    return np.hstack([rows, noise])


def fit_synthetic_anchor(
    spec: FeatureSpec, rows: np.ndarray, n_fit: int, config: AnchorConfig = AnchorConfig()
) -> Anchor:
    """An anchor fitted in memory on rows[:n_fit] (full width), calibrated on the rest; the
    forensic channel with its sharp level only."""
    fitted = rows[:n_fit]
    forensic = ForensicModel(("sharp",), [Moments.of(fitted[:, spec.d_backbone :])])
    return Anchor.fit(spec, Moments.of(fitted[:, : spec.d_backbone]), forensic, rows[n_fit:], config)


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
            crop = Image.fromarray(photo[top : top + size[0], left : left + size[1]])
            path = folder / f"{name}_{i}.{'png' if i % 2 else 'jpg'}"
            crop.save(path, quality=95)
            paths.append(str(path))
    return paths


def read_parquet_rows(pattern: str) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted(glob.glob(pattern))
    assert files, f"no files match {pattern}"
    return pq.read_table(files).to_pylist()


def decode_that_sleeps(data: bytes) -> tuple[int, float, float]:
    """A stand-in decoder for the decoder pool's tests: sleeps as many tenths of a second as the
    first byte says, then returns (its pid, start, end); b"crash" kills its process."""
    import os
    import signal
    import time

    if data == b"crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    started = time.time()
    time.sleep(data[0] / 10)
    return os.getpid(), started, time.time()


def decode_that_leaves_a_thread(data: bytes) -> int:
    """A stand-in decoder that returns its pid but leaves a thread waiting forever behind it,
    as a metadata read past its deadline does."""
    import os
    import threading

    threading.Thread(target=threading.Event().wait, daemon=True).start()
    return os.getpid()


# --- updates, flags and federation in memory (docs/METHOD.md §9) ---------------------------------

LEVELS = ("sharp", "blur0.4")  # two forensic levels: rows carry both side by side, as fit's do


def leveled_rows(rows: np.ndarray, spec: FeatureSpec, seed: int = 0) -> np.ndarray:
    """Scoring rows (spec.dim wide) with a second, softer forensic level appended."""
    soft = rows[:, spec.d_backbone :] * 0.7 + np.random.default_rng(seed).normal(
        scale=0.1, size=(len(rows), spec.d_forensic)
    )
    return np.hstack([rows, soft])


def fit_by_hash(
    spec: FeatureSpec, uris: list[str], rows: np.ndarray, config: AnchorConfig = AnchorConfig()
) -> Anchor:
    """What `fit` computes, in memory: hold out by the URI hash rule, merge the rest's
    statistics, calibrate on the held-out images (rows as ``leveled_rows`` makes them)."""
    from anchorscan.anchors.calibration import holds_out, uri_key

    held = np.array([holds_out(uri, config.calibration_fraction, config.calibration_group) for uri in uris])
    fitted = rows[~held]
    levels = level_moments(fitted, spec)
    forensic = ForensicModel(LEVELS, [levels[f"forensic.{name}"] for name in LEVELS])
    keys = np.array([uri_key(uri) for uri, h in zip(uris, held) if h], dtype=np.uint64)
    return Anchor.fit(
        spec,
        Moments.of(fitted[:, : spec.d_backbone]),
        forensic,
        rows[held][:, : spec.dim],
        config,
        calibration_keys=keys,
    )


def update_by_hash(anchor: Anchor, uris: list[str], rows: np.ndarray, forgetting: float = 1.0) -> Anchor:
    """What `update --trusted` computes, in memory: the fit's hold-out rule, the merge."""
    from anchorscan.anchors.calibration import CalibrationRows, holds_out, uri_key
    from anchorscan.anchors.statistics import Statistics
    from anchorscan.anchors.updating import updated

    config = anchor.config
    held = np.array([holds_out(uri, config.calibration_fraction, config.calibration_group) for uri in uris])
    fitted = rows[~held]
    d = anchor.spec.d_backbone
    held_out = CalibrationRows(
        [uri_key(uri) for uri, h in zip(uris, held) if h], rows[held][:, : anchor.spec.dim]
    )
    additions = {"backbone": Moments.of(fitted[:, :d]), **level_moments(fitted, anchor.spec)}
    return updated(anchor, Statistics(additions, held_out), forgetting, trusted=True)


def guarded_update(anchor: Anchor, rows: np.ndarray, admit: str | None = None):
    """What `update` computes for untrusted images, in memory: (the updated anchor, or None
    where the round is refused; the round test)."""
    from anchorscan.anchors.statistics import Statistics
    from anchorscan.anchors.updating import admission, admission_threshold, round_test, updated

    threshold = admission_threshold(anchor.config, *([admit] if admit else []))
    keep, near, _ = admission(anchor, rows, threshold)
    test = round_test(int(keep.sum()), int(near.sum()), anchor, threshold)
    if test.refused:
        return None, test
    kept = rows[keep]
    additions = {
        "backbone": Moments.of(kept[:, : anchor.spec.d_backbone]),
        **level_moments(kept, anchor.spec),
    }
    return updated(anchor, Statistics(additions, None), trusted=False), test


def level_moments(rows: np.ndarray, spec: FeatureSpec) -> dict[str, Moments]:
    """``forensic.<level>`` moments of rows with every level side by side (as fit's are)."""
    start, width = spec.d_backbone, spec.d_forensic
    return {
        f"forensic.{name}": Moments.of(rows[:, start + j * width : start + (j + 1) * width])
        for j, name in enumerate(LEVELS)
    }


def listed(items) -> list[tuple[str, object]]:
    """A listing's ('unit', Unit) items as ('uri', uri), its ('error', row) items as they are."""
    return [("uri", value.uri) if kind == "unit" else (kind, value) for kind, value in items]
