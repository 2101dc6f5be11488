"""A corpus of hostile inputs, generated (not committed): each kind with its documented outcome.

`HOSTILE` maps a file name to (bytes factory, expected outcome): ("scored", note expected in the
row's `preprocess`) or (stage, words expected in the error message). `write_hostile` adds what
is not a file's bytes: a folder, a FIFO, links, a name that is not UTF-8."""

from __future__ import annotations

import io
import os
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image


def _photo(width=300, height=260, seed=0, name="astronaut") -> np.ndarray:
    """A crop of one of scikit-image's sample photos, at a seeded place."""
    import skimage.data

    photo = getattr(skimage.data, name)()
    top, left = np.random.default_rng(seed).integers(0, 100, 2)
    return np.ascontiguousarray(photo[top : top + height, left : left + width])


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
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def slow_jpeg(scans: int = 40_000, side: int = 10_000) -> bytes:
    """A progressive JPEG of ``scans`` empty scans over a ``side`` x ``side`` image: 400 KB that
    libjpeg decodes for minutes (each scan walks every block) in 250 MB of coefficients."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    header = bytearray(data[: data.index(b"\xff\xda")])  # up to the first scan
    frame = header.index(b"\xff\xc2")
    header[frame + 5 : frame + 9] = struct.pack(">HH", side, side)
    empty_scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x00\x00"  # DC scan, no data follows
    return bytes(header) + empty_scan * scans + b"\xff\xd9"


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
    return _encode(Image.fromarray(_photo()[..., 0].astype(np.uint16) * 257), "PNG")


def _damaged_gps_exif() -> bytes:
    """EXIF with an orientation and a GPS directory whose latitude claims to be text: Pillow's
    exif_transpose, rewriting it, raised TypeError."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x8825] = {2: (51.0, 30.0, 0.0)}
    data = bytearray(exif.tobytes())
    latitude = data.index(struct.pack("<HH", 2, 5))  # tag 2 (GPSLatitude), type 5 (RATIONAL)
    data[latitude + 2 : latitude + 4] = struct.pack("<H", 2)  # type 2 (ASCII)
    return bytes(data)


def _multipage_tiff_cut_in_first_page() -> bytes:
    frames = [Image.fromarray(_photo(seed=seed)) for seed in range(3)]
    return _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])[:100_000]


