"""Cut the bundled extra real crops (demo/data/fit/extra) from camera photos in Debian and PyPI
packages, as the development bench cut its crops.

    apt-get download kphotoalbum digikam-data && for f in *.deb; do dpkg-deb -x "$f" debs; done
    pip download --no-deps scipy==1.9.3 && unzip -j scipy-1.9.3-*.whl scipy/misc/face.dat
    python tools/gather_real_photos.py --debs debs --face face.dat --output demo/data/fit/extra

Photos whose shorter side exceeds 1000 px are halved with an area filter first; crops lie on a
non-overlapping 256 px grid centred in the photo; only textured crops are kept (luma std >= 12,
mean |Laplacian| > 2, under 30 % clipped), at most 8 per photo, evenly spaced in grid order.
None of these photos is a development-bench photo (scikit-image's chelsea, rocket and
motorcycle are, and are left out). Sources and licences: demo/data/SOURCES.md.
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np
from PIL import Image

CROP = 256
MAX_PER_PHOTO = 8


def photos(debs: str, face: str):
    import bz2

    from matplotlib import cbook
    from skimage import data
    from sklearn.datasets import load_sample_images

    yield "skimage_astronaut", data.astronaut()
    yield "skimage_coffee", data.coffee()
    samples = load_sample_images()
    for path, image in zip(samples.filenames, samples.images):
        yield "sklearn_" + os.path.splitext(os.path.basename(path))[0], image
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        yield "mpl_grace_hopper", np.asarray(Image.open(handle).convert("RGB"))
    with open(face, "rb") as handle:  # raw 768 x 1024 RGB bytes, bz2-compressed
        yield "scipy_face", np.frombuffer(bz2.decompress(handle.read()), np.uint8).reshape(768, 1024, 3)
    for path in sorted(glob.glob(os.path.join(debs, "usr/share/kphotoalbum/demo/*.jpg"))):
        if "qt-logo" not in path:  # a logo, not a photo
            yield (
                "kpa_" + os.path.splitext(os.path.basename(path))[0],
                np.asarray(Image.open(path).convert("RGB")),
            )
    body = os.path.join(debs, "usr/share/digikam/about/images/body-background.jpg")
    yield "digikam_body_background", np.asarray(Image.open(body).convert("RGB"))


def textured(crop: np.ndarray) -> bool:
    y = crop.astype(np.float64) @ [0.299, 0.587, 0.114]
    laplacian = np.abs(4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:]).mean()
    return y.std() >= 12 and laplacian > 2.0 and ((y < 3) | (y > 252)).mean() < 0.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debs", required=True, help="where the .deb packages were extracted")
    parser.add_argument("--face", required=True, help="scipy 1.9.3's scipy/misc/face.dat")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    for name, image in photos(args.debs, args.face):
        height, width = image.shape[:2]
        if min(height, width) > 1000:
            image = np.asarray(Image.fromarray(image).resize((width // 2, height // 2), Image.BOX))
            height, width = image.shape[:2]
        columns, rows = width // CROP, height // CROP
        left0, top0 = (width - columns * CROP) // 2, (height - rows * CROP) // 2
        cells = [(left0 + i * CROP, top0 + j * CROP) for j in range(rows) for i in range(columns)]
        cells = [(x, y) for x, y in cells if textured(image[y : y + CROP, x : x + CROP])]
        if len(cells) > MAX_PER_PHOTO:
            cells = [cells[k] for k in np.linspace(0, len(cells) - 1, MAX_PER_PHOTO).round().astype(int)]
        for x, y in cells:
            Image.fromarray(np.ascontiguousarray(image[y : y + CROP, x : x + CROP])).save(
                os.path.join(args.output, f"{name}__x{x}_y{y}.png")
            )


if __name__ == "__main__":
    main()
