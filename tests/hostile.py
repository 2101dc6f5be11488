"""A corpus of hostile inputs, generated (not committed): each kind with its documented outcome.

`HOSTILE` maps a file name to (bytes factory, expected outcome): ("scored", note expected in the
row's `preprocess`) or (stage, words expected in the error message)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _photo(width=300, height=260, seed=0) -> np.ndarray:
    import skimage.data
    photo = skimage.data.astronaut()
    top, left = np.random.default_rng(seed).integers(0, 200, 2)
    return np.ascontiguousarray(photo[top:top + height, left:left + width])


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge image (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


def png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return _encode(Image.fromarray(_photo(300, 260)), "JPEG", exif=exif.tobytes())


def _animated(fmt: str) -> bytes:
    frames = [Image.fromarray(_photo(seed=i)) for i in range(3)]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:])


def _palette_alpha_png() -> bytes:
    image = Image.fromarray(_photo()).convert("P", palette=Image.Palette.ADAPTIVE)
    return _encode(image, "PNG", transparency=0)


def _gray16_png() -> bytes:
    return _encode(Image.fromarray((_photo()[..., 0].astype(np.uint16) * 257)), "PNG")


good_jpeg = lambda: _encode(Image.fromarray(_photo()), "JPEG", quality=92)  # noqa: E731

HOSTILE = {
    "zero.jpg": (lambda: b"", ("decode", "empty")),
    "truncated.jpg": (lambda: good_jpeg()[:2000], ("decode", "truncated")),
    "truncated.png": (lambda: _encode(Image.fromarray(_photo()), "PNG")[:3000], ("decode", "truncated")),
    "text.jpg": (lambda: b"just some words\n", ("decode", "text, not an image")),
    "error-page.png": (lambda: b"<!DOCTYPE html><html><body>403 Forbidden</body></html>",
                       ("decode", "HTML")),
    "bomb.png": (lambda: png_declaring(60000, 60000), ("decode", "decompression bomb")),
    "cmyk.jpg": (lambda: _encode(Image.fromarray(_photo()).convert("CMYK"), "JPEG"),
                 ("scored", "cmyk_to_rgb")),
    "rgb16.png": (lambda: png_rgb16(_photo().astype(np.uint16) * 257), ("scored", "center_crop")),
    "gray16.png": (_gray16_png, ("scored", "16bit_to_8bit")),
    "palette-alpha.png": (_palette_alpha_png, ("scored", "alpha_dropped")),
    "gray.jpg": (lambda: _encode(Image.fromarray(_photo()[..., 1]), "JPEG"), ("scored", "gray_to_rgb")),
    "animated.gif": (lambda: _animated("GIF"), ("scored", "first_of_3_frames")),
    "animated.webp": (lambda: _animated("WEBP"), ("scored", "first_of_3_frames")),
    "exif-rotated.jpg": (_exif_rotated_jpeg, ("scored", "exif_rotate")),
    "one-pixel.png": (lambda: _encode(Image.new("RGB", (1, 1)), "PNG"), ("decode", "too small")),
    "sliver.png": (lambda: _encode(Image.fromarray(np.zeros((5000, 10, 3), np.uint8)), "PNG"),
                   ("decode", "too small")),
    "small.png": (lambda: _encode(Image.fromarray(_photo(120, 100)), "PNG"),
                  ("scored", "upscale+center_crop")),
}


def write_hostile(folder) -> dict[str, tuple]:
    """Writes every hostile file into ``folder``; returns name -> expected outcome."""
    for name, (make, _) in HOSTILE.items():
        (folder / name).write_bytes(make())
    (folder / "folder.jpg").mkdir()  # a directory named like an image
    return {name: outcome for name, (_, outcome) in HOSTILE.items()}
