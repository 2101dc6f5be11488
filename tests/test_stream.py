"""anchorscan stream (docs/METHOD.md §10): windows, exactly-once scoring, the anchor swap and
learning, with TestStream on BundleBasedDirectRunner; and the real watcher on the in-process
runner while files are added. Every Parquet file written is read back whole (its footer
included): a probe once found corrupt windowed files."""

from __future__ import annotations

import dataclasses
import glob
import os
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystem import FileMetadata
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.testing import test_pipeline, test_stream
from apache_beam.transforms.window import TimestampedValue

from anchorscan.anchors.anchor_file import anchor_from_bytes, anchor_id, anchor_to_bytes, read_metadata
from anchorscan.anchors.tables import ERROR_SCHEMA, SCORE_SCHEMA
from anchorscan.pipelines import stream
from anchorscan.pipelines.options import parse
from helpers import RUNNER, write_crops

WINDOW = 10


def every_table(pattern: str, schema) -> dict[str, list[dict]]:
    """Rows of every file matching ``pattern``, each file read whole and checked."""
    tables = {}
    for path in sorted(glob.glob(pattern)):
        table = pq.read_table(path)  # reads the footer: a truncated file raises here
        assert table.schema.equals(schema, check_metadata=False), path
        tables[path] = table.to_pylist()
    return tables


def stream_events(events, watched, anchor, output, settle: float = 0.0):
    """The stream command's graph over a TestStream of "files" and "ticks" (anchor paths);
    returns the run's result (its counters)."""
    args, options = parse(
        stream.parser(),
        [
            "--watch",
            str(watched),
            "--anchor",
            str(anchor),
            "--output",
            str(output),
            "--window_seconds",
            str(WINDOW),
            "--settle_seconds",
            str(settle),
            "--runner",
            "BundleBasedDirectRunner",
        ],
    )
    options.view_as(StandardOptions).streaming = True
    pipeline = test_pipeline.TestPipeline(options=options)
    inputs = pipeline | events
    stream.stream_graph(args, options, inputs["files"], inputs["ticks"])
    result = pipeline.run()
    result.wait_until_finish()
    return result


@pytest.fixture(scope="module")
def two_anchors(fitted_anchor, tmp_path_factory):
    """The fitted anchor and a second one that differs (its fpr), so rows name which scored them."""
    path, _ = fitted_anchor
    anchor, metadata = anchor_from_bytes(path.read_bytes())
    folder = tmp_path_factory.mktemp("anchors")
    first, second = folder / "first.safetensors", folder / "second.safetensors"
    first.write_bytes(path.read_bytes())
    changed = dataclasses.replace(anchor, config=dataclasses.replace(anchor.config, fpr=0.05))
    second.write_bytes(anchor_to_bytes(changed, metadata["projection"]))
    return first, second


