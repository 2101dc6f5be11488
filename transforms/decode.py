"""Read and decode images; anything unreadable becomes an error row, never a crash or a hang.
Reads run on a daemon thread with a timeout, decodes in worker processes that are killed past
theirs (see anchors/decoder_pool.py), so no input can hold a worker or its exit."""

from __future__ import annotations

import collections
import errno
import functools
import hashlib
import os
import stat
import threading
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from anchorscan.anchors.errors import exception_name
from anchorscan.anchors.images.decode import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, decode_and_crop
from anchorscan.anchors.images.decoder_pool import DecodeFailed, DecoderPool, Job
from anchorscan.anchors.io.fetch import FetchError, HttpConfig, fetch, is_http
from anchorscan.anchors.io.gcs import storage_errors
from anchorscan.anchors.io.uris import local_path
from anchorscan.anchors.tables import error_row

ERRORS = "errors"
REUSED = "reused"
DEFAULT_MAX_BYTES = 256 * 2**20
DEFAULT_DECODE_TIMEOUT = 60.0
DEFAULT_READ_TIMEOUT = 60.0
# Files waiting to decode are held in memory; past this many bytes, decoding does not run ahead.
AHEAD_BYTES = 128 * 2**20
# A read that outlives its timeout is left to its daemon thread (a read stuck in the kernel
# cannot be stopped); past this many at once, further reads fail at once instead of piling up.
MAX_STUCK_READS = 4


class ImageMeta(NamedTuple):
    """What travels with an image's pixels through inference (the key of keyed inference)."""

    uri: str
    sha256: str
    width: int
    height: int
    preprocess: str


class ReadError(OSError):
    """The file could not be read; the message says why in words, ``error_type`` names the
    exception behind it (or this class, where a check refused the file)."""

    def __init__(self, message: str, error_type: str = "ReadError"):
        super().__init__(message)
        self.error_type = error_type


_NOT_FILES = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _require_regular_file(status: os.stat_result, max_bytes: int) -> None:
    if stat.S_ISDIR(status.st_mode):
        raise ReadError("is a directory, not a file", "IsADirectoryError")
    if not stat.S_ISREG(status.st_mode):
        kind = _NOT_FILES.get(stat.S_IFMT(status.st_mode), "not a regular file")
        raise ReadError(f"{kind}, not a file: not opened (reading it could wait forever)")
    if status.st_size > max_bytes:
        raise ReadError(f"file is larger than --max_bytes {max_bytes:,}")


def _read_local(path: str, max_bytes: int) -> bytes:
    """Regular files only, found by stat before any open (opening a FIFO blocks until a writer
    comes), and checked again on the open file in case it was replaced in between."""
    _require_regular_file(os.stat(path), max_bytes)
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY), "rb") as handle:
        _require_regular_file(os.fstat(handle.fileno()), max_bytes)
        return handle.read(max_bytes + 1)


def read_limited(uri: str, max_bytes: int, http: HttpConfig = HttpConfig()) -> bytes:
    if is_http(uri):
        try:
            return fetch(uri, max_bytes, http)
        except FetchError as error:
            raise ReadError(str(error), exception_name(error)) from None
    path = local_path(uri)
    try:
        if path is None:
            with storage_errors(uri), FileSystems.open(uri, compression_type="uncompressed") as handle:
                data = handle.read(max_bytes + 1)
        else:
            data = _read_local(path, max_bytes)
    except ReadError:
        raise
    except FileNotFoundError as error:
        if path is not None and os.path.islink(path):
            raise ReadError(
                f"a broken symbolic link: its target {os.readlink(path)} does not exist",
                exception_name(error),
            ) from None
        raise ReadError("file not found (removed after it was listed?)", exception_name(error)) from None
    except IsADirectoryError as error:
        raise ReadError("is a directory, not a file", exception_name(error)) from None
    except PermissionError as error:
        raise ReadError("permission denied", exception_name(error)) from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ReadError(
                "a symbolic link loop: the link leads back to itself", exception_name(error)
            ) from None
        raise ReadError(f"cannot read file: {error}", exception_name(error)) from None
    except Exception as error:  # any storage error means the same to the user: not readable
        raise ReadError(
            f"cannot read file: {exception_name(error)}: {error}", exception_name(error)
        ) from None
    if len(data) > max_bytes:
        raise ReadError(f"file is larger than --max_bytes {max_bytes:,}")
    return data


class _Decoding:
    """One image in flight: its decode job and where its output goes."""

    def __init__(self, uri: str, sha256: str, size: int, job: Job, timestamp, window):
        self.uri, self.sha256, self.size, self.job = uri, sha256, size, job
        self.timestamp, self.window = timestamp, window

    def output(self, value, tag: str | None = None):
        windowed = WindowedValue(value, self.timestamp, [self.window])
        return beam.pvalue.TaggedOutput(tag, windowed) if tag else windowed


