"""Scan as a stream (docs/METHOD.md §10): watch a folder or gs:// prefix, score each new image
once (when its size and modification time have settled) in fixed windows against the anchor
file as it is at each window's start (the last good one where it cannot be read), write one
Parquet file of scores and one of errors per window as the window closes; optionally learn from
a stream of trusted real images. On a streaming runner (Dataflow, Flink) this is one streaming
pipeline (``stream_graph``); on a local runner, whose stages run one after the other, the
driver watches and runs one bounded pipeline per window (pipelines/local_stream.py)."""

from __future__ import annotations

import math
import os

import apache_beam as beam
from apache_beam.io.fileio import MatchContinuously
from apache_beam.transforms.periodicsequence import PeriodicImpulse
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp

from anchorscan.anchors.errors import UsageError
from anchorscan.anchors.io.gcs import check_paths
from anchorscan.anchors.io.storage import check_writable
from anchorscan.anchors.io.uris import Location, glob_prefix, has_glob
from anchorscan.pipelines.common import stream_start
from anchorscan.pipelines.flags import non_negative_float, positive_float, text
from anchorscan.pipelines.local_stream import run_local
from anchorscan.pipelines.options import image_flag_groups
from anchorscan.pipelines.runner import BeamCommand
from anchorscan.transforms.streaming import (
    SETTLE_SECONDS,
    AnchorReferences,
    NewImages,
    ScoreWindows,
    WriteWindowedParquet,
    gcs_notification_uri,
    reloads_text,
    scan_stream,
    watch_pattern,
)


def command_flags(parser) -> None:
    parser.add_argument(
        "--watch",
        type=text,
        required=True,
        help="a folder, glob or gs:// prefix to watch for new image files",
    )
    parser.add_argument(
        "--anchor",
        type=text,
        required=True,
        help="the anchor file; a newer file at this path is used from the next window on",
    )
    parser.add_argument(
        "--output",
        type=text,
        required=True,
        help="prefix of PREFIX-scores-<window>-*.parquet and PREFIX-errors-<window>-*.parquet",
    )
    parser.add_argument("--window_seconds", type=positive_float, default=60.0, help="length of a window")
    parser.add_argument(
        "--learn_real",
        type=text,
        default=None,
        help="a folder, glob or prefix of trusted real images: each window's are "
        "added to the anchor file (update without the guard)",
    )
    parser.add_argument(
        "--poll_seconds", type=positive_float, default=10.0, help="how often the watched locations are listed"
    )
    parser.add_argument(
        "--settle_seconds",
        type=non_negative_float,
        default=SETTLE_SECONDS,
        help="a file is read once its size and modification time have not changed for this long "
        "(a file copied in slowly is read once, whole)",
    )
    parser.add_argument(
        "--stop_after_seconds",
        type=positive_float,
        default=None,
        help="stop watching after this long (default: run until cancelled)",
    )
    parser.add_argument(
        "--pubsub_subscription",
        type=text,
        default=None,
        help="read Cloud Storage notifications (OBJECT_FINALIZE) from this Pub/Sub "
        "subscription instead of listing --watch (streaming runners, e.g. Dataflow)",
    )


def check_watched(watch: str, learn_real: str | None) -> None:
    """A local folder to watch must exist: Beam's watcher would fail on it without a word."""
    for flag, location in (("--watch", watch), ("--learn_real", learn_real)):
        path = Location.parse(location).local_path if location else None
        if path is None:  # none given, or gs:// (its bucket is checked with every path)
            continue
        folder = os.path.dirname(glob_prefix(path)) if has_glob(path) else path
        if not os.path.isdir(folder or "."):
            raise UsageError(f"{flag} {location}: no such folder (create it first, or watch another)")


def prepare(args, options) -> None:
    check_paths([args.watch, args.learn_real, args.anchor, args.output, args.weights])
    check_watched(args.watch, args.learn_real)
    check_writable(f"{args.output}-scores", "--output")
    if args.learn_real:
        check_writable(args.anchor, "--anchor (--learn_real writes it)")


