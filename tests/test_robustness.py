"""Nothing lost, nothing crashes, nothing hangs: one scan of every hostile kind at once on both
local runners, exactly-once accounting, retries, resumed scans."""

from __future__ import annotations

import os
import pathlib
import select
import subprocess
import sys
import threading
import time
import uuid

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from PIL import Image

from anchorscan.anchors import anchor as anchor_module
from anchorscan.anchors.images.decode import DecodeError, decode_and_crop
from anchorscan.anchors.io import sources
from anchorscan.anchors.io.sources import ReadLimits, Unit
from anchorscan.pipelines import score
from anchorscan.transforms.read import ReadFn
from helpers import RUNNER, read_parquet_rows, write_crops
from hostile import HOSTILE, SLOW, slow_jpeg, write_hostile


def outputs(prefix):
    scores = read_parquet_rows(f"{prefix}-scores-*.parquet")
    errors = read_parquet_rows(f"{prefix}-errors-*.parquet")
    return scores, errors


def assert_exactly_once(scores, errors, expected_uris):
    uris = [row["uri"] for row in scores] + [row["uri"] for row in errors]
    assert len(uris) == len(set(uris)), "a URI appears twice"
    assert set(uris) == set(expected_uris)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_kind_has_its_documented_outcome(name):
    make, (outcome, words) = HOSTILE[name]
    if outcome == "scored":
        crop = decode_and_crop(make(), 224)
        assert crop.pixels.shape == (224, 224, 3) and crop.pixels.dtype == np.uint8
        assert words in crop.preprocess
    else:
        with pytest.raises(DecodeError, match=words):
            decode_and_crop(make(), 224)


def test_sixteen_bit_png_keeps_its_picture():
    from hostile import _photo, png_rgb16

    photo = _photo()
    crop = decode_and_crop(png_rgb16(photo.astype(np.uint16) * 257), 224)
    top, left = (photo.shape[0] - 224) // 2, (photo.shape[1] - 224) // 2
    np.testing.assert_array_equal(crop.pixels, photo[top : top + 224, left : left + 224])