class DecodeImageFn(beam.DoFn):
    """URI -> (ImageMeta, crop); error rows tagged ERRORS; with previously scored content
    (``previous``: sha256 -> score row), the old row under this URI, tagged REUSED.

    Up to ``ahead`` images decode on ``processes`` worker processes while the bundle goes on,
    so that decoding overlaps the forward pass that follows in the same worker."""

    def __init__(
        self,
        crop_size: int,
        resize: str = "none",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        min_side: int = DEFAULT_MIN_SIDE,
        decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        perturbation: str | None = None,
        processes: int = 1,
        ahead: int = 1,
        http: HttpConfig = HttpConfig(),
    ):
        self.decode = functools.partial(
            decode_and_crop,
            size=crop_size,
            max_pixels=max_pixels,
            resize=resize,
            min_side=min_side,
            perturbation=perturbation,
        )
        self.max_bytes, self.decode_timeout, self.read_timeout = max_bytes, decode_timeout, read_timeout
        self.processes, self.ahead = max(processes, 1), max(ahead, 1)
        self.http = http
        self.reused = Metrics.counter("anchorscan", "images_reused")

    def setup(self):
        self._pool = DecoderPool(self.decode, self.processes, self.decode_timeout)
        self._stuck_reads: list[threading.Event] = []

    def teardown(self):
        self._pool.close()

    def start_bundle(self):
        # A retried bundle starts afresh: what an earlier attempt left in flight is dropped.
        self._pool.discard_waiting()
        self._in_flight: collections.deque[_Decoding] = collections.deque()

    def _read(self, uri: str) -> bytes:
        """``read_limited`` on a daemon thread, given up after --read_timeout."""
        self._stuck_reads = [done for done in self._stuck_reads if not done.is_set()]
        if len(self._stuck_reads) >= MAX_STUCK_READS:
            raise ReadError(
                f"not read: {len(self._stuck_reads)} earlier reads on this worker "
                "are stuck past --read_timeout (the storage is not answering)",
                "TimeoutError",
            )
        outcome, done = {}, threading.Event()

        def read():
            try:
                outcome["data"] = read_limited(uri, self.max_bytes, self.http)
            except BaseException as error:
                outcome["error"] = error
            finally:
                done.set()

        threading.Thread(target=read, daemon=True, name="anchorscan-read").start()
        # A web server gets its own overall limit (--http_max_time), retries included.
        if not done.wait(self.http.max_time if is_http(uri) else self.read_timeout):
            self._stuck_reads.append(done)
            raise ReadError(
                f"reading took longer than --read_timeout {self.read_timeout:g} s "
                "(a stalled disk or network?)",
                "TimeoutError",
            )
        if "error" in outcome:
            raise outcome["error"]
        return outcome["data"]

    def _finish(self, decoding: _Decoding):
        try:
            crop = self._pool.result(decoding.job)
        except DecodeFailed as error:
            row = error_row(decoding.uri, "decode", str(error), error.error_type)
            yield decoding.output(row, ERRORS)
            return
        meta = ImageMeta(decoding.uri, decoding.sha256, crop.width, crop.height, crop.preprocess)
        yield decoding.output((meta, crop.pixels))

    def process(
        self, uri: str, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam, previous=None
    ):
        try:
            data = self._read(uri)
        except Exception as error:  # one input's trouble is its own row, whatever it was
            error_type = getattr(error, "error_type", exception_name(error))
            message = (
                str(error) if isinstance(error, ReadError) else f"cannot read file: {error_type}: {error}"
            )
            yield beam.pvalue.TaggedOutput(ERRORS, error_row(uri, "read", message, error_type))
            return
        sha256 = hashlib.sha256(data).hexdigest()
        if previous and sha256 in previous:
            self.reused.inc()
            yield beam.pvalue.TaggedOutput(REUSED, {**previous[sha256], "uri": uri})
            return
        self._in_flight.append(_Decoding(uri, sha256, len(data), self._pool.submit(data), timestamp, window))
        while len(self._in_flight) > self.ahead or (
            len(self._in_flight) > 1 and sum(d.size for d in self._in_flight) > AHEAD_BYTES
        ):
            yield from self._finish(self._in_flight.popleft())

    def finish_bundle(self):
        while self._in_flight:
            yield from self._finish(self._in_flight.popleft())


class DecodeImages(beam.PTransform):
    """URIs -> (ImageMeta, uint8 crop) pairs, error rows, and reused score rows."""

    def __init__(
        self,
        preprocessing: dict,
        limits: dict,
        previous=None,
        processes: int = 1,
        ahead: int = 1,
        http: HttpConfig = HttpConfig(),
    ):
        super().__init__()
        self.preprocessing, self.limits, self.previous = preprocessing, limits, previous
        self.processes, self.ahead, self.http = processes, ahead, http

    def expand(self, uris):
        decode = DecodeImageFn(
            self.preprocessing["crop"],
            self.preprocessing["resize"],
            **self.limits,
            processes=self.processes,
            ahead=self.ahead,
            http=self.http,
        )
        side_inputs = {"previous": beam.pvalue.AsDict(self.previous)} if self.previous is not None else {}
        outputs = uris | beam.ParDo(decode, **side_inputs).with_outputs(ERRORS, REUSED, main="images")
        return outputs.images, outputs[ERRORS], outputs[REUSED]
