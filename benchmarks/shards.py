"""Shards against folders, and the memory of scanning one large shard, on this machine.

    python benchmarks/shards.py [--quick] [--images N] [--shard_mb MB] [--workdir DIR]

``shard_over_folder``: the same JPEGs scanned from tar shards and from a folder of files in one
run, through the chain's List -> Read -> Decode steps on the local runner (the embed step that
follows costs the same per image either way), as images/s from shards over images/s from the
folder; ``shard_over_folder_read``: the same for List -> Read alone, where the two differ.
Each is the best of two alternating passes over files the first pass left in the page cache.

``rss_large_shard_mb`` / ``rss_small_shard_mb``: the peak RSS of a process that scans one shard
of ``--shard_mb`` MB (1 GB by default: the corpus's JPEGs over and over) and one of 16 MB
through the same steps: flat when no shard is held. ``rss_large_shard_spread_mb``: the large
shard with its samples redistributed (the Reshuffle that distributed runners get), which Beam's
local runner holds in memory whole: why it is off locally. Prints ``NAME=VALUE`` lines last.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PER_SHARD = 1000
SMALL_SHARD_MB = 16


def _photos() -> list[np.ndarray]:
    import skimage.data

    return [getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")]


def write_corpus(folder: Path, count: int) -> tuple[Path, Path]:
    """``count`` web-sized JPEGs (640 x 480 crops with sensor-like noise), written both as a
    folder of files and as tar shards of PER_SHARD samples (KEY.jpg and KEY.json)."""
    files, shards = folder / "files", folder / "shards"
    files.mkdir(parents=True)
    shards.mkdir()
    rng = np.random.default_rng(0)
    photos = [np.asarray(Image.fromarray(p).resize((960, 720))) for p in _photos()]
    for first in range(0, count, PER_SHARD):
        with tarfile.open(shards / f"{first // PER_SHARD:05d}.tar", "w") as archive:
            for index in range(first, min(first + PER_SHARD, count)):
                photo = photos[index % len(photos)]
                top, left = rng.integers(0, 240), rng.integers(0, 320)
                crop = photo[top : top + 480, left : left + 640].astype(np.int16)
                crop = np.clip(crop + rng.integers(-3, 4, crop.shape), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(crop).save(buffer, "JPEG", quality=90)
                key = f"{index:09d}"
                (files / f"{key}.jpg").write_bytes(buffer.getvalue())
                for name, data in (
                    (f"{key}.jpg", buffer.getvalue()),
                    (f"{key}.json", json.dumps({"key": key}).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return files, shards


def write_large_shard(path: Path, megabytes: int, images: list[Path]) -> int:
    """A shard of at least ``megabytes`` MB: the corpus's JPEGs over and over under new keys,
    written without holding it; returns its samples."""
    written, count = 0, 0
    with tarfile.open(path, "w") as archive:
        while written < megabytes * 2**20:
            data = images[count % len(images)].read_bytes()
            info = tarfile.TarInfo(f"{count:09d}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
            written, count = written + len(data), count + 1
    return count


def scan(inputs: list[str], decode: bool, spread: bool = False) -> tuple[int, float]:
    """(records read, seconds) of List -> Read [-> Decode] on the local runner."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from anchorscan.anchors.io.sources import ReadLimits
    from anchorscan.transforms.decode import DecodeImages, DecodeSettings
    from anchorscan.transforms.listing import ListInputs
    from anchorscan.transforms.read import ReadInputs

    counted = Path(tempfile.mkdtemp()) / "count"
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner", "FnApiRunner"]))
    units, _, _ = pipeline | "List" >> ListInputs(inputs)
    records, _ = units | "Read" >> ReadInputs(ReadLimits(), spread)
    outputs = [records]
    if decode:
        settings = DecodeSettings(224, processes=os.cpu_count() or 1, ahead=16)
        images, errors, _ = records | "Decode" >> DecodeImages(settings)
        outputs = [images, errors]
    # Each output counted as ones before the Flatten: the local runner holds what a Flatten of
    # two outputs of one step takes in (here every decoded crop), not what the scan does.
    ones = [output | f"One{i}" >> beam.Map(lambda _: 1) for i, output in enumerate(outputs)]
    _ = (
        ones
        | "All" >> beam.Flatten()
        | "Count" >> beam.combiners.Count.Globally()
        | "Write" >> beam.Map(lambda n: counted.write_text(str(n)))
    )
    started = time.perf_counter()
    pipeline.run().wait_until_finish()
    return int(counted.read_text()), time.perf_counter() - started


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: getrusage's ru_maxrss would carry the parent's peak over
    fork and exec, Linux keeps it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_of_scan(shard: Path, spread: bool = False) -> float:
    """Peak RSS (MB) of a fresh process that scans ``shard`` (List -> Read -> Decode)."""
    command = [sys.executable, __file__, "--rss_child", str(shard)] + (["--spread"] if spread else [])
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: checks that the script runs")
    parser.add_argument("--images", type=int, default=4000, help="images in the folder and in the shards")
    parser.add_argument("--shard_mb", type=int, default=1024, help="size of the large shard, MB")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--rss_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spread", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        scan([args.rss_child], decode=True, spread=args.spread)
        print(peak_rss_mb())
        return {}
    if args.quick:
        args.images, args.shard_mb = 60, 48
    work = Path(args.workdir or tempfile.mkdtemp(prefix="anchorscan-shards-"))
    files, shards = write_corpus(work / "corpus", args.images)
    values = {}
    for name, decode in (("shard_over_folder", True), ("shard_over_folder_read", False)):
        rates = {"folder": [], "shards": []}
        for _ in range(2):
            for kind, folder in (("folder", files), ("shards", shards)):
                count, seconds = scan([str(folder)], decode)
                assert count == args.images, (kind, count)
                rates[kind].append(count / seconds)
        values[f"{name}_folder_images_per_s"] = max(rates["folder"])
        values[f"{name}_shards_images_per_s"] = max(rates["shards"])
        values[name] = max(rates["shards"]) / max(rates["folder"])
    large, small = work / "large.tar", work / "small.tar"
    jpegs = sorted(files.iterdir())
    large_samples = write_large_shard(large, args.shard_mb, jpegs)
    small_samples = write_large_shard(small, min(SMALL_SHARD_MB, args.shard_mb), jpegs)
    values["rss_large_shard_mb"] = rss_of_scan(large)
    values["rss_small_shard_mb"] = rss_of_scan(small)
    values["rss_large_over_small"] = values["rss_large_shard_mb"] / values["rss_small_shard_mb"]
    values["rss_large_shard_spread_mb"] = rss_of_scan(large, spread=True)
    print(
        f"{args.images} images of 640 x 480 (JPEG q90), shards of {PER_SHARD}; one shard of "
        f"{args.shard_mb} MB ({large_samples} samples) and one of {SMALL_SHARD_MB} MB ({small_samples})"
    )
    for name in ("shard_over_folder", "shard_over_folder_read"):
        print(
            f"{name:24} {values[name]:.3f}  (shards {values[name + '_shards_images_per_s']:.1f} images/s, "
            f"folder {values[name + '_folder_images_per_s']:.1f} images/s)"
        )
    print(
        f"peak RSS scanning one shard: {values['rss_large_shard_mb']:.0f} MB for {args.shard_mb} MB, "
        f"{values['rss_small_shard_mb']:.0f} MB for {min(SMALL_SHARD_MB, args.shard_mb)} MB; with the "
        f"samples redistributed on the local runner: {values['rss_large_shard_spread_mb']:.0f} MB"
    )
    print(f"target shard_over_folder >= 1.0: {'met' if values['shard_over_folder'] >= 1.0 else 'not met'}")
    for name, value in values.items():
        print(f"{name}={value:.4g}")
    return values


if __name__ == "__main__":
    main()
