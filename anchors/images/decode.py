"""Decoding and cropping. Resizing destroys generation artifacts, so the default is a centre crop
at native resolution (UnivFD's test protocol); only images smaller than the crop are upscaled.
Every normalisation applied to a file is recorded in its row, and every file that cannot be
scored gets a sentence saying why."""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import warnings

import numpy as np
from PIL import Image

from anchorscan.anchors.errors import exception_name
from anchorscan.anchors.forensic import extra_tiles
from anchorscan.anchors.images.perturbations import parse_perturbation
from anchorscan.anchors.images.provenance import DEFAULT_TIMEOUT, Provenance, declared_provenance

# The only formats Pillow may open, whatever a file's name says: never PostScript or PDF (which
# Pillow hands to Ghostscript where it is installed), nor the dozens of rarer plugins. A JPEG
# with a camera's multi-picture data opens as JPEG (Pillow's MPO).
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
DEFAULT_MAX_PIXELS = 100_000_000
# Smaller images would be upscaled more than 7x: the crop would see interpolation, not the image.
DEFAULT_MIN_SIDE = 32


class DecodeError(ValueError):
    """The bytes are not an image this tool can score; the message says why. Its ``__cause__``
    is the decoder's own exception, where there was one."""


@dataclasses.dataclass
class Crop:
    """The centre crop, then the forensic channel's other tiles of a large image at native
    resolution (``anchors/forensic.extra_tiles``; none for a resized image)."""

    pixels: np.ndarray  # (size, size, 3) uint8
    width: int  # of the decoded image, after EXIF orientation
    height: int
    preprocess: str  # what was done, e.g. "exif_rotate+cmyk_to_rgb+center_crop"
    phash: str = ""  # perceptual hash of the whole picture, where asked for (hold-out groups)
    provenance: Provenance = Provenance()  # what the file declares of its origin, where asked for
    tiles: np.ndarray | None = None  # (k, size, size, 3) uint8, k <= EXTRA_TILES

    def stack(self) -> np.ndarray:
        """(1 + k, size, size, 3): the centre crop first, then the tiles."""
        return self.pixels[None] if self.tiles is None else np.concatenate([self.pixels[None], self.tiles])


def _describe_unknown(data: bytes) -> str:
    head = data[:256].lstrip().lower()
    if head.startswith(b"%!ps") or data.startswith(b"\xc5\xd0\xd3\xc6"):
        return "a PostScript (EPS) document, not an image: it is not opened"
    if head.startswith(b"%pdf"):
        return "a PDF document, not an image: it is not opened"
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "an HTML or XML page, not an image (a failed download saved under an image name?)"
    if head.startswith((b"{", b"[")):
        return "JSON text, not an image"
    try:
        data[:256].decode("utf-8")
        return "text, not an image"
    except UnicodeDecodeError:
        return (
            f"not an image in a format this tool reads ({', '.join(DECODED_FORMATS)}; "
            f"the file starts with {data[:12]!r})"
        )


def _to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit samples: keep the high byte, as an 8-bit export would.
        values: np.ndarray = np.asarray(image, dtype=np.int64 if mode == "I" else np.uint16)
        shift = 8 if values.max(initial=0) > 255 else 0
        image = Image.fromarray((values >> shift).clip(0, 255).astype(np.uint8))
        notes.append("16bit_to_8bit")
        mode = "L"
    if mode == "CMYK":
        notes.append("cmyk_to_rgb")
    elif mode in ("L", "LA", "1"):
        notes.append("gray_to_rgb")
    elif mode == "P":
        notes.append("palette_to_rgb")
    if "A" in mode or "transparency" in image.info:
        notes.append("alpha_dropped")
    return image.convert("RGB")


@functools.cache
def _turbojpeg():
    """(codec, module) of libjpeg-turbo's TurboJPEG API, or None where the system library is
    missing."""
    try:
        import turbojpeg

        codec = turbojpeg.TurboJPEG()
    except (ImportError, OSError, RuntimeError) as error:
        logging.warning(
            "libturbojpeg not available (%s): JPEGs are decoded whole, which is "
            "slower; install libturbojpeg0 (Debian) or libjpeg-turbo",
            error,
        )
        return None
    # Its warnings are libjpeg's "corrupt data" notes, which PIL's decoder ignores as well.
    warnings.filterwarnings("ignore", module="turbojpeg")
    return codec, turbojpeg


