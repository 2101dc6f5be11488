"""Perturbations applied to every image before cropping: an evaluation's bias control (the same
re-encoding for real and fake images) or a robustness condition (soft real photos, processing
as the web does it). One registry: each kind's parameter, its range, what it does, and the
pattern the Flex templates check it with are stated once, here."""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from anchorscan.anchors.errors import UsageError

INTEGER = r"[0-9]+"
NUMBER = r"[0-9]*\.?[0-9]+"


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """``make(value)`` is a function of a PIL image; ``parameter`` names the value in help texts
    (None: the kind takes none); ``parse`` turns the value's text into it or raises ValueError
    with the range in words."""

    parameter: str | None
    parse: Callable[[str], object] | None
    make: Callable[..., Callable[[Image.Image], Image.Image]]
    pattern: str = ""
    meaning: str = ""


def _in_range(kind, low: float, high: float, what: str, odd: bool = False):
    def parse(text: str):
        value = kind(text)
        if not (math.isfinite(value) and low <= value <= high) or (odd and value % 2 == 0):
            raise ValueError(f"{what} must be {'an odd number ' if odd else ''}from {low:g} to {high:g}")
        return value

    return parse


def _positive_up_to(high: float, what: str, below: bool = False):
    def parse(text: str) -> float:
        value = float(text)
        if not (math.isfinite(value) and value > 0 and (value < high if below else value <= high)):
            raise ValueError(f"{what} must be above 0 and {'below' if below else 'at most'} {high:g}")
        return value

    return parse


def _reencode(image: Image.Image, fmt: str, **options) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _supersampled(inside, radius: float, supersample: int = 8) -> np.ndarray:
    """A normalised kernel: the share of each pixel that ``inside(y, x)`` covers (sampled on a
    finer grid, so that fractional sizes blur by fractional amounts)."""
    half = int(np.ceil(radius))
    grid = (np.arange((2 * half + 1) * supersample) + 0.5) / supersample - half - 0.5
    y, x = np.meshgrid(grid, grid, indexing="ij")
    kernel = inside(y, x).reshape(2 * half + 1, supersample, 2 * half + 1, supersample).mean((1, 3))
    return kernel / kernel.sum()


def _disk(radius: float) -> np.ndarray:
    return _supersampled(lambda y, x: x**2 + y**2 <= radius**2, radius)


def _line(length: float, angle: float = 30.0) -> np.ndarray:
    direction = np.deg2rad(angle)

    def inside(y, x):
        along = x * np.cos(direction) + y * np.sin(direction)
        across = -x * np.sin(direction) + y * np.cos(direction)
        return (np.abs(along) <= length / 2) & (np.abs(across) <= 0.5)

    return _supersampled(inside, length / 2)


def _convolve(image: Image.Image, kernel: np.ndarray) -> Image.Image:
    from scipy.ndimage import convolve

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    blurred = np.stack([convolve(pixels[..., c], kernel, mode="reflect") for c in range(3)], -1)
    return Image.fromarray(blurred.round().clip(0, 255).astype(np.uint8))


def _thumbnail(image: Image.Image, scale: float) -> Image.Image:
    return _resized(image, scale, Image.Resampling.BOX).resize(image.size, Image.Resampling.BICUBIC)


def _resized(image: Image.Image, factor: float, method) -> Image.Image:
    return image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), method)


PERTURBATIONS: dict[str, Perturbation] = {
    "jpeg": Perturbation(
        "QUALITY",
        _in_range(int, 1, 100, "QUALITY"),
        lambda quality: functools.partial(_reencode, fmt="JPEG", quality=quality),
        INTEGER,
        "re-encode as JPEG at QUALITY",
    ),
    "webp": Perturbation(
        "QUALITY",
        _in_range(int, 1, 100, "QUALITY"),
        lambda quality: functools.partial(_reencode, fmt="WEBP", quality=quality),
        INTEGER,
        "re-encode as WebP at QUALITY",
    ),
    "png": Perturbation(
        None, None, lambda: functools.partial(_reencode, fmt="PNG"), "", "re-encode losslessly"
    ),
    "blur": Perturbation(
        "SIGMA",
        _positive_up_to(50, "SIGMA"),
        lambda sigma: lambda image: image.filter(ImageFilter.GaussianBlur(sigma)),
        NUMBER,
        "Gaussian blur of SIGMA px",
    ),
    "defocus": Perturbation(
        "RADIUS",
        _positive_up_to(50, "RADIUS"),
        lambda radius: functools.partial(_convolve, kernel=_disk(radius)),
        NUMBER,
        "out of focus: a disk of RADIUS px",
    ),
    "motion": Perturbation(
        "LENGTH",
        _positive_up_to(100, "LENGTH"),
        lambda length: functools.partial(_convolve, kernel=_line(length)),
        NUMBER,
        "camera shake: a line of LENGTH px at 30 degrees",
    ),
    "thumbnail": Perturbation(
        "SCALE",
        _positive_up_to(1, "SCALE", below=True),
        lambda scale: lambda image: _thumbnail(image, scale),
        NUMBER,
        "an upscaled thumbnail: area downscale by SCALE, bicubic back up",
    ),
    "median": Perturbation(
        "SIZE",
        _in_range(int, 3, 31, "SIZE", odd=True),
        lambda size: lambda image: image.filter(ImageFilter.MedianFilter(size)),
        INTEGER,
        "SIZE x SIZE median filter (a denoiser)",
    ),
    "scale": Perturbation(
        "FACTOR",
        _positive_up_to(10, "FACTOR"),
        lambda factor: lambda image: _resized(image, factor, Image.Resampling.BICUBIC),
        NUMBER,
        "bicubic rescale by FACTOR",
    ),
}
PERTURBATION_HELP = ", ".join(
    f"{name}:{kind.parameter}" if kind.parameter else name for name, kind in PERTURBATIONS.items()
)
# What the Flex templates accept, generated from the registry.
PERTURBATION_PATTERN = (
    "^("
    + "|".join(f"{name}:{kind.pattern}" if kind.parameter else name for name, kind in PERTURBATIONS.items())
    + ")$"
)


def parse_perturbation(spec: str | None):
    """The function of a PIL image that ``spec`` (``KIND`` or ``KIND:VALUE``, see
    ``PERTURBATIONS``) names, or None without one; UsageError naming the flag otherwise."""
    if not spec:
        return None
    name, colon, value = spec.partition(":")
    kind = PERTURBATIONS.get(name)
    if kind is None:
        raise UsageError(f"--perturbation must be one of {PERTURBATION_HELP}, not {spec!r}")
    if kind.parse is None:
        if colon:
            raise UsageError(f"--perturbation {name} takes no value, got {spec!r}")
        return kind.make()
    try:
        return kind.make(kind.parse(value))
    except ValueError as error:
        parameter = kind.parameter or ""
        words = str(error) if str(error).startswith(parameter) else f"{parameter} must be a number"
        raise UsageError(f"--perturbation {spec!r}: {words} ({name}:{kind.parameter})") from None
