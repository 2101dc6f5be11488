"""Dev images at 512-768 px for measuring the forensic channel's tiles (docs/QUALITY.md, "Whole
images"), made offline and deterministically from the bundled extra real crops:

    python tools/devdata/make_large.py --crops demo/data/fit/extra --output /tmp/large

demo/data/fit/extra holds 256 px crops of camera photos cut on a non-overlapping 256 px grid
(tools/gather_real_photos.py; PNG, so lossless). Where a photo's crops tile a 2 x 3, 3 x 2 or
2 x 2 block of neighbouring grid cells, the block is the photo's own region of 768 x 512,
512 x 768 or 512 x 512 px, pixel for pixel. Blocks are taken per photo in grid order (top to
bottom, left to right), larger shapes first, no cell in two blocks: ``real/``. Each real block
also gives the dev set's classical fakes, made the dev set's way at this size
(/work/shared/bench/README.md): ``bicubic/`` (area downscale by 4, bicubic upscale x4, PIL),
``bicubic_x2/`` (by 2, x2). ``manifest.csv``: uri,label,generator for `anchorscan evaluate
--dataset manifest`."""

from __future__ import annotations

import argparse
import collections
import csv
import os
import re

import numpy as np
from PIL import Image

CELL = 256
SHAPES = ((3, 2), (2, 3), (2, 2))  # (columns, rows) of cells: 768 x 512, 512 x 768, 512 x 512
FAKES = {"bicubic": 4, "bicubic_x2": 2}


def blocks(cells: set[tuple[int, int]]):
    """(left, top, columns, rows) of the photo's blocks of neighbouring cells, no cell twice."""
    free = set(cells)
    for columns, rows in SHAPES:
        for left, top in sorted(cells, key=lambda cell: (cell[1], cell[0])):
            block = {(left + CELL * i, top + CELL * j) for i in range(columns) for j in range(rows)}
            if block <= free:
                free -= block
                yield left, top, columns, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    cells: dict[str, set] = collections.defaultdict(set)
    for name in sorted(os.listdir(args.crops)):
        match = re.fullmatch(r"(.+)__x(\d+)_y(\d+)\.png", name)
        if match:
            cells[match[1]].add((int(match[2]), int(match[3])))
    for folder in ("real", *FAKES):
        os.makedirs(os.path.join(args.output, folder), exist_ok=True)
    rows = []
    for photo in sorted(cells):
        for left, top, columns, rows_of_cells in blocks(cells[photo]):
            image = np.zeros((rows_of_cells * CELL, columns * CELL, 3), np.uint8)
            for i in range(columns):
                for j in range(rows_of_cells):
                    path = os.path.join(args.crops, f"{photo}__x{left + CELL * i}_y{top + CELL * j}.png")
                    image[j * CELL : (j + 1) * CELL, i * CELL : (i + 1) * CELL] = np.asarray(
                        Image.open(path).convert("RGB")
                    )
            name = f"{photo}__x{left}_y{top}_{columns * CELL}x{rows_of_cells * CELL}.png"
            real = Image.fromarray(image)
            real.save(os.path.join(args.output, "real", name))
            rows.append((os.path.join(args.output, "real", name), "real", ""))
            for family, factor in FAKES.items():
                small = real.resize((real.width // factor, real.height // factor), Image.Resampling.BOX)
                fake = small.resize(real.size, Image.Resampling.BICUBIC)
                fake.save(os.path.join(args.output, family, name))
                rows.append((os.path.join(args.output, family, name), "fake", family))
    with open(os.path.join(args.output, "manifest.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uri", "label", "generator"])
        writer.writerows(rows)
    print(f"{sum(row[1] == 'real' for row in rows)} real images from {len(cells)} photos in {args.output}")


if __name__ == "__main__":
    main()
