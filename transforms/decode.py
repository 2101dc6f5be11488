"""Read and decode images; anything unreadable becomes an error row, never a crash or a hang."""
from __future__ import annotations

import concurrent.futures
import hashlib
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from anchors.preprocess import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, DecodeError, decode_and_crop
from transforms.schema import error_row

ERRORS = "errors"
REUSED = "reused"
DEFAULT_MAX_BYTES = 256 * 2 ** 20
DEFAULT_DECODE_TIMEOUT = 60.0


class ImageMeta(NamedTuple):
    """What travels with an image's pixels through inference (the key of keyed inference)."""
    uri: str
    sha256: str
    width: int
    height: int
    preprocess: str


class ReadError(OSError):
    """The file could not be read; the message says why in words."""


def read_limited(uri: str, max_bytes: int) -> bytes:
    try:
        with FileSystems.open(uri, compression_type="uncompressed") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise ReadError("file not found (removed after it was listed?)") from None
    except IsADirectoryError:
        raise ReadError("is a directory, not a file") from None
    except PermissionError:
        raise ReadError("permission denied") from None
    except Exception as error:  # any storage error means the same to the user: not readable
        raise ReadError(f"cannot read file: {error}") from None
    if len(data) > max_bytes:
        raise ReadError(f"file is larger than --max_bytes {max_bytes:,}")
    return data


class DecodeImageFn(beam.DoFn):
    """URI -> (ImageMeta, crop); error rows tagged ERRORS; with previously scored content
    (``previous``: sha256 -> score row), the old row under this URI, tagged REUSED."""

    def __init__(self, crop_size: int, resize: str = "none", max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES, min_side: int = DEFAULT_MIN_SIDE,
                 decode_timeout: float = DEFAULT_DECODE_TIMEOUT, perturbation: str | None = None):
        self.crop_size, self.resize, self.perturbation = crop_size, resize, perturbation
        self.max_pixels, self.max_bytes, self.min_side = max_pixels, max_bytes, min_side
        self.decode_timeout = decode_timeout
        self.reused = Metrics.counter("anchorscan", "images_reused")

    def setup(self):
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def teardown(self):
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _decode(self, data: bytes):
        future = self._executor.submit(decode_and_crop, data, self.crop_size, self.max_pixels,
                                       self.resize, self.min_side, self.perturbation)
        try:
            return future.result(timeout=self.decode_timeout)
        except concurrent.futures.TimeoutError:
            # The stuck decode cannot be killed; leave it to finish and decode on a new thread.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            raise DecodeError(f"decoding took longer than --decode_timeout {self.decode_timeout:g} s") from None

    def process(self, uri: str, previous=None):
        try:
            data = read_limited(uri, self.max_bytes)
        except ReadError as error:
            yield beam.pvalue.TaggedOutput(ERRORS, error_row(uri, "read", str(error)))
            return
        sha256 = hashlib.sha256(data).hexdigest()
        if previous and sha256 in previous:
            self.reused.inc()
            yield beam.pvalue.TaggedOutput(REUSED, {**previous[sha256], "uri": uri})
            return
        try:
            crop = self._decode(data)
        except DecodeError as error:
            yield beam.pvalue.TaggedOutput(ERRORS, error_row(uri, "decode", str(error)))
            return
        yield ImageMeta(uri, sha256, crop.width, crop.height, crop.preprocess), crop.pixels


class DecodeImages(beam.PTransform):
    """URIs -> (ImageMeta, uint8 crop) pairs, error rows, and reused score rows."""

    def __init__(self, preprocessing: dict, limits: dict, previous=None):
        super().__init__()
        self.preprocessing, self.limits, self.previous = preprocessing, limits, previous

    def expand(self, uris):
        decode = DecodeImageFn(self.preprocessing["crop"], self.preprocessing["resize"], **self.limits)
        side_inputs = [beam.pvalue.AsDict(self.previous)] if self.previous is not None else []
        outputs = uris | beam.ParDo(decode, *side_inputs).with_outputs(ERRORS, REUSED, main="images")
        return outputs.images, outputs[ERRORS], outputs[REUSED]
