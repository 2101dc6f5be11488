"""Mutation fuzzing of the image decoder: small valid files of every format the product reads,
mutated by bit flips, truncations, overwrites with boundary values and splices of their chunks
(PNG chunks, JPEG marker segments, RIFF chunks of WebP, ISO-BMFF boxes of AVIF, byte ranges of
the rest). Deterministic for a seed, so a failure reproduces.

By hand, longer: ``ANCHORSCAN_FUZZ_CASES=20000 .venv/bin/python -m pytest tests/test_fuzz.py``
(``ANCHORSCAN_FUZZ_SEED`` picks another sequence)."""

from __future__ import annotations

import random
import struct

import numpy as np
from PIL import Image

from hostile import _encode
from hostile import _photo as hostile_photo

# Small enough that a case takes milliseconds, large enough to hold several JPEG blocks and to
# reach the region decode (crop 64 within 96 x 80).
FUZZ_CROP = 64
FUZZ_MIN_SIDE = 8
# A header mutated into a huge size would decode for seconds: keep each case bounded.
FUZZ_MAX_PIXELS = 4_000_000


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    return hostile_photo(width, height, seed, name="chelsea")


def _exif_with_gps() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0)}  # GPS directory
    return exif.tobytes()


def seeds() -> dict[str, bytes]:
    """name -> a small valid file."""
    rgb = Image.fromarray(_photo(96, 80))
    frames = [Image.fromarray(_photo(96, 80, seed)) for seed in (1, 2, 3)]
    return {
        "png": _encode(rgb, "PNG"),
        "png-interlaced-palette-alpha": _encode(
            rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0, interlace=1
        ),
        "png-gray16": _encode(Image.fromarray(_photo(96, 80)[..., 0].astype(np.uint16) * 257), "PNG"),
        "jpeg": _encode(rgb, "JPEG", quality=90),
        "jpeg-progressive-exif-gps": _encode(rgb, "JPEG", progressive=True, exif=_exif_with_gps()),
        "jpeg-cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "jpeg-restart-markers": _encode(rgb, "JPEG", restart_marker_blocks=4),
        "webp-lossy": _encode(rgb, "WEBP", quality=80),
        "webp-lossless-exif": _encode(rgb, "WEBP", lossless=True, exif=_exif_with_gps()),
        "webp-animated": _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "tiff": _encode(rgb, "TIFF"),
        "tiff-lzw-multipage": _encode(
            frames[0], "TIFF", compression="tiff_lzw", save_all=True, append_images=frames[1:]
        ),
        "gif": _encode(rgb.convert("P"), "GIF"),
        "gif-animated": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "avif": _encode(rgb, "AVIF", quality=60),
        "bmp": _encode(rgb, "BMP"),
    }


def _png_chunks(data: bytes) -> list[bytes] | None:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    parts, position = [data[:8]], 8
    while position + 12 <= len(data):
        length = struct.unpack(">I", data[position : position + 4])[0]
        end = min(position + 12 + length, len(data))
        parts.append(data[position:end])
        position = end
    return parts + ([data[position:]] if position < len(data) else [])


def _jpeg_segments(data: bytes) -> list[bytes] | None:
    if not data.startswith(b"\xff\xd8"):
        return None
    cuts = [0] + [
        i
        for i in range(2, len(data) - 1)
        if data[i] == 0xFF and data[i + 1] not in (0x00, 0xFF, *range(0xD0, 0xD8))
    ]
    return [data[a:b] for a, b in zip(cuts, cuts[1:] + [len(data)])]


def _boxes(data: bytes, header: int, size_of) -> list[bytes]:
    parts, position = [data[:header]], header
    while position + 8 <= len(data):
        size = max(size_of(data, position), 8)
        parts.append(data[position : position + size])
        position += size
    return parts + ([data[position:]] if position < len(data) else [])


def _riff_chunks(data: bytes) -> list[bytes] | None:
    if data[:4] != b"RIFF":
        return None
    return _boxes(
        data,
        12,
        lambda d, p: (
            8 + struct.unpack("<I", d[p + 4 : p + 8])[0] + (struct.unpack("<I", d[p + 4 : p + 8])[0] & 1)
        ),
    )


def _isobmff_boxes(data: bytes) -> list[bytes] | None:
    if data[4:8] != b"ftyp":
        return None
    return _boxes(data, 0, lambda d, p: struct.unpack(">I", d[p : p + 4])[0])


def segments(data: bytes, rng: random.Random) -> list[bytes]:
    """The file's chunks where its format has them, else a few random byte ranges."""
    for split in (_png_chunks, _jpeg_segments, _riff_chunks, _isobmff_boxes):
        parts = split(data)
        if parts and len(parts) > 2:
            return parts
    cuts = sorted(rng.sample(range(1, len(data)), min(8, len(data) - 1)))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


BOUNDARY_VALUES = [
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\x00\x00",
    b"\xff\xff",
    b"\x7f\xff",
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\x7f\xff\xff\xff",
    b"\x80\x00\x00\x00",
]


def mutate(data: bytes, donor: bytes, rng: random.Random) -> tuple[str, bytes]:
    """(what was done, the mutant); ``donor`` is another file of the same format, for splices."""
    kind = rng.choice(
        [
            "flip",
            "flip",
            "truncate",
            "overwrite",
            "drop_segment",
            "repeat_segment",
            "swap_segments",
            "splice_segment",
        ]
    )
    if kind == "flip":
        mutant = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 4, 8])):
            position = rng.randrange(len(mutant))
            mutant[position] ^= 1 << rng.randrange(8)
        return kind, bytes(mutant)
    if kind == "truncate":
        return kind, data[: rng.randrange(1, len(data))]
    if kind == "overwrite":
        value = rng.choice(BOUNDARY_VALUES)
        position = rng.randrange(len(data))
        return kind, data[:position] + value + data[position + len(value) :]
    parts = segments(data, rng)
    i, j = rng.randrange(1, len(parts)), rng.randrange(1, len(parts))
    if kind == "drop_segment":
        del parts[i]
    elif kind == "repeat_segment":
        parts.insert(j, parts[i])
    elif kind == "swap_segments":
        parts[i], parts[j] = parts[j], parts[i]
    else:
        donor_parts = segments(donor, rng)
        parts.insert(j, donor_parts[rng.randrange(1, len(donor_parts))])
    return kind, b"".join(parts)


def cases(count: int, seed: int):
    """``count`` (name, mutant) pairs, cycling through the seed files."""
    rng = random.Random(seed)
    files = seeds()
    names = sorted(files)
    family = {name: [other for other in names if other.split("-")[0] == name.split("-")[0]] for name in names}
    for index in range(count):
        name = names[index % len(names)]
        donor = files[rng.choice(family[name])]
        kind, mutant = mutate(files[name], donor, rng)
        yield f"{index:05d}-{name}-{kind}", mutant