def test_three_windows_each_image_once_and_the_anchor_swap(two_anchors, tmp_path):
    first, second = two_anchors
    images = [
        FileMetadata(path, 1, last_updated_in_seconds=1.0)
        for path in write_crops(tmp_path, count_per_photo=1, seed=7)
    ]  # six images, two per window
    (tmp_path / "notes.txt").write_text("not an image")
    note = FileMetadata(str(tmp_path / "notes.txt"), 12, last_updated_in_seconds=1.0)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    broken_file = FileMetadata(str(broken), 11, last_updated_in_seconds=1.0)

    def at(t, *values):
        return [TimestampedValue(value, t) for value in values]

    events = (
        test_stream.TestStream(output_tags={"files", "ticks"})
        .advance_watermark_to(0, tag="files")
        .advance_watermark_to(0, tag="ticks")
        .add_elements(at(0, str(first)), tag="ticks")
        .add_elements(at(1, images[0], images[1], note), tag="files")
        .add_elements(at(2, images[0], images[1]), tag="files")  # a re-listing poll
        .add_elements(at(5, str(second)), tag="ticks")  # replaced mid-window 0 ...
        .advance_watermark_to(WINDOW, tag="files")
        .advance_watermark_to(WINDOW, tag="ticks")
        .add_elements(at(WINDOW, str(second)), tag="ticks")  # ... seen from window 1 on
        .add_elements(at(WINDOW + 1, images[0], images[2], images[3], broken_file), tag="files")
        .advance_watermark_to(2 * WINDOW, tag="files")
        .advance_watermark_to(2 * WINDOW, tag="ticks")
        .add_elements(at(2 * WINDOW, str(second)), tag="ticks")
        .add_elements(at(2 * WINDOW + 1, *images), tag="files")
        .advance_watermark_to_infinity(tag="files")
        .advance_watermark_to_infinity(tag="ticks")
    )
    output = tmp_path / "out" / "scan"
    # window 0's tick is the first file's, read at the window's start; the swap at t=5
    # is a tick inside window 0 in event time only to show that the window's *first* tick
    # is not what decides: Latest takes the newest tick of the window
    stream_events(events, tmp_path, first, output)

    scores = every_table(f"{output}-scores-*.parquet", SCORE_SCHEMA)
    errors = every_table(f"{output}-errors-*.parquet", ERROR_SCHEMA)
    rows = [row for table in scores.values() for row in table]
    assert sorted(row["uri"] for row in rows) == sorted(m.path for m in images)  # each once
    assert len(scores) == 3  # one file per window
    ids = {str(path): anchor_id(read_metadata(path.read_bytes())) for path in (first, second)}
    by_window = [sorted(row["anchor_id"] for row in table) for _, table in sorted(scores.items())]
    assert by_window == [[ids[str(second)]] * 2] * 3
    assert [row["uri"] for table in errors.values() for row in table] == [str(broken)]


def test_an_anchor_tick_decides_its_window(two_anchors, tmp_path):
    """A replacement is read by the next window's tick; windows before it keep the old file."""
    first, second = two_anchors
    images = [
        FileMetadata(path, 1, last_updated_in_seconds=1.0)
        for path in write_crops(tmp_path, count_per_photo=1, seed=8)[:4]
    ]
    events = (
        test_stream.TestStream(output_tags={"files", "ticks"})
        .advance_watermark_to(0, tag="files")
        .advance_watermark_to(0, tag="ticks")
        .add_elements([TimestampedValue(str(first), 0)], tag="ticks")
        .add_elements([TimestampedValue(images[0], 1), TimestampedValue(images[1], 9)], tag="files")
        .advance_watermark_to(WINDOW, tag="files")
        .advance_watermark_to(WINDOW, tag="ticks")
        .add_elements([TimestampedValue(str(second), WINDOW)], tag="ticks")
        .add_elements(
            [TimestampedValue(images[2], WINDOW + 1), TimestampedValue(images[3], WINDOW + 2)], tag="files"
        )
        .advance_watermark_to_infinity(tag="files")
        .advance_watermark_to_infinity(tag="ticks")
    )
    output = tmp_path / "scan"
    stream_events(events, tmp_path, first, output)
    ids = {path: anchor_id(read_metadata(path.read_bytes())) for path in (first, second)}
    rows = {
        row["uri"]: row["anchor_id"]
        for table in every_table(f"{output}-scores-*.parquet", SCORE_SCHEMA).values()
        for row in table
    }
    assert rows == {
        images[0].path: ids[first],
        images[1].path: ids[first],
        images[2].path: ids[second],
        images[3].path: ids[second],
    }


