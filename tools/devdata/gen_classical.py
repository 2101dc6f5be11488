"""Make the classical (NOT neural) re-synthesis families from the dev set's real crops: Bayer-mosaic
then OpenCV demosaicking (bilinear, VNG, edge-aware), and non-local-means denoising of a noised crop.

    nice -n 19 python tools/devdata/gen_classical.py --real /work/shared/bench/dev/real \
        --out /work/devdata/fakes

The mosaic samples the 256 px RGB crop on an RGGB grid (R at even row/even column, B at odd/odd);
in OpenCV's naming that layout is COLOR_BayerBG2RGB* (checked: lowest error against the crop).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import time

import cv2
import numpy as np
from PIL import Image


def mosaic(rgb: np.ndarray) -> np.ndarray:
    raw = np.empty(rgb.shape[:2], np.uint8)
    raw[0::2, 0::2] = rgb[0::2, 0::2, 0]
    raw[0::2, 1::2] = rgb[0::2, 1::2, 1]
    raw[1::2, 0::2] = rgb[1::2, 0::2, 1]
    raw[1::2, 1::2] = rgb[1::2, 1::2, 2]
    return raw


def nlm(rgb: np.ndarray, name: str) -> np.ndarray:
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)  # the same noise as degrade.py's noise20
    noisy = (
        np.clip(rgb + np.random.default_rng(seed).normal(0, 20, rgb.shape), 0, 255).round().astype(np.uint8)
    )
    return cv2.fastNlMeansDenoisingColored(
        noisy, None, h=12, hColor=12, templateWindowSize=7, searchWindowSize=21
    )


FAMILIES = {
    "demosaic_bilinear": lambda rgb, name: cv2.demosaicing(mosaic(rgb), cv2.COLOR_BayerBG2RGB),
    "demosaic_vng": lambda rgb, name: cv2.demosaicing(mosaic(rgb), cv2.COLOR_BayerBG2RGB_VNG),
    "demosaic_ea": lambda rgb, name: cv2.demosaicing(mosaic(rgb), cv2.COLOR_BayerBG2RGB_EA),
    "nlm_denoise": nlm,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default="/work/shared/bench/dev/real")
    parser.add_argument("--out", default="/work/devdata/fakes")
    parser.add_argument("--family", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    cv2.setNumThreads(1)
    paths = sorted(glob.glob(os.path.join(args.real, "*.png")))
    for family in args.family:
        os.makedirs(os.path.join(args.out, family), exist_ok=True)
        start = time.process_time()
        for path in paths:
            name = os.path.basename(path)
            rgb = np.asarray(Image.open(path).convert("RGB"))
            out = FAMILIES[family](rgb.astype(np.float64) if family == "nlm_denoise" else rgb, name)
            Image.fromarray(out).save(os.path.join(args.out, family, name))
        cpu = (time.process_time() - start) / len(paths)
        print(
            json.dumps({"family": family, "count": len(paths), "cpu_s_per_image": round(cpu, 3)}), flush=True
        )


if __name__ == "__main__":
    main()
