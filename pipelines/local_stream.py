"""`anchorscan stream` on a local runner (docs/METHOD.md §10): the in-process runner runs a
pipeline's stages one after the other, so a streaming pipeline's windows would all be written
when the run ends, and a crash would lose every one. Here the driver watches instead: it lists
the watched locations every --poll_seconds, passes on each file once its size and modification
time have settled (``transforms.streaming.settled``), and when a window closes runs one bounded
pipeline over that window's files - read, decode, embed, score against the last good anchor,
write the window's tables atomically, learn from its trusted real images. A crash loses at most
the open window; every file read ends in exactly one table."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import IntervalWindow

from anchorscan.anchors import anchor_file
from anchorscan.anchors.io.registry import listable
from anchorscan.anchors.io.sources import Unit
from anchorscan.anchors.io.storage import read_checked_file, write_atomically
from anchorscan.anchors.io.uris import uri_text
from anchorscan.pipelines.common import StreamStart, stream_start
from anchorscan.pipelines.options import counter_totals
from anchorscan.transforms.scoring import ScoreFeatures
from anchorscan.transforms.streaming import (
    UNLOADABLE,
    Sighting,
    reloads_text,
    scan_stream,
    settled,
    watch_pattern,
    window_file_name,
    write_table,
)


class Watcher:
    """The files below a location (``pattern``, as MatchContinuously lists it) that a byte
    source reads, each passed on once per version when it has settled."""

    def __init__(self, pattern: str, settle: float):
        self.pattern, self.settle = pattern, settle
        self.sightings: dict[str, Sighting] = {}

    def poll(self, now: float) -> list[str]:
        try:
            found = FileSystems.match([self.pattern])[0].metadata_list
        except Exception as problem:  # the folder went away, storage hiccups: the next poll retries
            logging.warning("cannot list %s (%s): trying again at the next poll", self.pattern, problem)
            return []
        ready, present = [], set()
        for metadata in found:
            if not listable(metadata.path):
                continue
            present.add(metadata.path)
            sighting, read = settled(
                self.sightings.get(metadata.path),
                metadata.size_in_bytes,
                metadata.last_updated_in_seconds,
                now,
                self.settle,
            )
            self.sightings[metadata.path] = sighting
            if read:
                ready.append(metadata.path)
        for path in [
            path for path, sighting in self.sightings.items() if path not in present and not sighting.read
        ]:
            del self.sightings[path]  # gone before it settled
        return sorted(ready)

    def unsettled(self) -> int:
        return sum(not sighting.read for sighting in self.sightings.values())


class AnchorKeeper:
    """The anchor each window is scored with: the file at --anchor, verified at each window's
    start; where it cannot be read or verified, the last good one (its bytes kept in a private
    folder, so a replaced or damaged file never changes what a window is scored with)."""

    def __init__(self, uri: str, folder: str):
        self.uri, self.folder = uri, folder
        self.failures, self.problem = 0, ""
        self.current_id, self.path = "", ""
        self._keep(read_checked_file(uri))  # at start, a bad anchor is the user's to fix: exit 2

    def _keep(self, data: bytes) -> None:
        _, metadata = anchor_file.verified_contents(data, self.uri)
        self.current_id = anchor_file.anchor_id(metadata)
        self.path = os.path.join(self.folder, f"anchor-{self.current_id}.safetensors")
        if not os.path.exists(self.path):
            write_atomically(self.path, data)

    def refresh(self) -> None:
        try:
            self._keep(read_checked_file(self.uri))
        except UNLOADABLE as problem:
            self.failures += 1
            self.problem = str(problem)
            logging.warning(
                "anchor %s could not be reloaded (%s): still scoring with anchor %s",
                self.uri,
                problem,
                self.current_id,
            )


def window_of(when: float, seconds: float) -> IntervalWindow:
    start = math.floor(when / seconds) * seconds
    return IntervalWindow(start, start + seconds)


def run_local(args, options) -> dict:
    """Watches until --stop_after_seconds (or until interrupted), one bounded pipeline per
    window that has files; returns the run's summary."""
    started = time.time()
    stop = started + args.stop_after_seconds if args.stop_after_seconds else math.inf
    with tempfile.TemporaryDirectory(prefix="anchorscan-stream-") as folder:
        keeper = AnchorKeeper(args.anchor, folder)
        start = stream_start(args, options, keeper.path)
        watchers = [Watcher(watch_pattern(args.watch), args.settle_seconds)]
        if args.learn_real:
            watchers.append(Watcher(watch_pattern(args.learn_real), args.settle_seconds))
        totals = {"windows": 0, "images_scored": 0, "errors": 0, "learned": 0}
        window = window_of(started, args.window_seconds)
        # Each watcher's files in the open window, each once: a file rewritten after it was passed
        # on is read when the window closes, as it is then.
        pending: list[dict[str, None]] = [{} for _ in watchers]
        while True:
            now = time.time()
            for found, watcher in zip(pending, watchers):
                found.update(dict.fromkeys(watcher.poll(now)))
            if now >= float(window.end) or now >= stop:
                if any(pending):
                    files = [list(found) for found in pending]
                    counters = run_window(args, options, window, keeper.path, start, *files)
                    totals["windows"] += 1
                    totals["images_scored"] += counters.get("images_scored", 0)
                    totals["errors"] += sum(v for k, v in counters.items() if k.startswith("errors_"))
                    totals["learned"] += len(pending[1]) if len(pending) > 1 else 0
                pending = [{} for _ in watchers]
                if now >= stop:
                    break
                keeper.refresh()
                window = window_of(time.time(), args.window_seconds)
            time.sleep(max(0.0, min(args.poll_seconds, float(window.end) - time.time(), stop - time.time())))
        unsettled = sum(watcher.unsettled() for watcher in watchers)
    summary = {
        "output": args.output,
        "seconds": time.time() - started,
        **totals,
        "anchor_id": keeper.current_id,
        "anchor_reloads_failed": keeper.failures,
        "unsettled": unsettled,
    }
    print(
        f"stream      stopped after {summary['seconds']:.1f} s: {totals['windows']} windows written to "
        f"{args.output}-scores-*.parquet and {args.output}-errors-*.parquet\n"
        f"scored      {totals['images_scored']} images, {totals['errors']} errors"
        + (f"; {unsettled} files still changing at the end were not read" if unsettled else "")
        + f"\nanchor      {keeper.current_id}: {reloads_text(keeper.failures)}"
        + (f" (last: {keeper.problem})" if keeper.failures else "")
        + (
            f"\nlearned     {totals['learned']} trusted real images into {args.anchor}"
            if args.learn_real
            else ""
        )
    )
    return summary


