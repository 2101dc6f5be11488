"""Read and decode images; anything unreadable becomes an error row, never a crash or a hang."""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import time
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from anchorscan.anchors.preprocess import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, DecodeError, decode_and_crop
from anchorscan.transforms.fetch import FetchError, HttpConfig, fetch, is_http
from anchorscan.transforms.gcs import storage_errors
from anchorscan.transforms.schema import error_row

ERRORS = "errors"
REUSED = "reused"
DEFAULT_MAX_BYTES = 256 * 2 ** 20
DEFAULT_DECODE_TIMEOUT = 60.0
# Files waiting to decode are held in memory; past this many bytes, decoding does not run ahead.
AHEAD_BYTES = 128 * 2 ** 20


class ImageMeta(NamedTuple):
    """What travels with an image's pixels through inference (the key of keyed inference)."""
    uri: str
    sha256: str
    width: int
    height: int
    preprocess: str


class ReadError(OSError):
    """The file could not be read; the message says why in words."""


def read_limited(uri: str, max_bytes: int, http: HttpConfig = HttpConfig()) -> bytes:
    if is_http(uri):
        try:
            return fetch(uri, max_bytes, http)
        except FetchError as error:
            raise ReadError(str(error)) from None
    try:
        with storage_errors(uri), FileSystems.open(uri, compression_type="uncompressed") as handle:
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


class _Decoding:
    """One image being decoded on the pool; ``started`` is set when a thread picks it up, so a
    decode waiting in the queue is not yet on the clock."""

    def __init__(self, uri: str, sha256: str, data: bytes, timestamp, window):
        self.uri, self.sha256, self.data = uri, sha256, data
        self.timestamp, self.window = timestamp, window
        self.started: float | None = None
        self.future: concurrent.futures.Future | None = None

    def run(self, decode):
        self.started = time.monotonic()
        return decode(self.data)

    def output(self, value, tag: str | None = None):
        windowed = WindowedValue(value, self.timestamp, [self.window])
        return beam.pvalue.TaggedOutput(tag, windowed) if tag else windowed


class DecodeImageFn(beam.DoFn):
    """URI -> (ImageMeta, crop); error rows tagged ERRORS; with previously scored content
    (``previous``: sha256 -> score row), the old row under this URI, tagged REUSED.

    Up to ``ahead`` images decode on ``threads`` threads while the bundle goes on, so that
    decoding overlaps the forward pass that follows in the same worker."""

    def __init__(self, crop_size: int, resize: str = "none", max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES, min_side: int = DEFAULT_MIN_SIDE,
                 decode_timeout: float = DEFAULT_DECODE_TIMEOUT, perturbation: str | None = None,
                 threads: int = 1, ahead: int = 1, http: HttpConfig = HttpConfig()):
        self.crop_size, self.resize, self.perturbation = crop_size, resize, perturbation
        self.http = http
        self.max_pixels, self.max_bytes, self.min_side = max_pixels, max_bytes, min_side
        self.decode_timeout = decode_timeout
        self.threads, self.ahead = max(threads, 1), max(ahead, 1)
        self.reused = Metrics.counter("anchorscan", "images_reused")

    def setup(self):
        self._executor = concurrent.futures.ThreadPoolExecutor(self.threads)

    def teardown(self):
        self._executor.shutdown(wait=False, cancel_futures=True)

    def start_bundle(self):
        # A retried bundle starts afresh: what an earlier attempt left in flight is dropped.
        self._in_flight: collections.deque[_Decoding] = collections.deque()

    def _decode(self, data: bytes):
        return decode_and_crop(data, self.crop_size, self.max_pixels, self.resize, self.min_side,
                               self.perturbation)

    def _submit(self, decoding: _Decoding) -> None:
        decoding.future = self._executor.submit(decoding.run, self._decode)

    def _result(self, decoding: _Decoding):
        while True:
            elapsed = time.monotonic() - decoding.started if decoding.started else 0.0
            try:
                return decoding.future.result(timeout=max(self.decode_timeout - elapsed, 0.0))
            except concurrent.futures.TimeoutError:
                if decoding.started and time.monotonic() - decoding.started >= self.decode_timeout:
                    break
        # A stuck decode cannot be killed: leave its thread to it and move the queue to a new pool.
        self._executor.shutdown(wait=False)
        self._executor = concurrent.futures.ThreadPoolExecutor(self.threads)
        for waiting in self._in_flight:
            if waiting.future.cancel():
                self._submit(waiting)
        raise DecodeError(f"decoding took longer than --decode_timeout {self.decode_timeout:g} s")

    def _finish(self, decoding: _Decoding):
        try:
            crop = self._result(decoding)
        except DecodeError as error:
            yield decoding.output(error_row(decoding.uri, "decode", str(error)), ERRORS)
            return
        meta = ImageMeta(decoding.uri, decoding.sha256, crop.width, crop.height, crop.preprocess)
        yield decoding.output((meta, crop.pixels))

    def process(self, uri: str, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam,
                previous=None):
        try:
            data = read_limited(uri, self.max_bytes, self.http)
        except ReadError as error:
            yield beam.pvalue.TaggedOutput(ERRORS, error_row(uri, "read", str(error)))
            return
        sha256 = hashlib.sha256(data).hexdigest()
        if previous and sha256 in previous:
            self.reused.inc()
            yield beam.pvalue.TaggedOutput(REUSED, {**previous[sha256], "uri": uri})
            return
        decoding = _Decoding(uri, sha256, data, timestamp, window)
        self._submit(decoding)
        self._in_flight.append(decoding)
        while len(self._in_flight) > self.ahead or (
                len(self._in_flight) > 1 and sum(len(d.data) for d in self._in_flight) > AHEAD_BYTES):
            yield from self._finish(self._in_flight.popleft())

    def finish_bundle(self):
        while self._in_flight:
            yield from self._finish(self._in_flight.popleft())


class DecodeImages(beam.PTransform):
    """URIs -> (ImageMeta, uint8 crop) pairs, error rows, and reused score rows."""

    def __init__(self, preprocessing: dict, limits: dict, previous=None, threads: int = 1,
                 ahead: int = 1, http: HttpConfig = HttpConfig()):
        super().__init__()
        self.preprocessing, self.limits, self.previous = preprocessing, limits, previous
        self.threads, self.ahead, self.http = threads, ahead, http

    def expand(self, uris):
        decode = DecodeImageFn(self.preprocessing["crop"], self.preprocessing["resize"],
                               **self.limits, threads=self.threads, ahead=self.ahead, http=self.http)
        side_inputs = {"previous": beam.pvalue.AsDict(self.previous)} if self.previous is not None else {}
        outputs = uris | beam.ParDo(decode, **side_inputs).with_outputs(ERRORS, REUSED, main="images")
        return outputs.images, outputs[ERRORS], outputs[REUSED]