def test_the_watcher_scores_files_added_while_it_runs_and_learns(two_anchors, tmp_path):
    first, _ = two_anchors
    watched, trusted = tmp_path / "incoming", tmp_path / "trusted"
    watched.mkdir()
    trusted.mkdir()
    anchor = tmp_path / "live.safetensors"
    anchor.write_bytes(first.read_bytes())
    n_before = read_metadata(anchor.read_bytes())["n"]
    early = write_crops(watched, count_per_photo=1, seed=9)
    (tmp_path / "late").mkdir()
    (tmp_path / "real").mkdir()
    late = write_crops(tmp_path / "late", count_per_photo=1, seed=10)[:3]
    real = write_crops(tmp_path / "real", count_per_photo=2, seed=11)[:8]

    def add_files():
        time.sleep(3.0)
        for path in late:  # renamed in, as writers should: a file appears whole
            os.replace(path, watched / f"late_{os.path.basename(path)}")
        for path in real:
            os.replace(path, trusted / os.path.basename(path))

    adder = threading.Thread(target=add_files)
    adder.start()
    output = tmp_path / "out" / "scan"
    stream.run(
        [
            "--watch",
            str(watched),
            "--anchor",
            str(anchor),
            "--output",
            str(output),
            "--window_seconds",
            "2",
            "--poll_seconds",
            "0.5",
            "--stop_after_seconds",
            "7",
            "--settle_seconds",
            "0",  # renamed in: whole at once
            "--learn_real",
            str(trusted),
            *RUNNER,
        ]
    )
    adder.join()
    rows = [
        row for table in every_table(f"{output}-scores-*.parquet", SCORE_SCHEMA).values() for row in table
    ]
    expected = sorted(early + [str(watched / f"late_{os.path.basename(path)}") for path in late])
    assert sorted(row["uri"] for row in rows) == expected  # the added ones too, each once
    assert not every_table(f"{output}-errors-*.parquet", ERROR_SCHEMA)
    after = read_metadata(anchor.read_bytes())
    assert after["n"] + after["n_calibration"] > n_before + read_metadata(first.read_bytes())["n_calibration"]
    assert after["n"] + after["n_calibration"] <= n_before + read_metadata(first.read_bytes())[
        "n_calibration"
    ] + len(real)


def test_cloud_storage_notifications_name_finalised_objects():
    from apache_beam.io.gcp.pubsub import PubsubMessage

    from anchorscan.transforms.streaming import gcs_notification_uri

    finalised = PubsubMessage(
        b"{}", {"eventType": "OBJECT_FINALIZE", "bucketId": "b", "objectId": "in/x.jpg"}
    )
    deleted = PubsubMessage(b"{}", {"eventType": "OBJECT_DELETE", "bucketId": "b", "objectId": "in/x.jpg"})
    assert gcs_notification_uri(finalised) == "gs://b/in/x.jpg"
    assert gcs_notification_uri(deleted) is None


def test_watch_pattern_and_window_file_names():
    from apache_beam.transforms.window import IntervalWindow

    from anchorscan.transforms.streaming import watch_pattern, window_file_name

    assert watch_pattern("gs://bucket/incoming/") == "gs://bucket/incoming/**"
    assert watch_pattern("/data/*.jpg") == "/data/*.jpg"
    assert (
        window_file_name("out/scan", "scores", IntervalWindow(60, 120), 0)
        == "out/scan-scores-19700101T000100-19700101T000200-00000.parquet"
    )


# --- the stream keeps going and keeps everything (issue #20) ---------------------------------------


def test_a_file_is_read_once_its_size_and_mtime_have_settled():
    from anchorscan.transforms.streaming import settled

    sighting, read = None, []
    # a file copied in slowly: it grows for three polls, then stays put
    for now, size, mtime in [
        (0, 10, 1.0),
        (1, 20, 2.0),
        (2, 30, 3.0),
        (3, 30, 3.0),
        (4, 30, 3.0),
        (5, 30, 3.0),
        (9, 30, 3.0),
    ]:
        sighting, now_read = settled(sighting, size, mtime, now, settle=2.0)
        read.append(now_read)
    assert read == [False, False, False, False, True, False, False]  # once, two seconds after its last change
    sighting, again = settled(sighting, 31, 10.0, 10, settle=2.0)  # rewritten: a new version
    assert not again and settled(sighting, 31, 10.0, 12, settle=2.0)[1]
    assert settled(None, 5, 1.0, 0, settle=0.0)[1]  # no settle interval: read at first sight


