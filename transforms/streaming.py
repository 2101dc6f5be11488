"""Streaming pieces (docs/METHOD.md §10): new files scored once each, in fixed windows, against
the anchor file as it is at each window's start, written as one Parquet file per window.

Designed around Beam's local runners: the watcher re-lists every poll and duplicates are dropped
here (per file path and modification time, in keyed state), because only the re-listing
watcher polls in real time on the in-process runner; the anchor side input is the ``Latest``
reference per window, a (uri, checksum) pair that each worker resolves once through a cache,
so a window never holds copies of the anchor itself; each window's rows are written by this
module, atomically and under a name fixed by the window, so a file is complete or absent and a
retried window overwrites its own file.
"""

from __future__ import annotations

import logging
import threading
from typing import ClassVar

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.coders import BooleanCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import FixedWindows

from anchorscan.anchors import anchor_file, updating
from anchorscan.anchors.anchor import Anchor
from anchorscan.anchors.io.sources import Unit, listable
from anchorscan.anchors.io.storage import read_bytes, write_atomically
from anchorscan.anchors.statistics import Statistics, StatisticsLayout
from anchorscan.anchors.tables import error_row
from anchorscan.anchors.threads import limit_blas_threads
from anchorscan.transforms.scoring import ScoreBatchFn
from anchorscan.transforms.statistics import AccumulateStatistics

ANCHOR_CACHE_SIZE = 2  # the anchor in use and the one replacing it


def file_key(metadata) -> tuple[str, str]:
    """A matched file as (path@mtime, path): a file is new when its path or its modification
    time is."""
    return f"{metadata.path}@{metadata.last_updated_in_seconds}", metadata.path


class FirstSighting(beam.DoFn):
    """(key, uri) -> uri the first time the key is seen (keyed state; keys are never forgotten,
    like MatchContinuously's own deduplication)."""

    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())

    def process(self, element, seen=beam.DoFn.StateParam(SEEN)):
        if not seen.read():
            seen.write(True)
            yield element[1]


class NewImages(beam.PTransform):
    """FileMetadata of every poll -> units to read for the files not seen before (images,
    or containers a byte source reads), in fixed windows of ``window_seconds`` by the poll
    that first saw them."""

    def __init__(self, window_seconds: float):
        super().__init__()
        self.window_seconds = window_seconds

    def expand(self, matches):
        return (
            matches
            | "Readable" >> beam.Filter(lambda metadata: listable(metadata.path))
            | "Key" >> beam.Map(file_key).with_output_types(tuple[str, str])
            | "FirstSighting" >> beam.ParDo(FirstSighting())
            | "Unit" >> beam.Map(Unit)
            | "Window" >> beam.WindowInto(FixedWindows(self.window_seconds))
        )


def gcs_notification_uri(message) -> str | None:
    """A Cloud Storage Pub/Sub notification -> gs://bucket/object for a finalised object."""
    attributes = message.attributes or {}
    if attributes.get("eventType") != "OBJECT_FINALIZE":
        return None
    return f"gs://{attributes['bucketId']}/{attributes['objectId']}"


def anchor_reference(uri: str) -> tuple[str, str]:
    """(uri, anchor id) of the file at ``uri`` now: what the side input carries."""
    return uri, anchor_file.anchor_id(anchor_file.read_metadata(read_bytes(uri)))


class AnchorReferences(beam.PTransform):
    """Ticks carrying the anchor's URI -> per window, the reference read at the newest tick:
    the slowly-updating side input, as ``Latest`` so that a runner firing many ticks per window
    yields one value."""

    def __init__(self, window_seconds: float):
        super().__init__()
        self.window_seconds = window_seconds

    def expand(self, ticks):
        return (
            ticks
            | "Window" >> beam.WindowInto(FixedWindows(self.window_seconds))
            | "Read" >> beam.Map(anchor_reference)
            | "Latest" >> beam.combiners.Latest.Globally().without_defaults()
        )


class _AnchorCache:
    """Anchors by id, per worker process: an anchor's models are derived once, not per window."""

    lock = threading.Lock()
    anchors: ClassVar[dict[str, tuple[Anchor, str]]] = {}

    @classmethod
    def get(cls, uri: str, expected_id: str) -> tuple[Anchor, str]:
        with cls.lock:
            if expected_id in cls.anchors:
                return cls.anchors[expected_id]
            limit_blas_threads()
            anchor, metadata = anchor_file.anchor_from_bytes(read_bytes(uri))
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
        anchor, anchor_id = _AnchorCache.get(*reference)
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


class _WriteWindowFn(beam.DoFn):
    def __init__(self, prefix: str, table: str, schema: pa.Schema):
        self.prefix, self.table, self.schema = prefix, table, schema

    def process(self, keyed_rows, window=beam.DoFn.WindowParam):
        shard, rows = keyed_rows
        target = window_file_name(self.prefix, self.table, window, shard)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(list(rows), schema=self.schema), sink)
        write_atomically(target, sink.getvalue().to_pybytes())
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
    learned one after the other add up), written back to it."""
    anchor, _ = _AnchorCache.get(*anchor_reference(output_uri))
    write_atomically(
        output_uri, anchor_file.anchor_to_bytes(updating.updated(anchor, statistics), projection)
    )
    logging.info("learned %d real images into %s", statistics.moments["backbone"].n, output_uri)
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
