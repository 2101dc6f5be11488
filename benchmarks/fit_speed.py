"""Fit against score on the same images, at steady state, and where fit's time goes.

    python benchmarks/fit_speed.py [--quick] [--images N] [--softened_images N] [--workdir DIR]

Generates a deterministic corpus of web-sized pictures (0.3 and 2 megapixel JPEGs and 1 MP
PNGs, photo content from scikit-image and scikit-learn), fits an anchor on a smaller and on the
whole set and scores both, each run in a fresh process, and prints the steady-state rates (the
images the larger run adds over the seconds it adds: start-up excluded) and their ratio. The
whole set crosses the softening sample (fit's --softened_images), so its anchor's softened
levels are sampled; a second anchor fitted on it with every image softened scores the same
images, and the two are compared (docs/METHOD.md §8.3 states the tolerance). Then,
in this process, the per-image cost of what fit does beside the forward pass (the forensic
features of the crop and of its softened copies, the softening itself), and the softening's
Gaussian blur as a matrix product against the one-channel convolution it replaced. NAME=VALUE
lines last.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from throughput import in_fresh_process, marginal_rate, photo_picture, sample_photos, timed_pipeline

from anchorscan.anchors.models import forensic
from anchorscan.anchors.models.features import BackboneConfig
from anchorscan.anchors.softness import softened
from anchorscan.transforms.inference import SOFTENED_IMAGES

WEB_MIX = ("0.3mp", "2mp", "0.3mp", "png", "0.3mp", "2mp", "0.3mp", "0.3mp", "2mp", "0.3mp")
TARGET = 0.5  # fit's steady state at least half of score's (issue #21)


def write_corpus(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    photos, paths = sample_photos(), []
    for index in range(count):
        kind = WEB_MIX[index % len(WEB_MIX)]
        path = folder / f"{index:05d}_{kind}.{'png' if kind == 'png' else 'jpg'}"
        if not path.exists():
            picture = photo_picture(photos[index % len(photos)], kind, np.random.default_rng(index))
            Image.fromarray(picture).save(path, format="PNG" if kind == "png" else "JPEG", quality=90)
        paths.append(path)
    return paths


def pipeline_runs(workdir: Path, small: int, large: int, sample: int) -> dict:
    paths = write_corpus(workdir / "corpus", large)
    for name, count in (("small", small), ("large", large)):
        (workdir / f"{name}.txt").write_text("".join(f"{path}\n" for path in paths[:count]))
    runner = ["--runner", "FnApiRunner"]
    runs = {}
    fits = (("small", "small", sample), ("large", "large", sample), ("large_unsampled", "large", large))
    for anchor_name, images, softened_images in fits:
        runs[f"fit_{anchor_name}"] = in_fresh_process(
            timed_pipeline,
            "fit",
            [
                "--input",
                str(workdir / f"{images}.txt"),
                "--anchor",
                str(workdir / f"{anchor_name}.safetensors"),
                "--softened_images",
                str(softened_images),
                *runner,
            ],
        )
    scores = (
        ("small", "small", "large"),
        ("large", "large", "large"),
        ("unsampled", "large", "large_unsampled"),
    )
    for name, images, anchor_name in scores:
        runs[f"score_{name}"] = in_fresh_process(
            timed_pipeline,
            "score",
            [
                "--input",
                str(workdir / f"{images}.txt"),
                "--anchor",
                str(workdir / f"{anchor_name}.safetensors"),
                "--output",
                str(workdir / "out" / name),
                "--overwrite",
                *runner,
            ],
        )
    return runs


def sampled_against_unsampled(workdir: Path) -> dict:
    """The large set scored by its sampled anchor and by the one fitted with every image softened:
    the forensic p-values' median and largest absolute difference, and each anchor's flagged share."""
    import pyarrow.parquet as pq

    tables = {
        name: {
            row["uri"]: row
            for row in pq.read_table(sorted((workdir / "out").glob(f"{name}-scores-*.parquet"))).to_pylist()
        }
        for name in ("large", "unsampled")
    }
    uris = sorted(tables["large"])
    difference = np.abs(
        [tables["large"][uri]["p_forensic"] - tables["unsampled"][uri]["p_forensic"] for uri in uris]
    )
    return {
        "sampled_vs_unsampled_p_forensic_median_abs_difference": float(np.median(difference)),
        "sampled_vs_unsampled_p_forensic_max_abs_difference": float(difference.max()),
        "sampled_flagged_share": float(np.mean([tables["large"][uri]["is_suspect"] for uri in uris])),
        "unsampled_flagged_share": float(np.mean([tables["unsampled"][uri]["is_suspect"] for uri in uris])),
    }


def per_image_ms(step, batch: torch.Tensor, repeats: int) -> float:
    step()  # warm-up: caches, thread pools
    started = time.process_time()
    for _ in range(repeats):
        step()
    return (time.process_time() - started) / repeats / len(batch) * 1000


def convolution_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """The softening blur before the matrix product, for the comparison in the same run."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps /= taps.sum()
    height, width = pixels.shape[1:3]
    x = pixels.permute(0, 3, 1, 2).float().reshape(-1, 1, height, width)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), taps.view(1, 1, -1, 1))
    return x.reshape(-1, 3, height, width).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def where_fit_time_goes(repeats: int) -> dict:
    torch.set_num_threads(1)  # the forensic pass runs on one thread (features.py)
    extractor = BackboneConfig("efficientnet-lite0").build()
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 224, 224, 3), dtype=np.uint8))
    levels = softened("softness_path")
    blurs = [how[1] for how in levels if how[0] == "blur"]
    costs = {
        "forward": per_image_ms(lambda: extractor.backbone_features(batch), batch, repeats),
        "forensic_sharp": per_image_ms(lambda: extractor.forensic_features(batch), batch, repeats),
        "forensic_all_levels": per_image_ms(
            lambda: extractor.forensic_features(batch, levels), batch, repeats
        ),
        "softening": per_image_ms(lambda: [forensic.soften(batch, how) for how in levels], batch, repeats),
        "blur_matrix": per_image_ms(
            lambda: [forensic.gaussian_blur(batch, s) for s in blurs], batch, repeats
        ),
        "blur_convolution": per_image_ms(lambda: [convolution_blur(batch, s) for s in blurs], batch, repeats),
    }
    return costs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts, for development")
    parser.add_argument("--images", type=int, help="images of the larger run (2,500; quick 100)")
    parser.add_argument(
        "--softened_images",
        type=int,
        help=f"fit's softening sample ({SOFTENED_IMAGES}; quick 30): the larger run crosses it",
    )
    parser.add_argument("--workdir", help="corpus and outputs (default: a temporary directory)")
    args = parser.parse_args(argv)
    large = args.images or (100 if args.quick else 2500)
    small = max(large // 5, 40)  # enough for the hold-out's minimum of real images
    sample = args.softened_images or (30 if args.quick else SOFTENED_IMAGES)
    if large <= sample:
        parser.error(f"--images {large} must exceed the softening sample {sample}: the run must cross it")
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        runs = pipeline_runs(workdir, small, large, sample)
        sampling = sampled_against_unsampled(workdir)
        costs = where_fit_time_goes(1 if args.quick else 5)
    fit_rate = marginal_rate(
        runs["fit_small"]["images"],
        runs["fit_small"]["seconds"],
        runs["fit_large"]["images"],
        runs["fit_large"]["seconds"],
    )
    score_rate = marginal_rate(
        runs["score_small"]["images"],
        runs["score_small"]["seconds"],
        runs["score_large"]["images"],
        runs["score_large"]["seconds"],
    )
    ratio = fit_rate / score_rate if score_rate else float("nan")
    print(f"{'run':14} {'images':>7} {'seconds':>8} {'images/s':>9}")
    for name, run in runs.items():
        print(f"{name:14} {run['images']:7d} {run['seconds']:8.1f} {run['images_per_s']:9.1f}")
    breakdown = ", ".join(f"{name} {value:.1f}" for name, value in costs.items())
    print(f"\ncore-ms per image (batch of 16, one thread): {breakdown}")
    print(f"softness levels simulated on about {sample} images of a fit (all of a smaller one)")
    met = "met" if ratio >= TARGET else "not met"
    print(f"target: fit's steady state >= {TARGET} of score's: {ratio:.2f} ({met})\n")
    values = {
        "fit_steady_state_images_per_s": fit_rate,
        "score_steady_state_images_per_s": score_rate,
        "fit_steady_state_over_score": ratio,
        **{f"{name}_ms_per_image": value for name, value in costs.items()},
        "blur_convolution_over_matrix": costs["blur_convolution"] / costs["blur_matrix"],
        **sampling,
    }
    for name, value in values.items():
        print(f"{name}={value:.3g}")


if __name__ == "__main__":
    main()