MULTI_PROCESS = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
RUNNERS = {"in_process": [], "multi_process": MULTI_PROCESS}
DECODE_TIMEOUT, MAX_BYTES = 3, 600 * 1024
# Everything below, on 2 shared cores, scans in about a minute; a hang never ends.
SCAN_BOUND_SECONDS = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One folder that holds every hostile kind at once among 500 mixed files (small real crops
    and broken files), and the inputs that are not files of a folder: a manifest naming a file
    removed after it was written and blank URIs, an empty manifest, a header-only one and an
    unmatched pattern given twice. Returns (the --input values, URI -> expected outcome)."""
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "scan"
    folder.mkdir()
    expected = write_hostile(folder)
    for name, make in SLOW.items():
        (folder / name).write_bytes(make())
        expected[str(folder / name)] = ("decode", f"--decode_timeout {DECODE_TIMEOUT} s")
    noise = np.random.default_rng(2).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "big.png")  # ~1 MB of noise: over --max_bytes
    expected[str(folder / "big.png")] = ("read", f"larger than --max_bytes {MAX_BYTES:,}")

    photo = np.asarray(Image.open(write_crops(root, 1, size=(280, 280))[0]))
    broken = [(make, outcome) for make, outcome in HOSTILE.values() if outcome[0] != "scored"]
    rng = np.random.default_rng(0)
    for i in range(500):
        if i % 10 == 0:
            make, outcome = broken[(i // 10) % len(broken)]
            (folder / f"broken{i:03d}.jpg").write_bytes(make())
            expected[str(folder / f"broken{i:03d}.jpg")] = outcome
            continue
        top, left = rng.integers(0, 280 - 48, 2)
        Image.fromarray(photo[top : top + 48, left : left + 48]).save(folder / f"crop{i:03d}.png")
        expected[str(folder / f"crop{i:03d}.png")] = ("scored", "upscale+center_crop")

    removed = folder / "removed-after-listing.jpg"
    manifest = root / "list.csv"
    manifest.write_text(
        f"uri,label\n{folder / 'crop001.png'},real\n,real\n{removed},real\n   ,fake\n"
        f"{folder / 'folder.jpg'},real\n"
    )
    expected[str(removed)] = ("read", "file not found (removed after it was listed?)")
    expected[str(folder / "folder.jpg")] = ("read", "is a directory, not a file")
    for row in (2, 4):
        expected[f"{manifest}#row={row}"] = ("list", f"row {row} of the manifest (line {row + 1}) has no uri")
    (root / "empty.txt").write_text("")
    (root / "header.csv").write_text("uri,label\n")
    for empty in ("empty.txt", "header.csv"):
        expected[str(root / empty)] = ("list", "the manifest lists no images")
    unmatched = str(root / "nothing-*.webp")
    expected[unmatched] = ("list", "no files match this input")
    inputs = [
        str(folder),
        str(manifest),
        str(root / "empty.txt"),
        str(root / "header.csv"),
        unmatched,
        unmatched,
    ]
    return inputs, expected


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_folder_of_every_hostile_kind_scans_in_bounded_time_with_each_input_once(
    fitted_anchor, corpus, tmp_path, runner
):
    anchor, _ = fitted_anchor
    inputs, expected = corpus
    prefix = str(tmp_path / "out")
    started = time.monotonic()
    summary = score.run(
        [flag for value in inputs for flag in ("--input", value)]
        + [
            "--anchor",
            str(anchor),
            "--output",
            prefix,
            "--batch_size",
            "64",
            "--decode_timeout",
            str(DECODE_TIMEOUT),
            "--max_bytes",
            str(MAX_BYTES),
            *RUNNER,
            *RUNNERS[runner],
        ]
    )
    assert time.monotonic() - started < SCAN_BOUND_SECONDS

    scores, errors = outputs(prefix)
    assert_exactly_once(scores, errors, expected)
    rows = {row["uri"]: row for row in scores + errors}
    for uri, (outcome, words) in expected.items():
        row = rows[uri]
        if outcome == "scored":
            assert "score" in row and words in row["preprocess"] and np.isfinite(row["score"]), row
        else:
            assert row["stage"] == outcome and words in row["error"], row
    assert summary["scored"] == len(scores) == sum(o == "scored" for o, _ in expected.values())
    folder = inputs[0]
    assert {
        name: rows[f"{folder}/{name}"]["error_type"]
        for name in ("slow-a.jpg", "multipage-cut.tif", "pipe.jpg", "dangling.jpg")
    } == {
        "slow-a.jpg": "TimeoutError",
        "multipage-cut.tif": "TypeError",
        "pipe.jpg": "ReadError",
        "dangling.jpg": "FileNotFoundError",
    }
    screen = rows[f"{folder}/large-screen.gif"]
    assert (screen["width"], screen["height"]) == (300, 260)  # the frame, not the 10,000 px screen


def test_a_file_that_cannot_be_read_for_permissions_is_an_error_row(tmp_path, monkeypatch):
    # The suite runs as root, for whom chmod cannot deny a read: the denial is simulated, so
    # this runs in-process only.
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(b"")
    real_read = sources._read_local

    def denied(path, max_bytes):
        if path == str(locked):
            raise PermissionError(13, "Permission denied", path)
        return real_read(path, max_bytes)

    monkeypatch.setattr(sources, "_read_local", denied)
    read = ReadFn(ReadLimits())
    read.setup()
    [output] = list(read.process(Unit(str(locked))))
    assert (output.value["stage"], output.value["error"], output.value["error_type"]) == (
        "read",
        "permission denied",
        "PermissionError",
    )


MARK = "ANCHORSCAN_TEST_RUN"


def processes_marked(mark: str) -> list[int]:
    """Processes whose environment carries ``MARK=mark`` (a scan and every child it started)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if f"{MARK}={mark}".encode() in handle.read().split(b"\0"):
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def decoders_marked(mark: str) -> list[int]:
    """The decoder processes among ``processes_marked`` (not the short-lived programs a process
    runs while it starts, such as the library lookups behind the libturbojpeg warning)."""
    decoders = []
    for pid in processes_marked(mark):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"anchorscan.anchors.images.decoder_pool" in handle.read().split(b"\0"):
                    decoders.append(pid)
        except OSError:
            continue
    return decoders


# Decodes the file named by argv[1] as a scan does; a stuck file keeps it busy for minutes.
DECODE_STUCK_FILE = (
    "import sys; from anchorscan.anchors.images.decode import decode_and_crop; "
    "decode_and_crop(open(sys.argv[1], 'rb').read(), 224)"
)


def exits_before(pid: int, rival: int) -> bool:
    """Waits until process ``pid`` or process ``rival`` exits (a process's pidfd becomes
    readable when it ends); whether ``pid`` ended while ``rival`` still runs."""
    try:
        ours = os.pidfd_open(pid)
    except ProcessLookupError:  # ended already
        ours = None
    theirs = os.pidfd_open(rival)
    try:
        if ours is not None:
            select.select([ours, theirs], [], [])
        return not select.select([theirs], [], [], 0)[0]
    finally:
        os.close(theirs)
        if ours is not None:
            os.close(ours)


