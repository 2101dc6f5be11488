"""Re-store a manifest's images as an img2dataset crawl stores them (docs/QUALITY.md, "Pixels as
the crawl stored them"), deterministically:

    python tools/devdata/restore_as_crawled.py MANIFEST --sizes 224,256,384,512 --output OUT

MANIFEST: uri,label,generator (what `anchorscan evaluate --dataset manifest` reads). For each size
N: ``OUT/N/<parent folder>/<stem>.jpg`` and ``OUT/N/manifest.csv`` (the same rows, the new URIs).

The crawl is the LAION recipe of img2dataset (``--image_size N --resize_mode keep_ratio
--resize_only_if_bigger True``, its default ``--encode_format jpg --encode_quality 95``): an image
whose shorter side exceeds N is area-downscaled so that it becomes N (PIL's BOX filter, what
OpenCV's INTER_AREA computes), a smaller one keeps its size (never upscaled); then JPEG q95 (PIL,
4:2:0 chroma as OpenCV's default). Sources are read as RGB; metadata is not carried."""

from __future__ import annotations

import argparse
import csv
import os

from PIL import Image

QUALITY = 95


def restore(image: Image.Image, size: int) -> Image.Image:
    """The pixels img2dataset's keep_ratio mode stores at --image_size ``size``, before JPEG."""
    shorter = min(image.size)
    if shorter <= size:
        return image
    scale = size / shorter
    target = tuple(size if side == shorter else round(side * scale) for side in image.size)
    return image.resize(target, Image.Resampling.BOX)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest")
    parser.add_argument("--sizes", default="224,256,384,512", help="comma-separated --image_size values")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    with open(args.manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for size in sizes:
        out_rows = []
        resized = 0
        for row in rows:
            source = row["uri"]
            folder = os.path.join(args.output, str(size), os.path.basename(os.path.dirname(source)))
            os.makedirs(folder, exist_ok=True)
            target = os.path.join(folder, os.path.splitext(os.path.basename(source))[0] + ".jpg")
            with Image.open(source) as image:
                original = image.convert("RGB")
            stored = restore(original, size)
            resized += stored.size != original.size
            stored.save(target, "JPEG", quality=QUALITY)
            out_rows.append({**row, "uri": os.path.abspath(target)})
        with open(os.path.join(args.output, str(size), "manifest.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(out_rows)
        print(f"--image_size {size}: {len(out_rows)} images, {resized} area-downscaled, the rest JPEG only")


if __name__ == "__main__":
    main()
