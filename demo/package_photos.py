"""Write real-photo crops from colour camera photographs shipped in installed packages.

Usage::

    python demo/package_photos.py --output DIR

Every photo is read from the installed package (no network access), cut into
non-overlapping 224x224 crops at native resolution on a grid centred in the photo
(no resizing), nearly flat crops are skipped (every channel with std < 8), at most
12 crops per photo are kept (evenly spaced in grid order), and each crop is written
as a lossless RGB PNG without metadata named ``<package>_<photo>__x<X>_y<Y>.png``,
X and Y being the crop's top-left corner in the photo. The output is deterministic.
Packages that are not installed are skipped.

Photos and licences, as stated in the installed packages (scikit-image 0.26.0,
scikit-learn 1.9.1, matplotlib 3.11.2 were checked):

scikit-image (``skimage.data``; licence notes are in each function's docstring)
    astronaut   Eileen Collins, NASA: "No known copyright restrictions, released
                into the public domain."
    coffee      Rachel Michetti: "No copyright restrictions. CC0 by the photographer".
    chelsea     Stefan van der Walt: "No copyright restrictions. CC0 by the
                photographer".
    rocket      SpaceX launch of DSCOVR: "released in the public domain" by SpaceX.
    motorcycle_left
                Middlebury 2014 stereo benchmark (Nesic, Westling, Wang, Kitajima,
                Krathwohl, Scharstein), shipped down-sampled by 4 with
                ``downscale_local_mean``. The docstring states no licence; the only
                licence in the wheel is scikit-image's BSD-3-Clause (``Files: *``).
                The Middlebury data's own terms were not checked here.
scikit-learn (``sklearn.datasets.load_sample_images``; sklearn/datasets/images/README.txt)
    china       CC BY 2.0, danielbuechele on Flickr.
    flower      CC BY 2.0; the README credits danielbuechele but links to the
                Flickr user vultilion (the README is inconsistent on the author).
matplotlib (``matplotlib.cbook.get_sample_data``)
    grace_hopper
                No licence file in the package; the JPEG comment names the source
                as https://commons.wikimedia.org/wiki/File:Grace_Hopper.jpg (a US
                Navy photograph, generally described there as public domain; not
                verified from inside the package).

Deliberately not used: synthetic, grayscale or non-photographic images (camera, coins,
moon, page, ihc (immunohistochemistry), cell, hubble_deep_field,
retina, brick, grass, gravel, horse, logo, ...), motorcycle_right (a near duplicate
of motorcycle_left) and matplotlib's Minduka_Present_Blue_Pack.png (clip art).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CROP = 224
MAX_PER_PHOTO = 12
MIN_STD = 8.0


def _skimage_photos():
    from skimage import data

    yield "astronaut", data.astronaut()
    yield "coffee", data.coffee()
    yield "chelsea", data.chelsea()
    yield "rocket", data.rocket()
    left, _right, _disp = data.stereo_motorcycle()
    yield "motorcycle_left", left


def _sklearn_photos():
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    for fname, img in zip(bunch.filenames, bunch.images):
        yield Path(fname).stem, img


def _matplotlib_photos():
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        yield "grace_hopper", np.asarray(Image.open(f).convert("RGB"))


SOURCES = (
    ("skimage", _skimage_photos),
    ("sklearn", _sklearn_photos),
    ("matplotlib", _matplotlib_photos),
)


def grid_crops(img: np.ndarray, size: int = CROP, max_crops: int = MAX_PER_PHOTO,
               min_std: float = MIN_STD):
    """Return [(x, y, crop)] of non-overlapping textured crops on a centred grid."""
    h, w = img.shape[:2]
    ny, nx = h // size, w // size
    y0, x0 = (h - ny * size) // 2, (w - nx * size) // 2
    crops = []
    for j in range(ny):
        for i in range(nx):
            x, y = x0 + i * size, y0 + j * size
            c = img[y:y + size, x:x + size]
            if c.reshape(-1, 3).std(axis=0).max() < min_std:
                continue
            crops.append((x, y, c))
    if len(crops) > max_crops:
        keep = np.unique(np.linspace(0, len(crops) - 1, max_crops).round().astype(int))
        crops = [crops[k] for k in keep]
    return crops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True, type=Path, help="folder for the PNG crops")
    args = ap.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)

    n = 0
    for package, loader in SOURCES:
        try:
            photos = list(loader())
        except ImportError as exc:
            print(f"skipping {package}: {exc}", file=sys.stderr)
            continue
        for photo, img in photos:
            img = np.ascontiguousarray(np.asarray(img, dtype=np.uint8)[..., :3])
            if img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"{package}/{photo} is not an RGB photo: {img.shape}")
            for x, y, crop in grid_crops(img):
                out = args.output / f"{package}_{photo}__x{x}_y{y}.png"
                Image.fromarray(crop, "RGB").save(out, "PNG", optimize=True)
                n += 1
    print(f"wrote {n} crops to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