def test_a_stuck_decode_neither_delays_the_exit_nor_outlives_the_scan(fitted_anchor, tmp_path):
    anchor, _ = fitted_anchor
    folder = tmp_path / "in"
    folder.mkdir()
    write_crops(folder, count_per_photo=1, seed=6)
    for name in ("slow-a.jpg", "slow-b.jpg", "slow-c.jpg"):
        (folder / name).write_bytes(slow_jpeg())
    mark = uuid.uuid4().hex
    command = [
        sys.executable,
        "-m",
        "anchorscan.pipelines.cli",
        "score",
        "--input",
        str(folder),
        "--anchor",
        str(anchor),
        "--output",
        str(tmp_path / "out"),
        "--decode_timeout",
        "2",
        "--decode_processes",
        "2",
        *RUNNER,
    ]
    # The stuck file decoded once from the moment the scan starts: a decode that held the exit (one
    # once held it 108 s) began later in the scan, so it would end after this one. A loaded
    # machine slows this decode and the scan alike: no margin of seconds is needed.
    stuck = subprocess.Popen([sys.executable, "-c", DECODE_STUCK_FILE, str(folder / "slow-a.jpg")])
    try:
        with open(tmp_path / "summary.txt", "w") as summary:
            scan_process = subprocess.Popen(command, stdout=summary, env={**os.environ, MARK: mark})
        counts = []

        def count_decoders():
            while scan_process.poll() is None:
                counts.append(len(decoders_marked(mark)))
                time.sleep(0.1)

        sampler = threading.Thread(target=count_decoders)
        sampler.start()
        assert exits_before(scan_process.pid, stuck.pid)  # the scan ended while the stuck decode runs
        sampler.join()
        assert scan_process.wait() == 0 and "output" in (tmp_path / "summary.txt").read_text()
        # So did every process the scan started (a decoder notices its parent's exit within a second).
        while left := processes_marked(mark):
            assert exits_before(left[0], stuck.pid), left
    finally:
        stuck.kill()
        stuck.wait()
    assert max(counts) == 2  # never more decoder processes at once than --decode_processes
    errors = read_parquet_rows(str(tmp_path / "out-errors-*.parquet"))
    assert sorted(row["error_type"] for row in errors) == ["TimeoutError"] * 3


