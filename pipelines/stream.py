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
import time

import apache_beam as beam
from apache_beam.io.fileio import MatchContinuously
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.transforms.periodicsequence import PeriodicImpulse
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp

from anchorscan.anchors.anchor import AnchorConfig
from anchorscan.anchors.anchor_file import anchor_id, verified_contents
from anchorscan.anchors.errors import UsageError
from anchorscan.anchors.io.gcs import check_paths
from anchorscan.anchors.io.storage import check_writable, read_checked_file
from anchorscan.anchors.io.uris import glob_prefix, has_glob, local_path
from anchorscan.anchors.softness import softened
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.anchors.tables import ERROR_SCHEMA, SCORE_SCHEMA
from anchorscan.pipelines.common import chain_steps, driver_extractor
from anchorscan.pipelines.flags import command_parser, non_negative_float, positive_float, text
from anchorscan.pipelines.local_stream import run_local
from anchorscan.pipelines.options import (
    LOCAL_RUNNERS,
    add_decoding_args,
    add_http_args,
    add_runtime_args,
    backbone_config,
    counter_totals,
    parse,
)
from anchorscan.transforms.chain import EmbedUnits
from anchorscan.transforms.fitting import anchor_layout
from anchorscan.transforms.streaming import (
    SETTLE_SECONDS,
    AnchorReferences,
    LearnReal,
    NewImages,
    ScoreWindows,
    WriteWindowedParquet,
    gcs_notification_uri,
    reloads_text,
    watch_pattern,
)


def parser():
    parser = command_parser("stream")
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
    add_runtime_args(parser)
    add_decoding_args(parser, perturbation=False)
    add_http_args(parser)
    return parser


def check_watched(watch: str, learn_real: str | None) -> None:
    """A local folder to watch must exist: Beam's watcher would fail on it without a word."""
    for flag, location in (("--watch", watch), ("--learn_real", learn_real)):
        path = local_path(location) if location else None
        if path is None:  # none given, or gs:// (its bucket is checked with every path)
            continue
        folder = os.path.dirname(glob_prefix(path)) if has_glob(path) else path
        if not os.path.isdir(folder or "."):
            raise UsageError(f"{flag} {location}: no such folder (create it first, or watch another)")


def run(argv=None, test_pipeline=None, wait: bool = True) -> dict:
    """Watches until --stop_after_seconds (or for ever); ``wait=False`` (a Flex template's
    launcher) returns once the streaming job is submitted."""
    args, options = parse(parser(), argv)
    check_paths([args.watch, args.learn_real, args.anchor, args.output, args.weights])
    check_watched(args.watch, args.learn_real)
    check_writable(f"{args.output}-scores", "--output")
    if args.learn_real:
        check_writable(args.anchor, "--anchor (--learn_real writes it)")
    runner = str(options.view_as(StandardOptions).runner)
    if test_pipeline is None and runner in LOCAL_RUNNERS and not args.pubsub_subscription:
        return run_local(args, options)
    pipeline = test_pipeline or beam.Pipeline(options=options)
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
    started = time.time()
    result = pipeline.run()
    if not wait:
        return {"output": args.output}
    result.wait_until_finish()
    counters = counter_totals(result)
    summary = {
        "output": args.output,
        "seconds": time.time() - started,
        "anchor_reloads_failed": counters.get("anchor_reloads_failed", 0),
    }
    print(
        f"stream      stopped after {summary['seconds']:.1f} s; windows written to "
        f"{args.output}-scores-*.parquet and {args.output}-errors-*.parquet\n"
        f"anchor      {reloads_text(summary['anchor_reloads_failed'])}"
    )
    return summary


def _notified(uri: str):
    from apache_beam.io.filesystem import FileMetadata

    return FileMetadata(uri, 0, last_updated_in_seconds=0.0)


def stream_graph(args, options, files, ticks, learn=None) -> None:
    """The stream from its inputs: FileMetadata of polls (``files``), ticks carrying the anchor
    URI (``ticks``) and, optionally, FileMetadata of trusted real images (``learn``); tests
    feed these from a TestStream."""
    tensors, metadata = verified_contents(read_checked_file(args.anchor), args.anchor)
    spec, config = FeatureSpec.from_dict(metadata), AnchorConfig.from_dict(metadata["config"])
    backbone = backbone_config(args, spec)
    extractor = driver_extractor(backbone)
    spec.require_same(extractor.spec, f"anchor {args.anchor}")
    steps = chain_steps(args, options, backbone, extractor)
    initial = (args.anchor, anchor_id(metadata))
    references = ticks | "AnchorReferences" >> AnchorReferences(args.window_seconds, initial)
    # Notifications come for finalised objects, which are whole: nothing to wait for.
    settle = 0.0 if args.pubsub_subscription else args.settle_seconds
    scanned = files | "NewImages" >> NewImages(args.window_seconds, settle) | "Features" >> EmbedUnits(steps)
    rows, score_errors = scanned.embedded | "Score" >> ScoreWindows(references)
    _ = rows | "WriteScores" >> WriteWindowedParquet(args.output, "scores", SCORE_SCHEMA)
    errors = [*scanned.errors, score_errors]
    if learn is not None:
        real = (
            learn
            | "NewReal" >> NewImages(args.window_seconds, args.settle_seconds)
            | "RealFeatures" >> EmbedUnits(steps.for_fitting(softened(config.forensic_levels)))
        )
        _ = real.embedded | "LearnReal" >> LearnReal(
            args.anchor, anchor_layout(spec, config), tensors.get("projection")
        )
        errors += real.errors
    _ = (
        tuple(errors)
        | "Errors" >> beam.Flatten()
        | "WriteErrors" >> WriteWindowedParquet(args.output, "errors", ERROR_SCHEMA)
    )