def _jpeg_crops(data: bytes, width: int, height: int, size: int, corners: list) -> list[np.ndarray] | None:
    """The crops of a JPEG at ``corners`` (left, top) without decoding the rest: a lossless crop
    of the DCT blocks around them (one MCU, 8-16 px, of margin on each side, so that chroma
    upsampling at the crops' edges sees the same neighbours), then a decode of that small JPEG.
    The pixels equal a full decode's. None where this does not apply and the caller must decode
    whole."""
    turbo = _turbojpeg()
    # A truncated file decodes with a grey tail here but is an error for PIL: leave it to PIL.
    if turbo is None or not data[-1024:].rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    codec, tj = turbo
    lefts, tops = [left for left, _ in corners], [top for _, top in corners]
    try:
        _, _, subsampling, colorspace = codec.decode_header(data)
        if colorspace not in (tj.TJCS_RGB, tj.TJCS_YCbCr):  # grey and CMYK take PIL's conversions
            return None
        mcu_width, mcu_height = tj.tjMCUWidth[subsampling], tj.tjMCUHeight[subsampling]
        x0 = max(min(lefts) - mcu_width, 0) // mcu_width * mcu_width
        y0 = max(min(tops) - mcu_height, 0) // mcu_height * mcu_height
        x1, y1 = min(max(lefts) + size + mcu_width, width), min(max(tops) + size + mcu_height, height)
        # preserve=True: with the origin on the block grid, keeps a partial block at the edge.
        small = codec.crop(data, x0, y0, x1 - x0, y1 - y0, preserve=True)
        region = codec.decode(small, pixel_format=tj.TJPF_RGB)
    except Exception:  # whatever libjpeg-turbo makes of a damaged file, PIL decides
        return None
    crops = [region[top - y0 : top - y0 + size, left - x0 : left - x0 + size] for left, top in corners]
    if any(crop.shape != (size, size, 3) for crop in crops):
        return None
    return [np.ascontiguousarray(crop) for crop in crops]


