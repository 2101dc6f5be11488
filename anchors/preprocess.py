"""Decoding and cropping. Resizing destroys generation artifacts, so the default is a centre crop
at native resolution (UnivFD's test protocol); only images smaller than the crop are upscaled,
and every row records what was done to it."""
from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 100_000_000


class DecodeError(ValueError):
    """The bytes are not an image this tool can read; the message says why."""


@dataclasses.dataclass
class Crop:
    pixels: np.ndarray  # (size, size, 3) uint8
    width: int  # of the decoded image, after EXIF orientation
    height: int
    preprocess: str  # what was done: "center_crop" or "upscale+center_crop"


def decode_and_crop(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                    resize: str = "none") -> Crop:
    """``resize="none"``: centre crop at native resolution, upscaling only images smaller than
    the crop; ``"shorter_side"``: scale the shorter side to the crop size first (CLIP's own
    transform), which loses high-frequency artifacts."""
    if not data:
        raise DecodeError("file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise DecodeError(f"image is {image.width} x {image.height} pixels, over the limit "
                                  f"of {max_pixels:,} (raise --max_pixels to allow it)")
            image.seek(0)  # first frame of animations
            image = ImageOps.exif_transpose(image)
            image = image.convert("RGB")
    except DecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise DecodeError(f"not a recognised image format (starts with {data[:16]!r})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        raise DecodeError(f"cannot decode image: {error}") from None
    width, height = image.size
    preprocess = "center_crop"
    if min(width, height) < size or (resize == "shorter_side" and min(width, height) != size):
        scale = size / min(width, height)
        image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                             Image.BICUBIC)
        preprocess = ("upscale" if scale > 1 else "downscale") + "+center_crop"
    left, top = (image.width - size) // 2, (image.height - size) // 2
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return Crop(pixels, width, height, preprocess)
