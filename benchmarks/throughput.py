"""Throughput of anchorscan on this machine, every stage in one run.

    python benchmarks/throughput.py [--quick] [--images N] [--workdir DIR] [--backbone NAME]
                                    [--weights FILE] [--rss_images N] [--large_images N]

Generates a deterministic corpus (photo content from the sample images shipped in scikit-image
and scikit-learn, at 0.3, 2 and 12 megapixels, JPEG and PNG), then measures the bare backbone
forward, decoding, the score and fit pipelines on the local runner, a plain PyTorch DataLoader
loop, the statistics accumulator, memory, and FLOPs against this CPU's matmul peak. Prints a
table, then ``NAME=VALUE`` lines as the last lines.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import multiprocessing
import os
import resource
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import threadpoolctl
import torch
from PIL import Image

from anchorscan.anchors.calibration import holds_out
from anchorscan.anchors.images import decode as preprocess
from anchorscan.anchors.images.decode import decode_and_crop
from anchorscan.anchors.images.provenance import declared_provenance
from anchorscan.anchors.models.backbones import DEFAULT_BACKBONE
from anchorscan.anchors.models.features import BackboneConfig
from anchorscan.anchors.stats import BufferedMoments, Moments
from anchorscan.transforms.fitting import MIN_CALIBRATION

BATCH_SIZE = 16  # the pipelines' default --batch_size
SIZES = {"0.3mp": (640, 480), "2mp": (1600, 1200), "12mp": (4000, 3000), "png": (1024, 768)}
# Upsampling of the photo content (the sample photos are 0.2-0.3 MP): large images get smoother
# content, as from a camera lens, and stay photo-like.
SCALES = {"0.3mp": 1.0, "2mp": 1.5, "12mp": 2.5, "png": 1.0}
# Every 10 images: 4 web-sized, 3 medium and 2 camera-sized JPEGs, and 1 PNG.
MIX = ("0.3mp", "2mp", "12mp", "0.3mp", "2mp", "png", "0.3mp", "12mp", "2mp", "0.3mp")
NOISE = 3  # +-3 levels of uniform sensor-like noise keep JPEG entropy (decode cost) realistic
JPEG_QUALITY = 90
FIT_FRACTION = 0.3
# Held out by file name, so the same files are held out whatever --workdir is.
CALIBRATION = ["--calibration_fraction", str(FIT_FRACTION), "--calibration_group", r"([^/]+)$"]
TWO_WORKERS = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
# The behaviour before decoding overlapped the forward pass, for the comparison in the same run.
SERIAL_DECODE = ["--decode_processes", "1", "--decode_ahead", "1"]


# ----------------------------------------------------------------------------- corpus


def sample_photos() -> list[np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")]
    return photos + list(load_sample_images().images)


def photo_picture(photo: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A picture of ``kind``'s size from ``photo``: upsampled (bicubic), mirror-tiled from a
    random offset (seamless), plus mild noise."""
    width, height = SIZES[kind]
    if SCALES[kind] != 1.0:
        size = (round(photo.shape[1] * SCALES[kind]), round(photo.shape[0] * SCALES[kind]))
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.BICUBIC))
    top, left = int(rng.integers(photo.shape[0])), int(rng.integers(photo.shape[1]))
    tiled = np.pad(photo, ((0, top + height), (0, left + width), (0, 0)), mode="symmetric")
    picture = tiled[top : top + height, left : left + width].astype(np.int16)
    picture += rng.integers(-NOISE, NOISE + 1, picture.shape, dtype=np.int16)
    return np.clip(picture, 0, 255).astype(np.uint8)