def test_a_retried_bundle_writes_no_duplicate_rows(fitted_anchor, corpus, tmp_path, monkeypatch):
    anchor, _ = fitted_anchor
    _, expected = corpus
    uris = sorted(uri for uri in expected if "/crop" in uri or "/broken" in uri)
    real_score = anchor_module.Anchor.assess
    calls = {"n": 0}

    def flaky_score(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("transient failure injected by the test")
        return real_score(self, *args, **kwargs)

    monkeypatch.setattr(anchor_module.Anchor, "assess", flaky_score)
    prefix = str(tmp_path / "out")
    subset = tmp_path / "subset.txt"
    subset.write_text("\n".join(uris[:120]))
    score.run(
        [
            "--input",
            str(subset),
            "--anchor",
            str(anchor),
            "--output",
            prefix,
            "--runner",
            "BundleBasedDirectRunner",
        ]
    )
    scores, errors = outputs(prefix)
    assert calls["n"] > 2  # the failure happened and the runner went on
    assert_exactly_once(scores, errors, uris[:120])


def test_resumed_scan_reuses_rows_and_scores_only_new_content(fitted_anchor, tmp_path):
    anchor, _ = fitted_anchor
    night1, night2 = tmp_path / "night1", tmp_path / "night2"
    night1.mkdir()
    night2.mkdir()
    old = write_crops(night1, 1, seed=7)
    for path in old:  # the same content, now at other URIs, plus new images
        (night2 / ("copy-" + path.rsplit("/", 1)[1])).write_bytes(pathlib.Path(path).read_bytes())
    new = write_crops(night2, 1, seed=8)
    score.run(["--input", str(night1), "--anchor", str(anchor), "--output", str(tmp_path / "n1"), *RUNNER])
    summary = score.run(
        [
            "--input",
            str(night2),
            "--anchor",
            str(anchor),
            "--output",
            str(tmp_path / "n2"),
            "--skip_scored",
            str(tmp_path / "n1"),
            *RUNNER,
        ]
    )
    assert summary["reused"] == len(old) and summary["scored"] == len(new)
    first = {row["sha256"]: row for row in outputs(str(tmp_path / "n1"))[0]}
    second, errors = outputs(str(tmp_path / "n2"))
    assert_exactly_once(second, errors, [str(p) for p in night2.iterdir()])
    for row in second:
        if row["sha256"] in first:
            assert {**row, "uri": None} == {**first[row["sha256"]], "uri": None}


def test_scoring_twice_gives_the_same_rows(fitted_anchor, real_photos, tmp_path):
    anchor, _ = fitted_anchor
    runs = []
    for name in ("a", "b"):
        score.run(
            ["--input", str(real_photos), "--anchor", str(anchor), "--output", str(tmp_path / name), *RUNNER]
        )
        runs.append(sorted(outputs(str(tmp_path / name))[0], key=lambda row: row["uri"]))
    for first, second in zip(*runs):
        # Batches form differently from run to run, and CPU kernels sum in another order.
        exact = {k: v for k, v in first.items() if not isinstance(v, float)}
        assert exact == {k: second[k] for k in exact}
        for key, value in first.items():
            if isinstance(value, float):
                assert second[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


PEAK_RSS = """
import resource, sys
from anchorscan.pipelines import score
score.run(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


class StageRecordingRunner(FnApiRunner):
    """FnApiRunner that keeps the fused stages it runs."""

    def create_stages(self, pipeline_proto):
        context, stages = super().create_stages(pipeline_proto)
        self.stages = stages
        return context, stages


def test_decoding_embedding_and_scoring_fuse_into_one_stage(fitted_anchor, real_photos, tmp_path):
    # A stage boundary after the forward pass would make the runner hold every image's features
    # in memory until the boundary (a side input on the features did that once: +16 % peak RSS
    # at 10,000 images). Fused, memory does not depend on the corpus size.
    anchor, _ = fitted_anchor
    runner = StageRecordingRunner()
    argv = ["--input", str(real_photos), "--anchor", str(anchor), "--output", str(tmp_path / "out")]
    score.run(argv, test_pipeline=beam.Pipeline(runner=runner))

    def stage_of(step: str) -> int:
        found = {
            index
            for index, stage in enumerate(runner.stages)
            for transform in stage.transforms
            if step in transform.unique_name
        }
        assert len(found) == 1, (step, found)
        return found.pop()

    assert stage_of("Decode/") == stage_of("Embed/") == stage_of("Score/Score")


@pytest.mark.slow
def test_memory_does_not_grow_with_the_corpus(fitted_anchor, tmp_path):
    anchor, _ = fitted_anchor
    photo = np.asarray(Image.open(write_crops(tmp_path, 1, size=(280, 280))[0]))
    rng = np.random.default_rng(1)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(2000):
        top, left = rng.integers(0, 280 - 64, 2)
        Image.fromarray(photo[top : top + 64, left : left + 64]).save(folder / f"{i:04d}.png")
    peaks = {}
    for count in (200, 2000):
        manifest = tmp_path / f"first{count}.txt"
        manifest.write_text("\n".join(str(folder / f"{i:04d}.png") for i in range(count)))
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                PEAK_RSS,
                "--input",
                str(manifest),
                "--anchor",
                str(anchor),
                "--output",
                str(tmp_path / f"out{count}"),
                *RUNNER,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[count] = int(result.stdout.rsplit("PEAK_RSS_KB", 1)[1])
    assert peaks[2000] <= 1.15 * peaks[200], peaks


def test_non_finite_features_and_a_failed_forward_pass_are_error_rows(fitted_anchor):
    from anchorscan.anchors.anchor_file import anchor_from_bytes
    from anchorscan.transforms.decode import ImageMeta
    from anchorscan.transforms.inference import _failed_batch_rows
    from anchorscan.transforms.scoring import ScoreBatchFn

    anchor_path, _ = fitted_anchor
    anchor, _ = anchor_from_bytes(anchor_path.read_bytes())
    finite, broken = (ImageMeta(name, "0" * 64, 300, 260, "center_crop", {}) for name in ("finite", "nan"))
    vector = np.zeros(anchor.spec.dim)
    outputs = list(
        ScoreBatchFn().process(
            [(finite, (vector, 9.0)), (broken, (vector + np.nan, 9.0))], anchor, "anchor-id"
        )
    )
    [error] = [output.value for output in outputs if isinstance(output, beam.pvalue.TaggedOutput)]
    assert (error["uri"], error["stage"], error["error"]) == (
        "nan",
        "score",
        "features are not finite (NaN or inf)",
    )
    assert [row["uri"] for row in outputs if isinstance(row, dict)] == ["finite"]

    failure = ([(finite, None), (broken, None)], (RuntimeError, "RuntimeError('out of memory')", []))
    assert [(row["uri"], row["stage"], row["error_type"]) for row in _failed_batch_rows(failure)] == [
        ("finite", "embed", "RuntimeError"),
        ("nan", "embed", "RuntimeError"),
    ]
