"""Fit the frozen forensic predictors that anchorscan ships (anchors/forensic_predictor.safetensors).

    python tools/fit_forensic_predictor.py demo/data/fit/extra --output anchors/forensic_predictor.safetensors

One pass over real photo crops (PNG or JPEG): the GramAccumulator (n and the summed luma
autocorrelations) is every predictor's sufficient statistic, and ``solve`` gives all weights in
closed form. The shipped file was fitted on the 144 crops in demo/data/fit/extra (real camera
photos that are not evaluation photos; tools/gather_real_photos.py cuts them). A new predictor
makes new features: anchors fitted with the old one are refused with the new one.
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np
import torch
from PIL import Image

from anchorscan.anchors.models.forensic import GramAccumulator, predictor_digest, save_predictor

RIDGE = 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="real photo crops, all of one size")
    parser.add_argument("--output", required=True)
    parser.add_argument("--ridge", type=float, default=RIDGE)
    args = parser.parse_args()
    paths = sorted(
        p for p in glob.glob(os.path.join(args.folder, "*")) if p.lower().endswith((".png", ".jpg", ".jpeg"))
    )
    accumulator = GramAccumulator()
    for start in range(0, len(paths), 32):
        batch = [np.asarray(Image.open(p).convert("RGB")) for p in paths[start : start + 32]]
        accumulator.add(torch.from_numpy(np.stack(batch)))
    weights = accumulator.solve(args.ridge)
    save_predictor(
        weights, args.output, f"fitted on {accumulator.n} crops of {args.folder} with ridge {args.ridge}"
    )
    print(f"{args.output}: {accumulator.n} crops, sha256 {predictor_digest(weights)}")


if __name__ == "__main__":
    main()