def gif_on_a_large_screen(width: int = 10_000, height: int = 10_000) -> bytes:
    """A 300 x 260 GIF frame at the corner of a ``width`` x ``height`` logical screen."""
    data = bytearray(_encode(Image.fromarray(_photo()).convert("P", palette=Image.Palette.ADAPTIVE), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 300 260\nnewpath 0 0 moveto 300 260 lineto "
    b"stroke\nshowpage\n%%EOF\n"
)
REGRESSIONS = pathlib.Path(__file__).parent / "data" / "decode_regressions"

good_jpeg = lambda: _encode(Image.fromarray(_photo()), "JPEG", quality=92)  # noqa: E731

HOSTILE = {
    "zero.jpg": (lambda: b"", ("decode", "empty")),
    "truncated.jpg": (lambda: good_jpeg()[:2000], ("decode", "truncated")),
    "truncated.png": (lambda: _encode(Image.fromarray(_photo()), "PNG")[:3000], ("decode", "truncated")),
    "text.jpg": (lambda: b"just some words\n", ("decode", "text, not an image")),
    "error-page.png": (lambda: b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", ("decode", "HTML")),
    "bomb.png": (lambda: png_declaring(60000, 60000), ("decode", "decompression bomb")),
    "cmyk.jpg": (
        lambda: _encode(Image.fromarray(_photo()).convert("CMYK"), "JPEG"),
        ("scored", "cmyk_to_rgb"),
    ),
    "rgb16.png": (lambda: png_rgb16(_photo().astype(np.uint16) * 257), ("scored", "center_crop")),
    "gray16.png": (_gray16_png, ("scored", "16bit_to_8bit")),
    "palette-alpha.png": (_palette_alpha_png, ("scored", "alpha_dropped")),
    "gray.jpg": (lambda: _encode(Image.fromarray(_photo()[..., 1]), "JPEG"), ("scored", "gray_to_rgb")),
    "animated.gif": (lambda: _animated("GIF"), ("scored", "first_of_3_frames")),
    "animated.webp": (lambda: _animated("WEBP"), ("scored", "first_of_3_frames")),
    "exif-rotated.jpg": (_exif_rotated_jpeg, ("scored", "exif_rotate")),
    "one-pixel.png": (lambda: _encode(Image.new("RGB", (1, 1)), "PNG"), ("decode", "too small")),
    "sliver.png": (
        lambda: _encode(Image.fromarray(np.zeros((5000, 10, 3), np.uint8)), "PNG"),
        ("decode", "too small"),
    ),
    "small.png": (
        lambda: _encode(Image.fromarray(_photo(120, 100)), "PNG"),
        ("scored", "upscale+center_crop"),
    ),
    "multipage-cut.tif": (_multipage_tiff_cut_in_first_page, ("decode", "TypeError: Missing dimensions")),
    "flipped.avif": (
        lambda: (REGRESSIONS / "avif-color-planes-RuntimeError.avif").read_bytes(),
        ("decode", "RuntimeError: Failed to decode"),
    ),
    "exif-damaged-gps.jpg": (
        lambda: _encode(Image.fromarray(_photo()), "JPEG", exif=_damaged_gps_exif()),
        ("scored", "exif_rotate"),
    ),
    "exif-damaged-gps.webp": (
        lambda: _encode(Image.fromarray(_photo()), "WEBP", exif=_damaged_gps_exif()),
        ("scored", "exif_rotate"),
    ),
    "large-screen.gif": (gif_on_a_large_screen, ("scored", "cropped_to_frame")),
    "postscript.jpg": (lambda: EPS, ("decode", "PostScript")),
}
# Decodes for minutes: only with a short --decode_timeout (see tests/test_robustness.py).
SLOW = {"slow-a.jpg": slow_jpeg, "slow-b.jpg": slow_jpeg}


NOT_UTF8_NAME = b"caf\xe9.png"


def write_hostile(folder: pathlib.Path) -> dict[str, tuple]:
    """Writes every hostile file and what is not a file into ``folder``; returns the URI each
    input has in the tables -> expected outcome, as above."""
    expected = {}
    for name, (make, outcome) in HOSTILE.items():
        (folder / name).write_bytes(make())
        expected[str(folder / name)] = outcome
    (folder / "folder.jpg").mkdir()  # a directory named like an image: not listed, not an input
    os.mkfifo(folder / "pipe.jpg")
    expected[str(folder / "pipe.jpg")] = ("read", "a named pipe (FIFO), not a file")
    with open(os.fsencode(folder) + b"/" + NOT_UTF8_NAME, "wb") as handle:
        handle.write(_encode(Image.fromarray(_photo(seed=4)), "PNG"))
    expected[f"file://{folder}/caf%E9.png"] = ("scored", "center_crop")
    elsewhere = folder.parent / f"{folder.name}-elsewhere"
    elsewhere.mkdir()
    (elsewhere / "inside.png").write_bytes(_encode(Image.fromarray(_photo(seed=5)), "PNG"))
    (folder / "linked").symlink_to(elsewhere)
    expected[str(folder / "linked" / "inside.png")] = ("scored", "center_crop")
    (folder / "loop").symlink_to(folder)
    expected[str(folder / "loop")] = ("list", "a symbolic link loop")
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    expected[str(folder / "dangling.jpg")] = ("read", "a broken symbolic link")
    (folder / "self.jpg").symlink_to(folder / "self.jpg")
    expected[str(folder / "self.jpg")] = ("read", "a symbolic link loop")
    return expected
