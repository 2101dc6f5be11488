"""The default backbone's feature extraction in eager PyTorch, torch.compile and ONNX Runtime.

    python benchmarks/forward_backends.py [--batch 16] [--seconds 15]

Measures images/s of the whole feature extraction (backbone, moments, projection) on this
CPU and the largest absolute difference of each backend's features from eager PyTorch, so a
faster backend is only taken if it gives the same features. Ends with NAME=VALUE lines.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from anchorscan.anchors.models.features import BackboneConfig, onnx_session


def rate(run, pixels: torch.Tensor, seconds: float) -> float:
    run(pixels)
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run(pixels)
        images += len(pixels)
    return images / (time.perf_counter() - started)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    extractor = BackboneConfig("efficientnet-lite0", runtime="torch").build()
    module = extractor.module
    pixels = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)
    )
    with torch.inference_mode():
        reference = module(pixels)[0].numpy()
        eager = rate(module, pixels, args.seconds)

        started = time.perf_counter()
        compiled = torch.compile(module)
        compiled_features = compiled(pixels)[0].numpy()
        compile_seconds = time.perf_counter() - started
        compiled_rate = rate(compiled, pixels, args.seconds)

    session = onnx_session(module, extractor.backbone.crop_size, extractor.spec.digest())
    onnx_features = session.run(None, {"pixels": pixels.numpy()})[0]
    onnx_rate = rate(lambda x: session.run(None, {"pixels": x.numpy()}), pixels, args.seconds)

    results = {
        "eager": (eager, 0.0),
        "torch_compile": (compiled_rate, np.abs(compiled_features - reference).max()),
        "onnxruntime": (onnx_rate, np.abs(onnx_features - reference).max()),
    }
    print(
        f"batch {args.batch}, {torch.get_num_threads()} threads; torch.compile took {compile_seconds:.0f} s"
    )
    print(f"{'backend':15} {'images/s':>9} {'x eager':>8} {'max |diff|':>11}")
    for name, (images_per_s, difference) in results.items():
        print(f"{name:15} {images_per_s:9.2f} {images_per_s / eager:8.2f} {difference:11.2e}")
    print(f"feature_scale={np.abs(reference).max():.3g}")
    for name, (images_per_s, difference) in results.items():
        print(f"{name}_images_per_s={images_per_s:.3f}")
        print(f"{name}_max_abs_diff={difference:.3g}")


if __name__ == "__main__":
    main()
