"""Streaming pieces (docs/METHOD.md §10): new files scored once each, in fixed windows, against
the anchor file as it is at each window's start, written as one Parquet file per window.

The watcher re-lists every poll; a file is passed on once its size and modification time have
not changed for a settle interval (``settled``: keyed state per path here, the driver's own
state in the local stream), once per version of the file. The anchor side input is the
``Latest`` reference per window, a (uri, anchor id) pair read and verified at each tick - where
the file cannot be read or verified, the last good reference, logged and counted - that each
worker resolves once through a cache (which falls back to the anchor it last loaded), so a
window never holds copies of the anchor itself and a damaged anchor file never stops the
stream. Each window's rows are written by this module, atomically and under a name fixed by the
window, so a file is complete or absent and a retried window overwrites its own file.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, ClassVar

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.coders import BooleanCoder, FloatCoder, TupleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import FixedWindows

from anchorscan.anchors import anchor_file, channels, updating
from anchorscan.anchors.anchor import Anchor
from anchorscan.anchors.errors import EnvironmentFailure, UserError
from anchorscan.anchors.io.registry import listable
from anchorscan.anchors.io.sources import Unit
from anchorscan.anchors.io.storage import read_checked_file, write_atomically
from anchorscan.anchors.io.uris import has_glob
from anchorscan.anchors.statistics import Statistics, StatisticsLayout
from anchorscan.anchors.tables import ERROR_SCHEMA, SCORE_SCHEMA, error_row
from anchorscan.anchors.threads import limit_blas_threads
from anchorscan.transforms.chain import EmbedUnits, Steps
from anchorscan.transforms.scoring import ScoreBatchFn
from anchorscan.transforms.statistics import AccumulateStatistics

ANCHOR_CACHE_SIZE = 2  # the anchor in use and the one replacing it


# Seconds a file's size and modification time must stay the same before it is read: a file
# copied in slowly is read once, whole (--settle_seconds).
SETTLE_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class Sighting:
    """What the watcher last saw of a file: its size and modification time, since when, and
    whether this version was passed on."""

    size: int
    mtime: float
    since: float
    read: bool = False


def settled(previous: Sighting | None, size: int, mtime: float, now: float, settle: float):
    """(the file's sighting now, whether to read it now): a version is read once, when its size
    and modification time have not changed for ``settle`` seconds; a changed file is a new
    version."""
    if previous is None or (previous.size, previous.mtime) != (size, mtime):
        previous = Sighting(size, mtime, now)
    if not previous.read and now - previous.since >= settle:
        return dataclasses.replace(previous, read=True), True
    return previous, False


class SettledFiles(beam.DoFn):
    """(path, FileMetadata) of every poll, keyed by path -> the path once per version, when it
    has settled (``settled``, in keyed state; the poll's timestamp is the time). Keys are never
    forgotten, like MatchContinuously's own deduplication."""

    SIGHTING = ReadModifyWriteStateSpec(
        "sighting", TupleCoder([VarIntCoder(), FloatCoder(), FloatCoder(), BooleanCoder()])
    )

    def __init__(self, settle: float):
        self.settle = settle

    def process(self, element, timestamp=beam.DoFn.TimestampParam, sighting=beam.DoFn.StateParam(SIGHTING)):
        path, metadata = element
        stored = sighting.read()
        current, read = settled(
            Sighting(*stored) if stored else None,
            int(metadata.size_in_bytes),
            float(metadata.last_updated_in_seconds),
            float(timestamp),
            self.settle,
        )
        sighting.write(dataclasses.astuple(current))
        if read:
            yield path


class NewImages(beam.PTransform):
    """FileMetadata of every poll -> units to read for the files not seen before (images,
    or containers a byte source reads), each once its size and modification time have settled
    for ``settle`` seconds, in fixed windows of ``window_seconds`` by the poll that passed them
    on; a file at most once per window."""

    def __init__(self, window_seconds: float, settle: float = SETTLE_SECONDS):
        super().__init__()
        self.window_seconds, self.settle = window_seconds, settle

    def expand(self, matches):
        return (
            matches
            | "Readable" >> beam.Filter(lambda metadata: listable(metadata.path))
            | "ByPath"
            >> beam.Map(lambda metadata: (metadata.path, metadata)).with_output_types(tuple[str, Any])
            | "Settled" >> beam.ParDo(SettledFiles(self.settle))
            | "Window" >> beam.WindowInto(FixedWindows(self.window_seconds))
            # A file rewritten after it was passed on is a new version, but one file of a window
            # is read once (as it is when the window closes), never scored twice there.
            | "OncePerWindow" >> beam.Distinct()
            | "Unit" >> beam.Map(Unit)
        )


def gcs_notification_uri(message) -> str | None:
    """A Cloud Storage Pub/Sub notification -> gs://bucket/object for a finalised object."""
    attributes = message.attributes or {}
    if attributes.get("eventType") != "OBJECT_FINALIZE":
        return None
    return f"gs://{attributes['bucketId']}/{attributes['objectId']}"


def anchor_reference(uri: str) -> tuple[str, str]:
    """(uri, anchor id) of the file at ``uri`` now, after checking it (checksum and numbers):
    what the side input carries."""
    _, metadata = anchor_file.verified_contents(read_checked_file(uri), uri)
    return uri, anchor_file.anchor_id(metadata)


# Anchors that cannot be read or verified: the user's (a damaged or foreign file) or the
# environment's (storage out of reach). Either way the stream keeps the last good anchor.
UNLOADABLE = (UserError, EnvironmentFailure)


def reload_failed(uri: str, problem: Exception, kept: str) -> None:
    logging.warning("anchor %s could not be reloaded (%s): still scoring with anchor %s", uri, problem, kept)
    Metrics.counter("anchorscan", "anchor_reloads_failed").inc()


class ReadReference(beam.DoFn):
    """A tick's anchor URI -> the reference of the file now, or, where it cannot be read or
    verified, the last good one (``initial``, the driver's, to start with), logged and counted."""

    def __init__(self, initial: tuple[str, str]):
        self.initial = initial

    def setup(self):
        self.last_good = self.initial

    def process(self, uri):
        try:
            self.last_good = anchor_reference(uri)
        except UNLOADABLE as problem:
            reload_failed(uri, problem, self.last_good[1])
        yield self.last_good


class AnchorReferences(beam.PTransform):
    """Ticks carrying the anchor's URI -> per window, the reference read at the newest tick:
    the slowly-updating side input, as ``Latest`` so that a runner firing many ticks per window
    yields one value. ``initial``: the reference the driver verified, kept until a tick reads a
    good file."""

    def __init__(self, window_seconds: float, initial: tuple[str, str]):
        super().__init__()
        self.window_seconds, self.initial = window_seconds, initial

    def expand(self, ticks):
        return (
            ticks
            | "Window" >> beam.WindowInto(FixedWindows(self.window_seconds))
            | "Read" >> beam.ParDo(ReadReference(self.initial))
            | "Latest" >> beam.combiners.Latest.Globally().without_defaults()
        )


class _AnchorCache:
    """Anchors by id, per worker process: an anchor's models are derived once, not per window.
    Where the file no longer loads, the anchor loaded last stands in (logged and counted)."""

    lock = threading.Lock()
    anchors: ClassVar[dict[str, tuple[Anchor, str]]] = {}

    @classmethod
    def get(cls, uri: str, expected_id: str) -> tuple[Anchor, str]:
        with cls.lock:
            if expected_id in cls.anchors:
                return cls.anchors[expected_id]
            limit_blas_threads()
            try:
                anchor, metadata = anchor_file.anchor_from_bytes(read_checked_file(uri), uri)
            except UNLOADABLE as problem:
                if not cls.anchors:
                    raise
                last = list(cls.anchors.values())[-1]
                reload_failed(uri, problem, last[1])
                return last
            loaded_id = anchor_file.anchor_id(metadata)
            if loaded_id != expected_id:  # replaced again since the tick: rows name the one used
                logging.info("anchor %s changed since its window's tick: scoring with %s", uri, loaded_id)
            while len(cls.anchors) >= ANCHOR_CACHE_SIZE:
                cls.anchors.pop(next(iter(cls.anchors)))
            cls.anchors[expected_id] = (anchor, loaded_id)
            return anchor, loaded_id


class ScoreJoinedFn(ScoreBatchFn):
    """One window's (shard, {"images": rows, "anchor": references}) -> score and error rows,
    in batches, against the anchor the window's reference names."""

    def __init__(self, max_batch_size: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.max_batch_size = max_batch_size

    def process(self, joined, *_):  # the anchor comes joined, not as a side input
        _, groups = joined
        references = list(groups["anchor"])
        batch = []
        for row in groups["images"]:
            if not references:
                yield beam.pvalue.TaggedOutput(
                    "errors",
                    error_row(
                        row[0].uri,
                        "score",
                        "no anchor was read for this window (is the anchor file readable?)",
                    ),
                )
                continue
            batch.append(row)
            if len(batch) >= self.max_batch_size:
                yield from self._score(batch, references[-1])
                batch = []
        if batch:
            yield from self._score(batch, references[-1])

    def _score(self, batch, reference):
        try:
            anchor, anchor_id = _AnchorCache.get(*reference)
        except UNLOADABLE as problem:  # no anchor has loaded on this worker yet
            for row in batch:
                yield beam.pvalue.TaggedOutput(
                    "errors", error_row(row[0].uri, "score", f"the anchor could not be loaded: {problem}")
                )
            return
        yield from ScoreBatchFn.process(self, batch, anchor, anchor_id)


class ScoreWindows(beam.PTransform):
    """Embedded images in windows -> score rows and error rows, each window scored against the
    anchor its reference gives. The reference joins the images by window and shard
    (CoGroupByKey) rather than as a side input: BundleBasedDirectRunner, the one local runner
    with TestStream, hands a side-input ParDo empty bundles it then fails on."""

    def __init__(self, references, shards: int = 1, max_batch_size: int = 256):
        super().__init__()
        self.references, self.shards, self.max_batch_size = references, shards, max_batch_size

    def expand(self, embedded):
        shards = self.shards
        images = embedded | "Shard" >> beam.Map(lambda row: (int(row[0].sha256[:8], 16) % shards, row))
        anchors = self.references | "EveryShard" >> beam.FlatMap(
            lambda reference: [(shard, reference) for shard in range(shards)]
        )
        outputs = (
            {"images": images, "anchor": anchors}
            | "ByWindow" >> beam.CoGroupByKey()
            | "Score" >> beam.ParDo(ScoreJoinedFn(self.max_batch_size)).with_outputs("errors", main="scores")
        )
        return outputs.scores, outputs.errors


def window_file_name(prefix: str, table: str, window, shard: int) -> str:
    start = window.start.to_utc_datetime().strftime("%Y%m%dT%H%M%S")
    end = window.end.to_utc_datetime().strftime("%Y%m%dT%H%M%S")
    return f"{prefix}-{table}-{start}-{end}-{shard:05d}.parquet"


def write_table(path: str, rows, schema: pa.Schema) -> None:
    """Rows as one Parquet file, written whole under a temporary name and renamed."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), sink)
    write_atomically(path, sink.getvalue().to_pybytes())


class _WriteWindowFn(beam.DoFn):
    def __init__(self, prefix: str, table: str, schema: pa.Schema):
        self.prefix, self.table, self.schema = prefix, table, schema

    def process(self, keyed_rows, window=beam.DoFn.WindowParam):
        shard, rows = keyed_rows
        target = window_file_name(self.prefix, self.table, window, shard)
        write_table(target, rows, self.schema)
        yield target


class WriteWindowedParquet(beam.PTransform):
    """Rows in windows -> ``PREFIX-TABLE-<start>-<end>-<shard>.parquet``, one file per window
    and shard, written atomically under a name fixed by the window (a retry overwrites it)."""

    def __init__(self, prefix: str, table: str, schema: pa.Schema, shards: int = 1):
        super().__init__()
        self.prefix, self.table, self.schema, self.shards = prefix, table, schema, shards

    def expand(self, rows):
        shards = self.shards
        return (
            rows
            | "Shard" >> beam.Map(lambda row: (hash(row["uri"]) % shards if shards > 1 else 0, row))
            | "PerWindow" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(_WriteWindowFn(self.prefix, self.table, self.schema))
        )


def _learn(statistics: Statistics, output_uri: str, projection) -> str:
    """One window's trusted real images merged into the anchor file as it is now (so windows
    learned one after the other add up), written back to it; where the file cannot be read or
    verified, into the anchor loaded last."""
    try:
        reference = anchor_reference(output_uri)
    except UNLOADABLE as problem:
        if not _AnchorCache.anchors:
            raise
        reference = (output_uri, list(_AnchorCache.anchors)[-1])
        reload_failed(output_uri, problem, reference[1])
    anchor, _ = _AnchorCache.get(*reference)
    write_atomically(
        output_uri, anchor_file.anchor_to_bytes(updating.updated(anchor, statistics), projection)
    )
    logging.info("learned %d real images into %s", channels.real_count(statistics.moments), output_uri)
    return output_uri


class LearnReal(beam.PTransform):
    """Trusted real images in windows (rows with every forensic level) -> per window, the
    anchor file at ``output_uri`` updated with them (docs/METHOD.md §10.3); scoring picks the
    new file up at its next tick. ``layout``: the anchor's statistics and hold-out rule."""

    def __init__(self, output_uri: str, layout: StatisticsLayout, projection):
        super().__init__()
        self.output_uri, self.layout, self.projection = output_uri, layout, projection

    def expand(self, embedded):
        return (
            embedded
            | "Statistics" >> AccumulateStatistics(self.layout, without_defaults=True)
            | "Learn" >> beam.Map(_learn, self.output_uri, self.projection)
        )


@dataclasses.dataclass(frozen=True)
class Learning:
    """How a stream learns from trusted real images: their steps (every forensic level), the
    anchor file they are learned into, its statistics layout and its projection."""

    steps: Steps
    anchor_uri: str
    layout: StatisticsLayout
    projection: Any


def scan_stream(units, steps: Steps, score, write, real=None, learning: Learning | None = None) -> None:
    """The stream's graph on any runner: image units -> features -> ``score`` (a transform to
    score rows and error rows) -> the scores table; trusted real units (``real``) learned into
    the anchor; every error -> the errors table. ``write(table, schema)`` is the transform that
    writes a table: per window on a streaming runner, one window's file in the local stream."""
    scanned = units | "Features" >> EmbedUnits(steps)
    rows, score_errors = scanned.embedded | "Score" >> score
    _ = rows | "WriteScores" >> write("scores", SCORE_SCHEMA)
    errors = [*scanned.errors, score_errors]
    if real is not None and learning is not None:
        learned = real | "RealFeatures" >> EmbedUnits(learning.steps)
        _ = learned.embedded | "LearnReal" >> LearnReal(
            learning.anchor_uri, learning.layout, learning.projection
        )
        errors += learned.errors
    _ = tuple(errors) | "Errors" >> beam.Flatten() | "WriteErrors" >> write("errors", ERROR_SCHEMA)


def watch_pattern(location: str) -> str:
    """A folder or prefix stands for every file below it; a glob for what it matches."""
    if has_glob(location):
        return location
    return location.rstrip("/") + "/**"


def reloads_text(failed: int) -> str:
    if not failed:
        return "every reload of --anchor read a good file"
    return (
        f"{failed} reloads failed (the file at --anchor could not be read or verified): those "
        "windows kept the last good anchor (the rows' anchor_id names it; the log says why)"
    )
