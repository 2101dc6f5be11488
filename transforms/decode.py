"""Read and decode images; anything unreadable becomes an error row, never a crash."""
from __future__ import annotations

import hashlib
from typing import NamedTuple

import apache_beam as beam

from anchors.preprocess import DEFAULT_MAX_PIXELS, DecodeError, decode_and_crop
from transforms.io import read_bytes
from transforms.schema import error_row

ERRORS = "errors"


class ImageMeta(NamedTuple):
    """What travels with an image's pixels through inference (the key of keyed inference)."""
    uri: str
    sha256: str
    width: int
    height: int
    preprocess: str


class DecodeImageFn(beam.DoFn):
    def __init__(self, crop_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, resize: str = "none"):
        self.crop_size, self.max_pixels, self.resize = crop_size, max_pixels, resize

    def process(self, uri: str):
        try:
            data = read_bytes(uri)
        except Exception as error:  # missing, unreadable or a directory: all mean "cannot read"
            yield beam.pvalue.TaggedOutput(ERRORS, error_row(uri, "read", f"cannot read file: {error}"))
            return
        try:
            crop = decode_and_crop(data, self.crop_size, self.max_pixels, self.resize)
        except DecodeError as error:
            yield beam.pvalue.TaggedOutput(ERRORS, error_row(uri, "decode", str(error)))
            return
        meta = ImageMeta(uri, hashlib.sha256(data).hexdigest(), crop.width, crop.height,
                         crop.preprocess)
        yield meta, crop.pixels


class DecodeImages(beam.PTransform):
    """URIs -> (ImageMeta, uint8 crop) pairs, and error rows."""

    def __init__(self, preprocessing: dict, max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__()
        self.crop_size, self.resize = preprocessing["crop"], preprocessing["resize"]
        self.max_pixels = max_pixels

    def expand(self, uris):
        decode = DecodeImageFn(self.crop_size, self.max_pixels, self.resize)
        outputs = uris | beam.ParDo(decode).with_outputs(
            ERRORS, main="images")
        return outputs.images, outputs[ERRORS]
