"""Make near-real negatives from the dev set's real crops: real photos that are processed but not
generated, which a detector must NOT flag. OUT/<kind>/<name>.png holds the processed pixels
(lossless); for jpeg/webp kinds the compressed file sits beside it (<name>.jpg / <name>.webp).

    OMP_NUM_THREADS=1 nice -n 19 python tools/devdata/gen_processed_real.py \
        --real /work/shared/bench/dev/real --out /work/devdata/processed_real

Kinds: wm_dwtdct, wm_dwtdctsvd, wm_rivagan (invisible-watermark 0.2.0, 32-bit mark), lsb_stegano
(stegano 3.0.0 lsb.hide, random 1-2 KB payload), jpeg_q75, jpeg_q90, webp_q80 (Pillow),
lanczos_192 (256 -> 192 px Lanczos, kept at 192 px).
"""

from __future__ import annotations

import argparse
import base64
import csv
import glob
import hashlib
import io
import json
import os
import pathlib
import time

import numpy as np
from PIL import Image

KINDS = [
    "wm_dwtdct",
    "wm_dwtdctsvd",
    "wm_rivagan",
    "lsb_stegano",
    "jpeg_q75",
    "jpeg_q90",
    "webp_q80",
    "lanczos_192",
]


def rng_of(name: str, kind: str) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha256(f"{kind}/{name}".encode()).hexdigest()[:8], 16))


def watermark(rgb: np.ndarray, method: str, rng) -> np.ndarray:
    import cv2
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", rng.integers(0, 2, 32).tolist())
    if method == "rivaGan":
        encoder.loadModel()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # the library works on OpenCV BGR frames
    return cv2.cvtColor(encoder.encode(bgr, method), cv2.COLOR_BGR2RGB)


def lsb(image: Image.Image, rng) -> Image.Image:
    from stegano import lsb as stegano_lsb

    payload = rng.bytes(int(rng.integers(768, 1536)))  # base64 makes it 1-2 KB of text
    return stegano_lsb.hide(image, base64.b64encode(payload).decode()).convert("RGB")


def encoded(image: Image.Image, fmt: str, quality: int):
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=quality)
    return buffer.getvalue(), Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default="/work/shared/bench/dev/real")
    parser.add_argument("--out", default="/work/devdata/processed_real")
    parser.add_argument("--manifest", default="/work/shared/bench/dev/manifest.csv")
    parser.add_argument("--kind", nargs="*", default=KINDS)
    args = parser.parse_args()
    source = {
        os.path.basename(r["path"]): r
        for r in csv.DictReader(pathlib.Path(args.manifest).read_text().splitlines())
        if r["class"] == "real"
    }
    rows = []
    for kind in args.kind:
        folder = os.path.join(args.out, kind)
        os.makedirs(folder, exist_ok=True)
        start = time.process_time()
        for path in sorted(glob.glob(os.path.join(args.real, "*.png"))):
            name = os.path.basename(path)
            stem = os.path.splitext(name)[0]
            image = Image.open(path).convert("RGB")
            rng = rng_of(name, kind)
            if kind.startswith("wm_"):
                method = {"wm_dwtdct": "dwtDct", "wm_dwtdctsvd": "dwtDctSvd", "wm_rivagan": "rivaGan"}[kind]
                out = Image.fromarray(watermark(np.asarray(image), method, rng))
            elif kind == "lsb_stegano":
                out = lsb(image, rng)
            elif kind == "lanczos_192":
                out = image.resize((192, 192), Image.LANCZOS)
            else:
                fmt, quality = {"jpeg_q75": ("JPEG", 75), "jpeg_q90": ("JPEG", 90), "webp_q80": ("WEBP", 80)}[
                    kind
                ]
                data, out = encoded(image, fmt, quality)
                with open(
                    os.path.join(folder, stem + (".jpg" if fmt == "JPEG" else ".webp")), "wb"
                ) as handle:
                    handle.write(data)
            out.save(os.path.join(folder, name))
            meta = source[name]
            rows.append([os.path.join(folder, name), "real", meta["source_photo"], meta["package"], kind])
        cpu = (time.process_time() - start) / 77
        print(json.dumps({"kind": kind, "cpu_s_per_image": round(cpu, 3)}), flush=True)
    with open(os.path.join(args.out, "manifest.csv"), "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "class", "source_photo", "package", "how"]] + rows)


if __name__ == "__main__":
    main()