def test_a_slowly_written_file_is_scored_once_and_a_corrupt_anchor_keeps_the_last_good_one(
    two_anchors, tmp_path, caplog
):

    first, _ = two_anchors
    [image] = write_crops(tmp_path, count_per_photo=1, seed=12)[:1]
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(first.read_bytes()[: len(first.read_bytes()) // 2])  # truncated mid-copy
    growing = [FileMetadata(image, size, last_updated_in_seconds=float(size)) for size in (100, 200, 300)]
    whole = FileMetadata(image, os.path.getsize(image), last_updated_in_seconds=400.0)

    def at(t, *values):
        return [TimestampedValue(value, t) for value in values]

    events = (
        test_stream.TestStream(output_tags={"files", "ticks"})
        .advance_watermark_to(0, tag="files")
        .advance_watermark_to(0, tag="ticks")
        .add_elements(at(0, str(first)), tag="ticks")
        .add_elements(at(1, growing[0]), tag="files")
        .add_elements(at(2, growing[1]), tag="files")
        .add_elements(at(3, growing[2]), tag="files")
        .add_elements(at(4, whole), tag="files")
        .add_elements(at(5, whole), tag="files")  # unchanged for 1 s: not yet
        .advance_watermark_to(WINDOW, tag="files")
        .advance_watermark_to(WINDOW, tag="ticks")
        .add_elements(at(WINDOW, str(corrupt)), tag="ticks")  # the anchor file, damaged
        .add_elements(at(WINDOW + 1, whole), tag="files")  # unchanged for 7 s: read now
        .add_elements(at(WINDOW + 2, whole), tag="files")
        .advance_watermark_to_infinity(tag="files")
        .advance_watermark_to_infinity(tag="ticks")
    )
    output = tmp_path / "out" / "scan"
    stream_events(events, tmp_path, first, output, settle=3.0)
    rows = [
        row for table in every_table(f"{output}-scores-*.parquet", SCORE_SCHEMA).values() for row in table
    ]
    assert [row["uri"] for row in rows] == [image]  # once, whole: no error rows for its halves
    assert not glob.glob(f"{output}-errors-*.parquet")
    assert rows[0]["anchor_id"] == anchor_id(read_metadata(first.read_bytes()))  # the last good anchor
    assert (
        f"anchor {corrupt} could not be reloaded" in caplog.text
        and "still scoring with anchor" in caplog.text
    )


def test_the_local_stream_keeps_the_last_good_anchor_and_reads_a_slow_file_once(
    two_anchors, tmp_path, capsys
):
    first, _ = two_anchors
    watched = tmp_path / "incoming"
    watched.mkdir()
    anchor = tmp_path / "live.safetensors"
    anchor.write_bytes(first.read_bytes())
    early = write_crops(watched, count_per_photo=1, seed=13)
    (tmp_path / "src").mkdir()
    source = write_crops(tmp_path / "src", count_per_photo=1, seed=14)[0]
    slow = watched / ("slow_" + os.path.basename(source))
    written = threading.Event()

    def damage_and_copy_slowly():
        time.sleep(1.0)
        anchor.write_bytes(b"not an anchor any more")  # replaced in place, damaged
        data = Path(source).read_bytes()
        with open(slow, "wb") as handle:  # copied in over about three seconds
            for start in range(0, len(data), len(data) // 6 + 1):
                handle.write(data[start : start + len(data) // 6 + 1])
                handle.flush()
                time.sleep(0.5)
        written.set()

    writer = threading.Thread(target=damage_and_copy_slowly)
    writer.start()
    output = tmp_path / "out" / "scan"
    summary = stream.run(
        [
            "--watch", str(watched), "--anchor", str(anchor), "--output", str(output),
            "--window_seconds", "3", "--poll_seconds", "0.3", "--settle_seconds", "1",
            "--stop_after_seconds", "12", *RUNNER,
        ]
    )  # fmt: skip
    writer.join()
    assert written.is_set()
    rows = [
        row for table in every_table(f"{output}-scores-*.parquet", SCORE_SCHEMA).values() for row in table
    ]
    assert sorted(row["uri"] for row in rows) == sorted([*early, str(slow)])  # each once; the slow one whole
    assert not glob.glob(f"{output}-errors-*.parquet")
    assert {row["anchor_id"] for row in rows} == {anchor_id(read_metadata(first.read_bytes()))}
    assert summary["anchor_reloads_failed"] >= 1
    assert "reloads failed" in capsys.readouterr().out


def test_a_crash_loses_at_most_the_open_window(two_anchors, tmp_path):
    import signal
    import subprocess
    import sys

    first, _ = two_anchors
    watched = tmp_path / "incoming"
    watched.mkdir()
    early = write_crops(watched, count_per_photo=1, seed=15)
    output = tmp_path / "out" / "scan"
    command = [
        sys.executable, "-m", "anchorscan.pipelines.cli", "stream", "--watch", str(watched),
        "--anchor", str(first), "--output", str(output), "--window_seconds", "2", "--poll_seconds", "0.3",
        "--settle_seconds", "0", *RUNNER,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240  # model loading on a loaded 2-core machine, with margin
        while not glob.glob(f"{output}-scores-*.parquet") and time.monotonic() < deadline:
            assert process.poll() is None, "the stream ended by itself"
            time.sleep(0.2)
        late = write_crops(tmp_path, count_per_photo=1, seed=16)[0]
        os.replace(late, watched / "late.png")  # in the window that is open when the stream dies
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    tables = every_table(f"{output}-scores-*.parquet", SCORE_SCHEMA)  # each read whole
    assert sorted(row["uri"] for table in tables.values() for row in table) == sorted(early)


def test_a_file_rewritten_within_its_window_is_scored_once_there(two_anchors, tmp_path):
    """Polls that see a file, then its rewrite (a new version), in one window: one row for it
    in that window; a version in the next window is that window's."""
    first, _ = two_anchors
    image, other = write_crops(tmp_path, count_per_photo=1, seed=21)[:2]
    versions = [FileMetadata(image, 10, last_updated_in_seconds=mtime) for mtime in (1.0, 2.0, 3.0)]

    def at(t, *values):
        return [TimestampedValue(value, t) for value in values]

    events = (
        test_stream.TestStream(output_tags={"files", "ticks"})
        .advance_watermark_to(0, tag="files")
        .advance_watermark_to(0, tag="ticks")
        .add_elements(at(0, str(first)), tag="ticks")
        .add_elements(at(1, versions[0], FileMetadata(other, 10, last_updated_in_seconds=1.0)), tag="files")
        .add_elements(at(2, versions[1]), tag="files")  # rewritten after it was passed on
        .add_elements(at(3, versions[2]), tag="files")  # and again
        .advance_watermark_to(WINDOW, tag="files")
        .advance_watermark_to(WINDOW, tag="ticks")
        .add_elements(at(WINDOW, str(first)), tag="ticks")
        .add_elements(at(WINDOW + 1, FileMetadata(image, 10, last_updated_in_seconds=4.0)), tag="files")
        .advance_watermark_to_infinity(tag="files")
        .advance_watermark_to_infinity(tag="ticks")
    )
    output = tmp_path / "out" / "scan"
    stream_events(events, tmp_path, first, output)
    scores = every_table(f"{output}-scores-*.parquet", SCORE_SCHEMA)
    by_window = [sorted(row["uri"] for row in table) for _, table in sorted(scores.items())]
    assert by_window == [sorted([image, other]), [image]]


class FakeClock:
    """time.time and time.sleep for the local stream's driver: each sleep moves the clock on and
    runs the events due by then (no waiting; the driver sees them at its next poll)."""

    def __init__(self, start: float, events: list):
        self.now, self.events = start, sorted(events, key=lambda event: event[0])

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 1e-3)
        while self.events and self.events[0][0] <= self.now:
            self.events.pop(0)[1]()


def test_the_local_stream_scores_a_file_rewritten_within_its_window_once(two_anchors, tmp_path, monkeypatch):
    from anchorscan.pipelines import local_stream

    first, _ = two_anchors
    watched = tmp_path / "incoming"
    watched.mkdir()
    images = write_crops(watched, count_per_photo=1, seed=22)
    start = 3000.0  # a window's start, on the driver's clock
    rewritten = []

    def rewrite():  # after the polls passed it on (settled at start + 1): a new version
        os.utime(images[0], (os.path.getmtime(images[0]) + 60,) * 2)
        rewritten.append(True)

    clock = FakeClock(start, [(start + 1.6, rewrite)])
    monkeypatch.setattr(local_stream, "time", clock)
    output = tmp_path / "out" / "scan"
    stream.run(
        [
            "--watch", str(watched), "--anchor", str(first), "--output", str(output),
            "--window_seconds", "3", "--poll_seconds", "0.3", "--settle_seconds", "1",
            "--stop_after_seconds", "3", *RUNNER,
        ]
    )  # fmt: skip
    assert rewritten
    rows = [
        row for table in every_table(f"{output}-scores-*.parquet", SCORE_SCHEMA).values() for row in table
    ]
    assert sorted(row["uri"] for row in rows) == sorted(images)  # each once, the rewritten one too