def run_window(
    args, options, window, anchor_path: str, start: StreamStart, files: list[str], real=()
) -> dict:
    """One window's bounded pipeline, the stream's graph over the window's files: scored
    against the anchor at ``anchor_path``, its two tables written under the window's names, its
    trusted real images (``real``) learned into --anchor. Returns the run's counters."""
    pipeline = beam.Pipeline(options=options)
    units = pipeline | "Units" >> beam.Create([Unit(uri_text(path)) for path in files])
    real_units = None
    if real:
        real_units = pipeline | "RealUnits" >> beam.Create([Unit(uri_text(path)) for path in real])
    scan_stream(
        units,
        start.steps,
        ScoreFeatures(anchor_path),
        lambda table, schema: WriteWindowTable(window_file_name(args.output, table, window, 0), schema),
        real_units,
        start.learning,
    )
    result = pipeline.run()
    result.wait_until_finish()
    return counter_totals(result)


class WriteWindowTable(beam.PTransform):
    """All rows -> one Parquet file at ``path``, written atomically (none without rows)."""

    def __init__(self, path: str, schema):
        super().__init__()
        self.path, self.schema = path, schema

    def expand(self, rows):
        return (
            rows | "All" >> beam.combiners.ToList() | "Write" >> beam.Map(_write_rows, self.path, self.schema)
        )


def _write_rows(rows: list[dict], path: str, schema) -> str | None:
    if not rows:
        return None
    write_table(path, rows, schema)
    return path