# EXIF orientation -> the transpose that shows the picture upright. ImageOps.exif_transpose does
# the same but also rewrites the EXIF block, which fails on damaged GPS or rational tags; only
# the pixels matter here.
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(image: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = int(image.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block says nothing reliable about the picture
        notes.append("damaged_exif_ignored")
        return image
    if orientation not in ORIENTATIONS:
        return image
    notes.append("exif_rotate")
    return image.transpose(ORIENTATIONS[orientation])


def _webp_first_frame_box(data: bytes) -> tuple[int, int, int, int] | None:
    """The first ANMF frame's box on an animated WebP's canvas (RIFF chunks; offsets are stored
    halved, sizes minus one, as 24-bit little-endian numbers)."""
    position = 12
    while position + 8 <= len(data):
        kind, size = (
            data[position : position + 4],
            int.from_bytes(data[position + 4 : position + 8], "little"),
        )
        if kind == b"ANMF" and position + 20 <= len(data):
            x, y, width, height = (
                int.from_bytes(data[position + 8 + 3 * i : position + 11 + 3 * i], "little") for i in range(4)
            )
            return 2 * x, 2 * y, 2 * x + width + 1, 2 * y + height + 1
        position += 8 + size + (size & 1)
    return None


def _first_frame_box(image: Image.Image, data: bytes) -> tuple[int, int, int, int] | None:
    """Where a GIF's or animated WebP's first frame lies on its logical screen, when smaller:
    the rest of the screen is background, not picture."""
    tile = getattr(image, "tile", None)  # an ImageFile's; a frame cropped from it has none
    box: tuple[int, ...] | None
    if image.format == "GIF" and tile:
        box = tuple(tile[0][1])
    elif image.format == "WEBP":
        box = _webp_first_frame_box(data)
    else:
        return None
    if box is None:
        return None
    left, top = max(box[0], 0), max(box[1], 0)
    right, bottom = min(box[2], image.width), min(box[3], image.height)
    if right <= left or bottom <= top or (right - left, bottom - top) == image.size:
        return None
    return left, top, right, bottom


def _check_side(width: int, height: int, min_side: int) -> None:
    if min(width, height) < min_side:
        raise DecodeError(
            f"image is {width} x {height} pixels: too small to score (the shorter "
            f"side must be at least --min_side {min_side})"
        )


def decode_and_crop(
    data: bytes,
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resize: str = "none",
    min_side: int = DEFAULT_MIN_SIDE,
    perturbation: str | None = None,
) -> Crop:
    """``resize="none"``: centre crop at native resolution, upscaling only images smaller than
    the crop; ``"shorter_side"``: scale the shorter side to the crop size first (CLIP's own
    transform), which loses high-frequency artifacts. ``perturbation``: see
    ``anchors/images/perturbations.py``, applied before cropping. An image not resized also gives
    the forensic channel's other tiles where it is large enough (``Crop.tiles``)."""
    perturb = parse_perturbation(perturbation)
    if not data:
        raise DecodeError("file is empty (0 bytes)")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            # The size is checked below; damaged files make plugins warn, and the row says why.
            warnings.simplefilter("ignore")
            image: Image.Image = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
            if image.width * image.height > max_pixels:
                raise DecodeError(
                    f"image declares {image.width} x {image.height} pixels, over the "
                    f"limit of {max_pixels:,} (a decompression bomb, or raise "
                    "--max_pixels)"
                )
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                image.seek(0)
                notes.append(f"first_of_{frames}_frames")
            frame = _first_frame_box(image, data)
            if frame:
                image = image.crop(frame)
                notes.append("cropped_to_frame")
            image = _upright(image, notes)
            width, height = image.size
            _check_side(width, height, min_side)
            if not perturb and resize == "none" and min(width, height) >= size:
                # The common case. JPEGs decode only around the crops; other images are cropped
                # before conversion, so only the crops are copied.
                corners = _corners(width, height, size)
                if image.format == "JPEG" and not notes:
                    crops = _jpeg_crops(data, width, height, size, corners)
                    if crops is not None:
                        return _tiled(crops, width, height, "center_crop")
                crops = _cut(image, corners, size, notes)
                return _tiled(crops, width, height, "+".join([*notes, "center_crop"]))
            image = _to_rgb(image, notes)
    except DecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise DecodeError(_describe_unknown(data)) from None
    except Image.DecompressionBombError as error:
        raise DecodeError(f"a decompression bomb: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise DecodeError(f"cannot decode image (damaged or truncated file?): {error}") from error
    except Exception as error:
        # Pillow's plugins raise more than they document (TypeError, KeyError, IndexError,
        # struct.error, RuntimeError, found by tests/test_fuzz.py): still one damaged file.
        raise DecodeError(
            f"cannot decode image (damaged file?): the decoder failed with {exception_name(error)}: {error}"
        ) from error
    if perturb and perturbation:
        image = perturb(image)
        notes.append(perturbation.replace(":", ""))
        _check_side(image.width, image.height, min_side)
    shorter = min(image.size)
    if shorter < size or (resize == "shorter_side" and shorter != size):
        # Crop the centre square first, so a long thin image is not upscaled whole.
        left, top = (image.width - shorter) // 2, (image.height - shorter) // 2
        square = image.crop((left, top, left + shorter, top + shorter))
        image = square.resize((size, size), Image.Resampling.BICUBIC)
        notes.append("upscale" if shorter < size else "downscale")
    crops = _cut(image, _corners(image.width, image.height, size), size)
    return _tiled(crops, width, height, "+".join([*notes, "center_crop"]))


def _corners(width: int, height: int, size: int) -> list[tuple[int, int]]:
    """(left, top) of the centre crop, then of the forensic channel's other tiles."""
    return [((width - size) // 2, (height - size) // 2), *extra_tiles(width, height, size)]


def _cut(image: Image.Image, corners: list, size: int, notes: list[str] | None = None) -> list[np.ndarray]:
    """The crops of ``image`` at ``corners``; with ``notes``, each converted to RGB, the
    conversion noted once (it is the same for every crop)."""
    crops = []
    for index, (left, top) in enumerate(corners):
        crop = image.crop((left, top, left + size, top + size))
        if notes is not None:
            crop = _to_rgb(crop, [] if index else notes)
        crops.append(np.asarray(crop, dtype=np.uint8))
    return crops


def _tiled(crops: list[np.ndarray], width: int, height: int, preprocess: str) -> Crop:
    """The centre crop (first) and the other tiles."""
    return Crop(crops[0], width, height, preprocess, tiles=np.stack(crops[1:]) if len(crops) > 1 else None)


def perceptual_hash(data: bytes) -> str:
    """A 63-bit DCT perceptual hash of the whole picture (not the crop: a resized copy has
    another centre crop), as 16 hex digits: the signs, against their median, of the 8 x 8
    lowest frequencies but the mean, of the 32 x 32 area-downscaled luma. Re-encodes, resizes
    and mild blurs of a photo keep it (85 % of such copies of the development photos, exactly);
    distinct photos did not share one. JPEGs are decoded at a reduced scale for it (DCT
    scaling), so it costs a fraction of a full decode. "" where the file does not decode."""
    from scipy.fft import dctn

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opened = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
            opened.draft("L", (64, 64))
            image = _upright(opened, [])
            luma = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    except Exception:  # the crop's own decode reports what is wrong with the file
        return ""
    low = dctn(luma, norm="ortho")[:8, :8].ravel()[1:]
    bits = low > np.median(low)
    return f"{int(''.join('1' if bit else '0' for bit in bits), 2):016x}"


def decode_and_hash(data: bytes, size: int, **options) -> Crop:
    """``decode_and_crop`` with the picture's ``perceptual_hash`` (fit-time hold-out groups)."""
    return dataclasses.replace(decode_and_crop(data, size, **options), phash=perceptual_hash(data))


def decode_and_declare(
    data: bytes, size: int, trust_anchors: str = "", metadata_timeout: float = DEFAULT_TIMEOUT, **options
) -> Crop:
    """``decode_and_crop`` with what the file declares of its origin (``declared_provenance``),
    read from the same bytes once the pixels decode."""
    crop = decode_and_crop(data, size, **options)
    return dataclasses.replace(crop, provenance=declared_provenance(data, trust_anchors, metadata_timeout))