def write_images(folder: Path, count: int) -> list[Path]:
    """``count`` images cycling through MIX; a file already there is kept (it is deterministic)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sample_photos()
    paths = []
    for index in range(count):
        kind = MIX[index % len(MIX)]
        path = folder / f"{index:05d}_{kind}.{'png' if kind == 'png' else 'jpg'}"
        if not path.exists():
            picture = photo_picture(photos[index % len(photos)], kind, np.random.default_rng(index))
            partial = path.with_name(path.name + ".partial")
            Image.fromarray(picture).save(
                partial, format="PNG" if kind == "png" else "JPEG", quality=JPEG_QUALITY
            )
            partial.rename(path)
        paths.append(path)
    return paths


def kind_of(path: Path) -> str:
    return path.stem.split("_", 1)[1]


def linked_copies(folder: Path, sources: list[Path], count: int) -> list[Path]:
    """``count`` distinct names for the ``sources`` (hard links): the pipeline sees distinct
    URIs and does all the work per URI, without the corpus costing disk or generation time."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        source = sources[index % len(sources)]
        path = folder / f"{index:05d}_{kind_of(source)}{source.suffix}"
        if not path.exists():
            os.link(source, path)
        paths.append(path)
    return paths


def build_corpus(workdir: Path, count: int, large_count: int, rss_count: int) -> dict[str, list[Path]]:
    """The file sets the measurements use, each also written as a .txt manifest."""
    mix = write_images(workdir / "corpus", count)
    fit = mix[: max(count // 2, 20)]
    by_kind = {kind: [path for path in mix if kind_of(path) == kind] for kind in SIZES}
    held_out = sum(holds_out(str(path), FIT_FRACTION, CALIBRATION[-1]) for path in fit)
    if held_out < MIN_CALIBRATION or not by_kind["12mp"]:
        raise SystemExit(
            f"--images {count} is too few: the fit would hold out {held_out} "
            f"images (need {MIN_CALIBRATION}); use at least 20"
        )
    rss = linked_copies(workdir / "rss", by_kind["0.3mp"], 10 * rss_count)
    large = linked_copies(workdir / "12mp", by_kind["12mp"], 3 * large_count)
    mix_3x = linked_copies(workdir / "mix_3x", mix, 3 * count)
    sets = {
        "mix": mix,
        "mix_3x": mix_3x,
        "fit": fit,
        "12mp": large[:large_count],
        "12mp_3x": large,
        "rss_1x": rss[:rss_count],
        "rss_10x": rss,
    }
    for name, files in sets.items():
        (workdir / f"{name}.txt").write_text("".join(f"{file}\n" for file in files))
    return sets


# ----------------------------------------------------------------------------- in this process


def peak_rss_mb() -> float:
    """This process's peak (getrusage; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_decode(paths: list[Path], crop: int, resize: str):
    """Read + decode + crop each file once, on one thread: (images/s overall, images/s per
    kind, each image's crops: its centre crop and the forensic channel's tiles)."""
    seconds = dict.fromkeys(SIZES, 0.0)
    counts = dict.fromkeys(SIZES, 0)
    crops = []
    for path in paths:
        started = time.perf_counter()
        result = decode_and_crop(path.read_bytes(), crop, resize=resize)
        seconds[kind_of(path)] += time.perf_counter() - started
        counts[kind_of(path)] += 1
        crops.append(result.stack())
    per_kind = {kind: counts[kind] / seconds[kind] for kind in SIZES if counts[kind]}
    return len(paths) / sum(seconds.values()), per_kind, crops


def measure_whole_jpeg_decode(paths: list[Path], crop: int, resize: str, crops: list[np.ndarray]):
    """The same decode with JPEGs decoded whole (no region decode): (12 MP images/s, largest
    pixel difference to the region decode's crops; 0 means the scores cannot change)."""
    region_decode = preprocess._jpeg_crops
    preprocess._jpeg_crops = lambda *args: None
    try:
        _, per_kind, whole = measure_decode(paths, crop, resize)
    finally:
        preprocess._jpeg_crops = region_decode
    difference = max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(crops, whole))
    return per_kind["12mp"], difference


def crop_batch(crops: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """One pipeline-sized batch of real images (repeated when there are fewer): their centre
    crops (the backbone's input), every crop of theirs (the forensic channel's), the image of
    each of those."""
    stacks = [crops[i % len(crops)] for i in range(BATCH_SIZE)]
    owners = np.repeat(np.arange(BATCH_SIZE), [len(stack) for stack in stacks])
    centres = np.stack([stack[0] for stack in stacks])
    return torch.from_numpy(centres), torch.from_numpy(np.concatenate(stacks)), owners


def measure_provenance(paths: list[Path]) -> float:
    """Core-seconds per image of reading what each file declares about its origin (C2PA, XMP,
    generators' text chunks, EXIF: score's --provenance read, in the decoder processes)."""
    contents = [path.read_bytes() for path in paths]
    declared_provenance(contents[0])  # warm-up: the parsers' imports
    started = time.process_time()
    for data in contents:
        declared_provenance(data)
    return (time.process_time() - started) / len(contents)


def measure_batches(step, batch: torch.Tensor, batches: int) -> tuple[float, float]:
    """(images/s, core-seconds per image: CPU time of every thread of this process) of
    ``step(batch)``, e.g. the backbone's forward pass or the forensic features."""
    step(batch)  # warm-up: first calls allocate and pick kernels
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(batches):
        step(batch)
    images = batches * len(batch)
    return images / (time.perf_counter() - started), (time.process_time() - cpu_started) / images


def measure_stats_add(dim: int, rows: int = 2048) -> tuple[float, float]:
    """Seconds per row of BufferedMoments.add, the CombineFn's add_input (its flush included, as
    once per bundle), and of the same rows added a buffer at a time with Moments.add_batch
    (centre, multiply, merge), which BufferedMoments did before it kept a syrk-updated scatter.
    numpy's BLAS gets one thread, as in the pipelines' workers."""
    with threadpoolctl.threadpool_limits(1):
        return _measure_stats_add(dim, rows)


def _measure_stats_add(dim: int, rows: int) -> tuple[float, float]:
    accumulator = BufferedMoments(dim)
    batch = accumulator.batch_size
    vectors = np.random.default_rng(0).standard_normal((rows + batch, dim), dtype=np.float32)
    for vector in vectors[:batch]:  # warm-up; later flushes are real merges
        accumulator.add(vector)
    started = time.perf_counter()
    for vector in vectors[batch:]:
        accumulator.add(vector)
    accumulator.flush()
    buffered = (time.perf_counter() - started) / rows

    moments = Moments.of(vectors[:batch])
    started = time.perf_counter()
    for start in range(batch, rows + batch, batch):
        moments.add_batch(vectors[start : start + batch])
    return buffered, (time.perf_counter() - started) / rows


def forward_flops_per_image(extractor, batch: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    # Counted on the torch module: the ONNX Runtime session does the same arithmetic.
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        extractor.module(batch)
    return counter.get_total_flops() / len(batch)


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """float32 FLOP/s of the best of ``repeats`` square torch.mm (all torch threads)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


class CenterCropDataset(torch.utils.data.Dataset):
    """UnivFD's validate.py dataset: PIL open, convert('RGB'), CenterCrop; uint8 out, since
    FeatureExtractor normalises inside its forward."""

    def __init__(self, paths: list[Path], crop: int):
        self.paths, self.crop = paths, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from torchvision.transforms.functional import center_crop

        image = Image.open(self.paths[index]).convert("RGB")
        return torch.from_numpy(np.array(center_crop(image, self.crop)))


def measure_dataloader(config: BackboneConfig, paths: list[Path], crop: int, workers: int) -> float:
    """images/s of a DataLoader loop, model load and worker start-up included (as the pipeline
    runs include theirs)."""
    started = time.perf_counter()
    extractor = config.build()
    loader = torch.utils.data.DataLoader(
        CenterCropDataset(paths, crop), batch_size=BATCH_SIZE, num_workers=workers
    )
    images = 0
    for batch in loader:
        extractor(batch)
        images += len(batch)
    return images / (time.perf_counter() - started)


def measure_in_process(config: BackboneConfig, sets: dict[str, list[Path]], quick: bool) -> dict:
    extractor = config.build()
    preprocessing = extractor.backbone.preprocessing
    crop = preprocessing["crop"]
    measure_decode(sets["mix"], crop, preprocessing["resize"])  # warm: page cache, libraries
    decode, decode_per_kind, crops = measure_decode(sets["mix"], crop, preprocessing["resize"])
    whole_12mp, region_difference = measure_whole_jpeg_decode(
        sets["mix"], crop, preprocessing["resize"], crops
    )
    batch, tiles, owners = crop_batch(crops)
    cores = len(os.sched_getaffinity(0))
    stats_seconds, stats_seconds_per_batch = measure_stats_add(extractor.spec.d_backbone)
    batches = 1 if quick else 4
    forward, forward_cpu = measure_batches(extractor.backbone_features, batch, batches)
    # per image, its tiles included (``batch`` counts the images)
    forensic, forensic_cpu = measure_batches(
        lambda _: extractor.forensic_features(tiles, owners=owners), batch, batches
    )
    return {
        "forward": forward,
        "forward_cpu": forward_cpu,
        "provenance_cpu": measure_provenance(sets["mix"]),
        "forensic": forensic,
        "forensic_cpu": forensic_cpu,
        "forensic_crops_per_image": len(tiles) / len(batch),
        "decode": decode,
        "decode_per_kind": decode_per_kind,
        "region_decode": preprocess._turbojpeg() is not None,
        "decode_whole_12mp": whole_12mp,
        "region_decode_max_pixel_difference": region_difference,
        "flops_per_image": forward_flops_per_image(extractor, batch),
        "matmul_peak": matmul_peak_flops(),
        "dim": extractor.spec.d_backbone,
        "stats_seconds": stats_seconds,
        "stats_seconds_per_batch": stats_seconds_per_batch,
        "cores": cores,
        "dataloader": measure_dataloader(config, sets["12mp"], crop, cores),
        "dataloader_3x": measure_dataloader(config, sets["12mp_3x"], crop, cores),
    }


# ----------------------------------------------------------------------------- pipeline runs


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    tree, index = [pid], 0
    while index < len(tree):
        with contextlib.suppress(OSError):  # a process may exit while we look
            for task in os.listdir(f"/proc/{tree[index]}/task"):
                with open(f"/proc/{tree[index]}/task/{task}/children") as children:
                    tree.extend(int(child) for child in children.read().split())
        index += 1
    return tree


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


class TreeMemory:
    """Peak resident memory of this process plus its descendants, sampled from /proc.

    getrusage cannot tell for pipeline runs: Linux carries ru_maxrss over fork and exec, so a
    Beam worker started by a 1 GB process reports at least 1 GB whatever it uses itself."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, sum(map(rss_mb, process_tree(os.getpid()))))


def own_peak_rss_mb() -> float:
    """This process's exact peak (VmHWM starts afresh at exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def timed_pipeline(command: str, argv: list[str]) -> dict:
    """Runs ``pipelines.<command>.run(argv)``; meant for a fresh process (in_fresh_process)."""
    from anchorscan.pipelines import fit, score

    logging.getLogger("apache_beam").setLevel(logging.ERROR)  # workers' start-up warnings
    with contextlib.redirect_stdout(io.StringIO()), TreeMemory() as memory:  # the run's summary
        started = time.perf_counter()
        summary = (fit if command == "fit" else score).run(argv)
        seconds = time.perf_counter() - started
    if command == "fit":
        images, errors = summary["n"] + summary["n_calibration"], summary["errors"]
    else:
        images, errors = summary["scored"], sum(summary["errors"].values())
    if errors:
        raise RuntimeError(f"{command} {argv}: {errors} error rows, the rate would be wrong")
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "peak_rss_mb": max(own_peak_rss_mb(), memory.peak_mb),
    }


def in_fresh_process(function, *args):
    """A new interpreter per run: its memory is its own and nothing is cached between runs."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# A comparison run that --quick leaves out (its rates print as nan): the serial decode and the
# two-worker runs compare alternatives, and --quick only shows that the script runs.
SKIPPED = {"images": 0, "seconds": math.nan, "images_per_s": math.nan, "peak_rss_mb": math.nan}


def measure_pipelines(workdir: Path, backbone: str, weights: str | None, quick: bool) -> dict:
    """Fits an anchor on the fit set, then scores the other sets with it."""
    weights_args = ["--weights", weights] if weights else []
    anchor = str(workdir / "anchor.safetensors")

    def run(command: str, file_set: str, extra: Sequence[str]) -> dict:
        return in_fresh_process(
            timed_pipeline,
            command,
            [
                "--input",
                str(workdir / f"{file_set}.txt"),
                "--runner",
                "FnApiRunner",
                "--batch_size",
                str(BATCH_SIZE),
                "--anchor",
                anchor,
                *weights_args,
                *extra,
            ],
        )

    def score(file_set: str, extra: Sequence[str] = ()) -> dict:  # the anchor names the backbone
        # Runs of one file set share a prefix: each replaces the last one's tables.
        return run("score", file_set, ["--output", str(workdir / "out" / file_set), "--overwrite", *extra])

    def compared(file_set: str, extra: Sequence[str]) -> dict:
        return SKIPPED if quick else score(file_set, extra)

    return {
        "fit": run("fit", "fit", ["--backbone", backbone, *CALIBRATION]),
        "score": score("mix"),
        "score_3x": score("mix_3x"),
        "score_serial_3x": compared("mix_3x", SERIAL_DECODE),
        "score_2": compared("mix", TWO_WORKERS),
        "score_12mp": score("12mp"),
        "score_12mp_3x": score("12mp_3x"),
        "score_12mp_2": compared("12mp", TWO_WORKERS),
        "rss_1x": score("rss_1x"),
        "rss_10x": score("rss_10x"),
    }


# ----------------------------------------------------------------------------- report


def marginal_rate(images: int, seconds: float, more_images: int, more_seconds: float) -> float:
    """images/s of the images a longer run adds: the rate once start-up is paid; nan where the
    runs are too short for the difference to rise above the noise."""
    if more_seconds <= seconds:
        return float("nan")
    return (more_images - images) / (more_seconds - seconds)


def report(local: dict, runs: dict, counts: dict, seconds: float) -> None:
    forward = local["forward"]
    rss_1x, rss_10x = runs["rss_1x"], runs["rss_10x"]
    # Steady state and start-up from the two 0.3 MP runs: they differ only in image count.
    marginal = marginal_rate(rss_1x["images"], rss_1x["seconds"], rss_10x["images"], rss_10x["seconds"])
    startup = rss_1x["seconds"] - rss_1x["images"] / marginal
    mix_1x, mix_3x = runs["score"], runs["score_3x"]
    mix_marginal = marginal_rate(mix_1x["images"], mix_1x["seconds"], mix_3x["images"], mix_3x["seconds"])
    large_1x, large_3x = runs["score_12mp"], runs["score_12mp_3x"]
    large_marginal = marginal_rate(
        large_1x["images"], large_1x["seconds"], large_3x["images"], large_3x["seconds"]
    )
    large_count = counts["12mp"]
    loader_marginal = marginal_rate(
        large_count,
        large_count / local["dataloader"],
        3 * large_count,
        3 * large_count / local["dataloader_3x"],
    )
    main_rss = f"{peak_rss_mb():.0f} MB (this process)"

    def run_row(stage: str, run: dict, rss_note: str = "") -> tuple:
        return stage, run["images_per_s"], f"{run['peak_rss_mb']:.0f} MB{rss_note}"

    rows = [
        (f"(a) backbone forward, batch {BATCH_SIZE}", forward, main_rss),
        (f"(a') forensic features, batch {BATCH_SIZE}", local["forensic"], main_rss),
        ("(b) read + decode + crop, mix", local["decode"], main_rss),
        *((f"    {kind}", rate, "") for kind, rate in local["decode_per_kind"].items()),
        ("    12mp decoded whole (no region decode)", local["decode_whole_12mp"], ""),
        run_row(f"(c) score, 1 worker, mix of {counts['mix']}", runs["score"]),
        run_row("(c) score, 1 worker, the mix 3 times over", mix_3x),
        run_row("    the same, decoding one image at a time", runs["score_serial_3x"]),
        ("    steady state on the mix (difference of the two)", mix_marginal, ""),
        run_row("(c) score, 2 workers multi_processing, mix", runs["score_2"], " (all processes)"),
        run_row(f"(c) score, 1 worker, {counts['12mp']} x 12 MP", runs["score_12mp"]),
        run_row(f"(c) score, 1 worker, {3 * counts['12mp']} x 12 MP", large_3x),
        ("    steady state on 12 MP (difference of the two)", large_marginal, ""),
        run_row(f"(c) score, 2 workers, {counts['12mp']} x 12 MP", runs["score_12mp_2"], " (all processes)"),
        run_row(f"(d) fit, 1 worker, {runs['fit']['images']} of the mix", runs["fit"]),
        (
            f"(e) DataLoader ({local['cores']} workers) + forward, {counts['12mp']} x 12 MP",
            local["dataloader"],
            main_rss,
        ),
        (
            f"(e) DataLoader ({local['cores']} workers) + forward, {3 * counts['12mp']} x 12 MP",
            local["dataloader_3x"],
            main_rss,
        ),
        ("    steady state (difference of the two)", loader_marginal, ""),
        run_row(f"(g) score, 1 worker, {rss_1x['images']} x 0.3 MP", rss_1x),
        run_row(f"(g) score, 1 worker, {rss_10x['images']} x 0.3 MP", rss_10x),
        ("    steady state (difference of the two)", marginal, ""),
    ]
    print(f"\n{'stage':<48} {'images/s':>9} {'x forward':>10}  peak RSS")
    for stage, rate, rss in rows:
        print(f"{stage:<48} {rate:>9.2f} {rate / forward:>10.2f}  {rss}")

    small_decode_ms = 1000 / local["decode_per_kind"]["0.3mp"]
    steady_ms, forward_ms = 1000 / marginal, 1000 / forward
    mix_ms, mix_decode_ms = 1000 / runs["score"]["images_per_s"], 1000 / local["decode"]
    print("\nper image, score pipeline, 1 worker          steady state, 0.3 MP   end to end, mix")
    for part, steady, mix in (
        ("read + decode + crop (b)", small_decode_ms, mix_decode_ms),
        (f"backbone forward, batch {BATCH_SIZE} (a)", forward_ms, forward_ms),
        (
            "rest: Beam, scoring, Parquet",
            steady_ms - small_decode_ms - forward_ms,
            mix_ms - mix_decode_ms - forward_ms,
        ),
        ("total", steady_ms, mix_ms),
    ):
        print(f"  {part:<42} {steady:>9.1f} ms {mix:>14.1f} ms")
    print(f"  start-up per run (in 'rest' end to end)    {startup:>9.1f} s")

    flops_rate = local["flops_per_image"] * forward
    stats_share = local["stats_seconds"] * forward
    print(
        f"\n(f) BufferedMoments.add, d={local['dim']}: {local['stats_seconds'] * 1e3:.3f} ms per "
        f"image, {stats_share:.2%} of the forward time per image (Moments.add_batch per "
        f"buffer: {local['stats_seconds_per_batch'] * 1e3:.3f} ms)\n"
        f"(h) forward {local['flops_per_image'] / 1e9:.3f} GFLOP/image (FlopCounterMode), "
        f"{flops_rate / 1e9:.1f} GFLOP/s; float32 matmul peak {local['matmul_peak'] / 1e9:.1f} "
        f"GFLOP/s: {flops_rate / local['matmul_peak']:.1%}\n"
        f"(g) memory test: {rss_1x['images']} and {rss_10x['images']} images (the target compares "
        f"1,000 and 10,000: --rss_images 1000); rss_growth_10k_over_1k is their peak RSS ratio\n"
        f"load average {', '.join(f'{load:.1f}' for load in os.getloadavg())} on "
        f"{local['cores']} cores; benchmark wall time {seconds:.0f} s\n"
    )

    # The bound: every core busy with the per-image work and nothing else. Core-seconds per
    # image: decoding runs on one thread (its wall time), the forward pass and the forensic
    # features on all of torch's threads (their CPU time); the provenance read (CPU time) in the decoders.
    core_seconds = {
        "decode": 1 / local["decode"],
        "forward": local["forward_cpu"],
        "forensic": local["forensic_cpu"],
        "provenance": local["provenance_cpu"],
    }
    bound = local["cores"] / sum(core_seconds.values())
    # Core time, the cost the bound counts: the forensic pass runs on one thread by design
    # (anchors/features.py), the forward on all of them, so their wall times compare unlike work.
    forensic_share = local["forensic_cpu"] / local["forward_cpu"]
    forensic_wall_share = forward / local["forensic"]
    # The FFTs' efficiency is per crop; a large image's tiles (up to 4 more) multiply it by design.
    crops_per_image = local["forensic_crops_per_image"]
    forensic_crop_share = forensic_share / crops_per_image
    print(
        "core-seconds per image: "
        + ", ".join(f"{part} {1e3 * value:.1f} ms" for part, value in core_seconds.items())
        + f"; bound {bound:.1f} images/s on {local['cores']} cores\n"
    )

    rss_growth = rss_10x["peak_rss_mb"] / rss_1x["peak_rss_mb"]
    large_ratio = runs["score_12mp"]["images_per_s"] / local["dataloader"]
    score_ratio = runs["score"]["images_per_s"] / forward
    targets = (  # name, value, met, note
        (
            "forensic features <= 25 % of forward",
            forensic_crop_share,
            forensic_crop_share <= 0.25,
            f"core time per crop read, same batch, same run; per image with its tiles "
            f"({crops_per_image:.1f} crops) {forensic_share:.2f}; wall time {forensic_wall_share:.2f}",
        ),
        (
            "score / bound >= 0.9",
            mix_marginal / bound,
            mix_marginal / bound >= 0.9,
            f"steady state on the mix; end to end {runs['score']['images_per_s'] / bound:.2f}",
        ),
        (
            "score / forward >= 0.9",
            score_ratio,
            score_ratio >= 0.9,
            f"end to end; steady state {mix_marginal / forward:.2f} on the mix, "
            f"{marginal / forward:.2f} on 0.3 MP",
        ),
        (
            "score >= 1.5 x DataLoader, 12 MP",
            large_ratio,
            large_ratio >= 1.5,
            f"end to end; steady state {large_marginal / loader_marginal:.2f}",
        ),
        ("statistics <= 2 % of forward", stats_share, stats_share <= 0.02, ""),
        (
            f"peak RSS {rss_10x['images']} / {rss_1x['images']} images <= 1.1",
            rss_growth,
            rss_growth <= 1.1,
            "",
        ),
    )
    print("targets")
    for name, value, met, note in targets:
        print(f"  {name:<36} {value:>7.3f}  {'met' if met else 'not met':<8} {note}")
    print()

    values = {
        "forward_images_per_s": forward,
        "forensic_images_per_s": local["forensic"],
        "forensic_share_of_forward": forensic_share,
        "forensic_crop_share_of_forward": forensic_crop_share,
        "forensic_crops_per_image": crops_per_image,
        "forensic_wall_share_of_forward": forensic_wall_share,
        "provenance_share_of_forward": local["provenance_cpu"] / local["forward_cpu"],
        "bound_images_per_s": bound,
        "score_over_bound": runs["score"]["images_per_s"] / bound,
        "score_steady_state_over_bound": mix_marginal / bound,
        "decode_images_per_s": local["decode"],
        "decode_12mp_images_per_s": local["decode_per_kind"]["12mp"],
        "decode_whole_12mp_images_per_s": local["decode_whole_12mp"],
        "region_decode": local["region_decode"],
        "region_decode_speedup_12mp": local["decode_per_kind"]["12mp"] / local["decode_whole_12mp"],
        "region_decode_max_pixel_difference": local["region_decode_max_pixel_difference"],
        "score_images_per_s": runs["score"]["images_per_s"],
        "score_3x_serial_decode_images_per_s": runs["score_serial_3x"]["images_per_s"],
        "score_2workers_images_per_s": runs["score_2"]["images_per_s"],
        "score_12mp_images_per_s": runs["score_12mp"]["images_per_s"],
        "score_12mp_2workers_images_per_s": runs["score_12mp_2"]["images_per_s"],
        "score_steady_state_images_per_s": marginal,
        "score_startup_s": startup,
        "fit_images_per_s": runs["fit"]["images_per_s"],
        "dataloader_12mp_images_per_s": local["dataloader"],
        "score_mix_steady_state_images_per_s": mix_marginal,
        "score_over_forward": score_ratio,
        "score_steady_state_over_forward_mix": mix_marginal / forward,
        "score_steady_state_over_forward_small": marginal / forward,
        "fit_over_forward": runs["fit"]["images_per_s"] / forward,
        "score_over_serial_decode": mix_3x["images_per_s"] / runs["score_serial_3x"]["images_per_s"],
        "score_over_dataloader_12mp": large_ratio,
        "score_over_dataloader_12mp_steady_state": large_marginal / loader_marginal,
        "score_2workers_over_dataloader_12mp": runs["score_12mp_2"]["images_per_s"] / local["dataloader"],
        "stats_share_of_forward": stats_share,
        "stats_buffered_speedup": local["stats_seconds_per_batch"] / local["stats_seconds"],
        "rss_growth_10k_over_1k": rss_growth,
        "rss_growth_counts": f"{rss_1x['images']}/{rss_10x['images']}",
        "forward_gflops": flops_rate / 1e9,
        "matmul_peak_gflops": local["matmul_peak"] / 1e9,
        "forward_gflops_share_of_matmul_peak": flops_rate / local["matmul_peak"],
        "peak_rss_mb": max(
            peak_rss_mb(), *(run["peak_rss_mb"] for run in runs.values() if run is not SKIPPED)
        ),
        "benchmark_seconds": seconds,
    }
    for name, value in values.items():
        print(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts, for development")
    parser.add_argument("--images", type=int, help="images in the mixed corpus (200; quick 20)")
    parser.add_argument(
        "--large_images", type=int, help="12 MP images of the DataLoader comparison (96; quick 8)"
    )
    parser.add_argument(
        "--rss_images", type=int, help="1x count of the memory test; 10x is ten times it (1,000; quick 10)"
    )
    parser.add_argument("--workdir", help="corpus and outputs (default: a temporary directory)")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--weights")
    args = parser.parse_args(argv)
    # The mix and 12 MP counts fit in about 5 minutes on 2 cores; the memory test is held at
    # 1,000 against 10,000 images (about 4 minutes more), the scale where growth would show.
    counts = {
        "mix": args.images or (20 if args.quick else 200),
        "12mp": args.large_images or (8 if args.quick else 96),
        "rss": args.rss_images or (10 if args.quick else 1000),
    }

    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory())).resolve()
        sets = build_corpus(workdir, counts["mix"], counts["12mp"], counts["rss"])
        kinds = ", ".join(f"{sum(kind_of(path) == kind for path in sets['mix'])} x {kind}" for kind in SIZES)
        print(
            f"corpus in {workdir}: {counts['mix']} images ({kinds}), {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        config = BackboneConfig(args.backbone, args.weights)
        local = measure_in_process(config, sets, args.quick)
        runs = measure_pipelines(workdir, args.backbone, args.weights, args.quick)
    report(local, runs, counts, time.perf_counter() - started)


if __name__ == "__main__":
    main()
