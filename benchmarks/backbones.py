"""Forward speed of the backbones against their FLOPs, on this machine's CPU or a GPU.

    python benchmarks/backbones.py [--device cpu|cuda] [--backbones NAME ...] [--batch N] [--seconds S]

CLIP models use random weights (speed does not depend on the values). Prints, per backbone,
images/s, GFLOP per image (counted by torch's FlopCounterMode), achieved GFLOP/s and its share
of the device's measured matmul peak (float32 on a CPU, bf16 on a GPU), then NAME=VALUE lines.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from anchorscan.anchors.models.backbones import CLIP_MODELS, DEFAULT_BACKBONE, build_clip_visual
from anchorscan.anchors.models.features import BackboneConfig


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, size: int = 4096) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    repeats, started = 0, time.perf_counter()
    while time.perf_counter() - started < 2.0:
        a @ b
        repeats += 1
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_clip_weights(name: str, folder: str) -> str:
    path = f"{folder}/{name}.safetensors"
    from safetensors.torch import save_file

    visual = build_clip_visual(CLIP_MODELS[name].architecture)
    save_file({f"visual.{k}": v.contiguous() for k, v in visual.state_dict().items()}, path)
    return path


def measure(name: str, device: str, batch: int, seconds: float, folder: str) -> dict:
    weights = random_clip_weights(name, folder) if name in CLIP_MODELS else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights have no published digest
        extractor = BackboneConfig(name, weights, device=device).build()
    pixels = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        extractor.module(pixels[:1])  # the torch module: ONNX Runtime does the same arithmetic
    gflop_per_image = counter.get_total_flops() / 1e9
    extractor(pixels)  # warm-up
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        extractor(pixels)
        images += batch
    _sync(extractor.device)
    rate = images / (time.perf_counter() - started)
    return {
        "backbone": name,
        "images_per_s": rate,
        "gflop_per_image": gflop_per_image,
        "gflops": rate * gflop_per_image,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--backbones", nargs="+", default=[DEFAULT_BACKBONE, "clip-vit-b-16", "clip-vit-l-14"]
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    peak = matmul_peak_gflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"device {device}, threads {torch.get_num_threads()}, matmul peak {peak:.0f} GFLOP/s")
    print(f"{'backbone':20} {'images/s':>9} {'GFLOP/img':>10} {'GFLOP/s':>9} {'of peak':>8}")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.backbones:
            result = measure(name, args.device, args.batch, args.seconds, folder)
            results.append(result)
            print(
                f"{name:20} {result['images_per_s']:9.2f} {result['gflop_per_image']:10.1f} "
                f"{result['gflops']:9.1f} {result['gflops'] / peak:8.1%}"
            )
    print(f"matmul_peak_gflops={peak:.1f}")
    for result in results:
        key = result["backbone"].replace("-", "_")
        print(f"{key}_images_per_s={result['images_per_s']:.3f}")
        print(f"{key}_share_of_matmul_peak={result['gflops'] / peak:.4f}")


if __name__ == "__main__":
    main()
