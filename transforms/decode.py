"""The decode step: records -> centre crops; anything that cannot be decoded becomes an error
row, never a crash or a hang. Decodes run in worker processes that are killed past their time
limit (see anchors/images/decoder_pool.py), so no input can hold a worker or its exit."""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from anchorscan.anchors.images.decode import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    decode_and_declare,
    decode_and_hash,
)
from anchorscan.anchors.images.decoder_pool import DecodeFailed, DecoderPool, Job
from anchorscan.anchors.images.provenance import Provenance
from anchorscan.anchors.io.sources import Record
from anchorscan.anchors.tables import error_row
from anchorscan.anchors.threads import capped_to_cores

ERRORS = "errors"
REUSED = "reused"
DEFAULT_DECODE_TIMEOUT = 60.0
# Files waiting to decode are held in memory; past this many bytes, decoding does not run ahead.
AHEAD_BYTES = 128 * 2**20


class ImageMeta(NamedTuple):
    """What travels with an image's pixels through inference (the key of keyed inference)."""

    uri: str
    sha256: str
    width: int
    height: int
    preprocess: str
    carried: dict  # the columns a manifest or sidecar carries to the score row
    phash: str = ""  # the picture's perceptual hash, where the decode step computed one
    provenance: Provenance = Provenance()  # what the file declares of its origin


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How images become crops (``crop``, ``resize``: the backbone's preprocessing) and the
    limits past which an image is an error row; ``processes`` decode at once, up to ``ahead``
    images ahead of the forward pass."""

    crop: int
    resize: str = "none"
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT
    perturbation: str | None = None
    processes: int = 1
    ahead: int = 1
    perceptual_hash: bool = False  # for hold-out groups (fit, update, calibrate)
    # Scans read what each file declares of its origin (fitting, which hashes, does not), in
    # at most a quarter of the decode's time; C2PA signers chaining to these PEM anchors are trusted.
    c2pa_trust_anchors: str = ""

    def decoder(self):
        options: dict[str, Any] = {
            "size": self.crop,
            "max_pixels": self.max_pixels,
            "resize": self.resize,
            "min_side": self.min_side,
            "perturbation": self.perturbation,
        }
        if self.perceptual_hash:
            return functools.partial(decode_and_hash, **options)
        return functools.partial(
            decode_and_declare,
            trust_anchors=self.c2pa_trust_anchors,
            metadata_timeout=self.decode_timeout / 4,
            **options,
        )


class _Decoding:
    """One image in flight: its decode job and where its output goes."""

    def __init__(self, record: Record, sha256: str, job: Job, timestamp, window):
        self.record, self.sha256, self.job = record, sha256, job
        self.size = len(record.data)
        self.timestamp, self.window = timestamp, window

    def output(self, value, tag: str | None = None):
        windowed = WindowedValue(value, self.timestamp, (self.window,))
        return beam.pvalue.TaggedOutput(tag, windowed) if tag else windowed


class DecodeImageFn(beam.DoFn):
    """Record -> (ImageMeta, crops: the centre crop and the forensic channel's other tiles,
    ``Crop.stack``); error rows tagged ERRORS; with previously scored content
    (``previous``: sha256 -> score row), (record, the old row), tagged REUSED.

    Up to ``ahead`` images decode on ``processes`` worker processes while the bundle goes on,
    so that decoding overlaps the forward pass that follows in the same worker."""

    def __init__(self, settings: DecodeSettings):
        self.settings = settings
        self.reused = Metrics.counter("anchorscan", "images_reused")

    def setup(self):
        settings = self.settings
        processes = capped_to_cores(max(settings.processes, 1), "--decode_processes")
        self._pool = DecoderPool(settings.decoder(), processes, settings.decode_timeout)

    def teardown(self):
        self._pool.close()

    def start_bundle(self):
        # A retried bundle starts afresh: what an earlier attempt left in flight is dropped.
        self._pool.discard_waiting()
        self._in_flight: collections.deque[_Decoding] = collections.deque()

    def _finish(self, decoding: _Decoding):
        uri = decoding.record.uri
        try:
            crop = self._pool.result(decoding.job)
        except DecodeFailed as error:
            yield decoding.output(error_row(uri, "decode", str(error), error.error_type), ERRORS)
            return
        meta = ImageMeta(
            uri,
            decoding.sha256,
            crop.width,
            crop.height,
            crop.preprocess,
            decoding.record.carried,
            crop.phash,
            crop.provenance,
        )
        yield decoding.output((meta, crop.stack()))

    def process(
        self, record: Record, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam, previous=None
    ):
        sha256 = hashlib.sha256(record.data).hexdigest()
        if previous and sha256 in previous:
            self.reused.inc()
            yield beam.pvalue.TaggedOutput(REUSED, (record, previous[sha256]))
            return
        self._in_flight.append(_Decoding(record, sha256, self._pool.submit(record.data), timestamp, window))
        ahead = max(self.settings.ahead, 1)
        while len(self._in_flight) > ahead or (
            len(self._in_flight) > 1 and sum(d.size for d in self._in_flight) > AHEAD_BYTES
        ):
            yield from self._finish(self._in_flight.popleft())

    def finish_bundle(self):
        while self._in_flight:
            yield from self._finish(self._in_flight.popleft())


class DecodeImages(beam.PTransform):
    """Records -> (ImageMeta, uint8 crops (1 + k, size, size, 3), the centre crop first)
    pairs, error rows, and (record, earlier score row) pairs of content scored before
    (``previous``: a PCollection of (sha256, row))."""

    def __init__(self, settings: DecodeSettings, previous=None):
        super().__init__()
        self.settings, self.previous = settings, previous

    def expand(self, records):
        side_inputs = {"previous": beam.pvalue.AsDict(self.previous)} if self.previous is not None else {}
        outputs = records | beam.ParDo(DecodeImageFn(self.settings), **side_inputs).with_outputs(
            ERRORS, REUSED, main="images"
        )
        return outputs.images, outputs[ERRORS], outputs[REUSED]