def windows_locally(args, options, _) -> dict | None:
    """On a local runner, whose stages run one after the other, the driver watches and runs one
    bounded pipeline per window (pipelines/local_stream.py); a Pub/Sub subscription is read by
    the one streaming pipeline on any runner (None)."""
    return None if args.pubsub_subscription else run_local(args, options)


def graph(pipeline, args, options, _) -> None:
    """Watches until --stop_after_seconds (or for ever)."""
    start = Timestamp.now()
    stop = start + args.stop_after_seconds if args.stop_after_seconds else MAX_TIMESTAMP

    def watched(label: str, location: str):
        return pipeline | f"{label}Watch" >> MatchContinuously(
            watch_pattern(location),
            interval=args.poll_seconds,
            has_deduplication=False,
            start_timestamp=start,
            stop_timestamp=stop,
        )

    if args.pubsub_subscription:
        files = (
            pipeline
            | "Notifications"
            >> beam.io.ReadFromPubSub(subscription=args.pubsub_subscription, with_attributes=True)
            | "Uris" >> beam.Map(gcs_notification_uri)
            | "Finalised" >> beam.Filter(bool)
            | "Metadata" >> beam.Map(_notified)
        )
    else:
        files = watched("Images", args.watch)
    # One tick now, then one at each window's start: the file as it is then scores the window.
    window = args.window_seconds
    first_boundary = Timestamp.of(math.ceil(float(start) / window) * window)
    ticks = (
        pipeline
        | "FirstTick" >> beam.Create([args.anchor])
        | "AtStart" >> beam.Map(lambda uri: TimestampedValue(uri, start)),
        pipeline
        | "WindowStarts" >> PeriodicImpulse(first_boundary, stop, fire_interval=window)
        | "AnchorUri" >> beam.Map(lambda _: args.anchor),
    ) | "Ticks" >> beam.Flatten()
    learn = watched("Learn", args.learn_real) if args.learn_real else None
    stream_graph(args, options, files, ticks, learn)


def print_summary(summary: dict) -> None:
    print(
        f"stream      stopped after {summary['seconds']:.1f} s; windows written to "
        f"{summary['output']}-scores-*.parquet and {summary['output']}-errors-*.parquet\n"
        f"anchor      {reloads_text(summary['anchor_reloads_failed'])}"
    )


def _notified(uri: str):
    from apache_beam.io.filesystem import FileMetadata

    return FileMetadata(uri, 0, last_updated_in_seconds=0.0)


def stream_graph(args, options, files, ticks, learn=None) -> None:
    """The stream from its inputs: FileMetadata of polls (``files``), ticks carrying the anchor
    URI (``ticks``) and, optionally, FileMetadata of trusted real images (``learn``); tests
    feed these from a TestStream."""
    start = stream_start(args, options, args.anchor)
    references = ticks | "AnchorReferences" >> AnchorReferences(
        args.window_seconds, (args.anchor, start.anchor_id)
    )
    # Notifications come for finalised objects, which are whole: nothing to wait for.
    settle = 0.0 if args.pubsub_subscription else args.settle_seconds
    units = files | "NewImages" >> NewImages(args.window_seconds, settle)
    real = (
        learn | "NewReal" >> NewImages(args.window_seconds, args.settle_seconds)
        if learn is not None
        else None
    )
    scan_stream(
        units,
        start.steps,
        ScoreWindows(references),
        lambda table, schema: WriteWindowedParquet(args.output, table, schema),
        real,
        start.learning,
    )


COMMAND = BeamCommand(
    "stream",
    (command_flags, *image_flag_groups(perturbation=False)),
    prepare,
    tables=lambda args, _: [],  # each window's files are written whole, under names of their own
    graph=graph,
    summary=lambda args, _, counters: {
        "output": args.output,
        "anchor_reloads_failed": counters.get("anchor_reloads_failed", 0),
    },
    printed=print_summary,
    submitted=lambda args, _: {"output": args.output},
    local=windows_locally,
)
parser, run = COMMAND.parser, COMMAND.run
