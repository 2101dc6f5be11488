"""Detection through the command line on the bundled demo images: an anchor fitted on real
photos only finds the upscalers' images, keeps its false-positive rate on unseen real photos,
and does not call soft real photos (focus blur, camera shake, upscaled thumbnails, denoising)
generated. Bounds are loose (23 real crops per condition: one image is 4.3 %); the measured
tables on the larger development set are in docs/QUALITY.md and the README."""

from __future__ import annotations

import collections
import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from anchorscan.anchors.images.perturbations import parse_perturbation
from anchorscan.pipelines import fit, score
from helpers import RUNNER, read_parquet_rows

pytestmark = pytest.mark.slow  # fits an anchor on 184 real crops and scores a few hundred

DEMO = Path(__file__).parents[1] / "demo" / "data"
SOFT = (
    "blur:0.45",
    "blur:0.8",
    "blur:1.2",
    "defocus:1.5",
    "defocus:2.5",
    "motion:5",
    "motion:9",
    "thumbnail:0.625",
    "thumbnail:0.5",
    "median:3",
    "nlmeans",
)


@pytest.fixture(scope="module")
def demo_anchor(tmp_path_factory):
    anchor = tmp_path_factory.mktemp("demo") / "anchor.safetensors"
    fit.run(
        [
            "--input",
            str(DEMO / "fit" / "real"),
            "--input",
            str(DEMO / "fit" / "extra"),
            "--anchor",
            str(anchor),
            "--calibration_fraction",
            "0.25",
            "--calibration_group",
            r"([^/]+)__x",
            *RUNNER,
        ]
    )
    return anchor


def scanned(anchor, inputs, prefix) -> list[dict]:
    score.run(["--input", *inputs, "--anchor", str(anchor), "--output", str(prefix), *RUNNER])
    return read_parquet_rows(f"{prefix}-scores-*.parquet")


def test_the_upscalers_images_are_found_and_real_photos_are_not(demo_anchor, tmp_path):
    rows = scanned(demo_anchor, [str(DEMO / "scan" / "manifest.csv")], tmp_path / "scan")
    with open(DEMO / "scan" / "manifest.csv", newline="") as handle:
        generator = {str(DEMO / "scan" / row["uri"]): row["generator"] for row in csv.DictReader(handle)}
    by_class = collections.defaultdict(list)
    for row in rows:
        by_class[generator[row["uri"]]].append(row)
    real = [row["score"] for row in by_class["real"]]
    assert np.mean([row["is_suspect"] for row in by_class["real"]]) <= 0.1
    for name, bound in (("bicubic", 0.9), ("realcugan", 0.75), ("waifu2x", 0.9)):
        fake = [row["score"] for row in by_class[name]]
        auroc = roc_auc_score(np.r_[np.zeros(len(real)), np.ones(len(fake))], np.r_[real, fake])
        assert auroc >= bound, (name, auroc)
    for row in rows:
        assert 0 < row["p_forensic"] <= 1 and row["forensic"] >= 0 and row["softness"]


def soften(image: Image.Image, condition: str) -> Image.Image:
    if condition == "nlmeans":  # sensor noise, then non-local-means denoising
        from skimage.restoration import denoise_nl_means

        rng = np.random.default_rng(0)
        noisy = np.asarray(image, dtype=np.float64) / 255 + rng.normal(
            scale=4 / 255, size=(*image.size[::-1], 3)
        )
        clean = denoise_nl_means(noisy.clip(0, 1), h=0.8 * 4 / 255, sigma=4 / 255, channel_axis=-1)
        return Image.fromarray((clean * 255).round().clip(0, 255).astype(np.uint8))
    return parse_perturbation(condition)(image)


def test_soft_real_photos_are_not_called_generated(demo_anchor, tmp_path):
    reals = sorted((DEMO / "scan" / "real").glob("*.png"))
    for condition in SOFT:
        folder = tmp_path / "soft" / condition.replace(":", "")
        folder.mkdir(parents=True)
        for path in reals:
            soften(Image.open(path).convert("RGB"), condition).save(folder / path.name)
    rows = scanned(demo_anchor, [str(tmp_path / "soft")], tmp_path / "scores")
    flagged, softness = collections.defaultdict(list), collections.defaultdict(collections.Counter)
    for row in rows:
        condition = Path(row["uri"]).parent.name
        flagged[condition].append(row["is_suspect"])
        softness[condition][row["softness"]] += 1
    assert len(flagged) == len(SOFT) and all(len(v) == len(reals) for v in flagged.values())
    rates = {condition: np.mean(values) for condition, values in flagged.items()}
    assert np.mean(list(rates.values())) <= 0.10, rates  # issue #14's bar, at --fpr 0.01
    # a 2x-upscaled thumbnail is reported as an upscale, strong blurs as blurs
    assert softness["thumbnail0.5"].most_common(1)[0][0].startswith("upscale")
    assert softness["blur1.2"].most_common(1)[0][0].startswith("blur")
