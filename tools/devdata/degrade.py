"""Make the degraded model inputs (downscaled, noised, blurred copies of the dev set's real crops)
that tools/devdata/gen_upscalerjs.cjs feeds to the UpscalerJS / MAXIM models.

    python tools/devdata/degrade.py --real /work/shared/bench/dev/real --out /work/devdata/degraded

Kinds (each a folder of PNGs named as the real crop):
  down128, down86, down64  area-filter (PIL BOX) downscale, as the bench does before SR
  noise20                  256 px + Gaussian noise sigma 20 (seed from the file name), for denoising
  motionblur9              256 px, horizontal 9 px box motion blur (reflect border) + Gaussian noise
                           sigma 2, for deblurring (MAXIM's deblurring weights are GoPro motion blur)
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os

import numpy as np
from PIL import Image


def seed_of(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def noisy(array: np.ndarray, sigma: float, name: str) -> np.ndarray:
    noise = np.random.default_rng(seed_of(name)).normal(0, sigma, array.shape)
    return np.clip(array.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def motion_blur(array: np.ndarray, length: int = 9) -> np.ndarray:
    pad = length // 2
    padded = np.pad(array.astype(np.float64), ((0, 0), (pad, pad), (0, 0)), mode="reflect")
    out = sum(padded[:, k : k + array.shape[1]] for k in range(length)) / length
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default="/work/shared/bench/dev/real")
    parser.add_argument("--out", default="/work/devdata/degraded")
    args = parser.parse_args()
    for path in sorted(glob.glob(os.path.join(args.real, "*.png"))):
        name = os.path.basename(path)
        crop = Image.open(path).convert("RGB")
        array = np.asarray(crop)
        made = {f"down{s}": crop.resize((s, s), Image.BOX) for s in (128, 86, 64)}
        made["noise20"] = Image.fromarray(noisy(array, 20, name))
        made["motionblur9"] = Image.fromarray(noisy(motion_blur(array), 2, name))
        for kind, image in made.items():
            os.makedirs(os.path.join(args.out, kind), exist_ok=True)
            image.save(os.path.join(args.out, kind, name))


if __name__ == "__main__":
    main()
