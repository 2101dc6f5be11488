"""Nothing lost, nothing crashes: hostile files, exactly-once accounting, retries, resumed scans."""
from __future__ import annotations

import subprocess
import sys
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from PIL import Image

from anchorscan.anchors import anchor as anchor_module
from anchorscan.transforms import decode as decode_module
from anchorscan.anchors.preprocess import DecodeError, decode_and_crop
from helpers import RUNNER, read_parquet_rows, write_crops
from hostile import HOSTILE, write_hostile
from anchorscan.pipelines import score


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
    np.testing.assert_array_equal(crop.pixels, photo[top:top + 224, left:left + 224])


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    return folder, write_hostile(folder)


def test_hostile_corpus_through_the_pipeline(fitted_anchor, hostile_folder, tmp_path, monkeypatch):
    anchor, _ = fitted_anchor
    folder, expected = hostile_folder
    locked = str(folder / "gray.jpg")
    real_open = decode_module.FileSystems.open

    def open_unless_locked(uri, *args, **kwargs):  # root reads anything: simulate chmod 000
        if uri == locked:
            raise PermissionError(13, "Permission denied", uri)
        return real_open(uri, *args, **kwargs)

    monkeypatch.setattr(decode_module.FileSystems, "open", open_unless_locked)
    manifest = tmp_path / "list.txt"
    gone = str(folder / "deleted-after-listing.jpg")
    inputs = [str(folder / name) for name in expected] + [str(folder / "folder.jpg"), gone]
    manifest.write_text("\n".join(inputs))
    prefix = str(tmp_path / "out")
    score.run(["--input", str(manifest), "--anchor", str(anchor), "--output", prefix, *RUNNER])

    scores, errors = outputs(prefix)
    assert_exactly_once(scores, errors, inputs)
    rows = {row["uri"]: row for row in scores + errors}
    for name, (outcome, words) in expected.items():
        row = rows[str(folder / name)]
        if str(folder / name) == locked:
            assert (row["stage"], row["error"]) == ("read", "permission denied")
        elif outcome == "scored":
            assert words in row["preprocess"] and np.isfinite(row["score"])
        else:
            assert row["stage"] == outcome and words in row["error"], row
    assert rows[str(folder / "folder.jpg")]["error"] == "is a directory, not a file"
    assert "not found" in rows[gone]["error"]


def test_limits_become_error_rows(fitted_anchor, tmp_path, monkeypatch):
    anchor, _ = fitted_anchor
    folder = tmp_path / "in"
    folder.mkdir()
    paths = write_crops(folder, count_per_photo=1, seed=5)
    slow = paths[0]
    real_decode = decode_module.decode_and_crop

    def slow_decode(data, *args):
        if data == open(slow, "rb").read():
            time.sleep(5)
        return real_decode(data, *args)

    monkeypatch.setattr(decode_module, "decode_and_crop", slow_decode)
    big = sorted(paths, key=lambda p: -len(open(p, "rb").read()))[0]
    limit = len(open(big, "rb").read()) - 1
    prefix = str(tmp_path / "out")
    started = time.time()
    score.run(["--input", str(folder), "--anchor", str(anchor), "--output", prefix,
               "--decode_timeout", "1", "--max_bytes", str(limit), *RUNNER])
    scores, errors = outputs(prefix)
    assert_exactly_once(scores, errors, paths)
    by_uri = {row["uri"]: row for row in errors}
    assert "--max_bytes" in by_uri[big]["error"]
    if slow != big:
        assert "--decode_timeout" in by_uri[slow]["error"]
    assert len(scores) == len(paths) - len(errors)
    assert time.time() - started < 60


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """500 files: small real crops and every kind of broken file."""
    folder = tmp_path_factory.mktemp("mixed")
    photo = np.asarray(Image.open(write_crops(folder, 1, size=(280, 280))[0]))
    rng = np.random.default_rng(0)
    broken = [make() for name, (make, (outcome, _)) in HOSTILE.items() if outcome != "scored"]
    for i in range(500 - len(list(folder.iterdir()))):
        if i % 10 == 0:
            (folder / f"broken{i:03d}.jpg").write_bytes(broken[(i // 10) % len(broken)])
            continue
        top, left = rng.integers(0, 280 - 48, 2)
        Image.fromarray(photo[top:top + 48, left:left + 48]).save(folder / f"crop{i:03d}.png")
    uris = sorted(str(path) for path in folder.iterdir())
    assert len(uris) == 500
    return folder, uris


@pytest.mark.parametrize("runner_options", [
    [], ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]],
    ids=["in_process", "multi_process"])
def test_500_files_each_end_in_exactly_one_output(fitted_anchor, mixed_corpus, tmp_path, runner_options):
    anchor, _ = fitted_anchor
    folder, uris = mixed_corpus
    prefix = str(tmp_path / "out")
    summary = score.run(["--input", str(folder), "--anchor", str(anchor), "--output", prefix,
                         "--batch_size", "64", *RUNNER, *runner_options])
    scores, errors = outputs(prefix)
    assert_exactly_once(scores, errors, uris)
    assert len(errors) == 50 and all(row["stage"] == "decode" for row in errors)
    assert summary["scored"] == 450


def test_a_retried_bundle_writes_no_duplicate_rows(fitted_anchor, mixed_corpus, tmp_path, monkeypatch):
    anchor, _ = fitted_anchor
    folder, uris = mixed_corpus
    real_score = anchor_module.Anchor.score
    calls = {"n": 0}

    def flaky_score(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("transient failure injected by the test")
        return real_score(self, *args, **kwargs)

    monkeypatch.setattr(anchor_module.Anchor, "score", flaky_score)
    prefix = str(tmp_path / "out")
    subset = tmp_path / "subset.txt"
    subset.write_text("\n".join(uris[:120]))
    score.run(["--input", str(subset), "--anchor", str(anchor), "--output", prefix,
               "--runner", "BundleBasedDirectRunner"])
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
        (night2 / ("copy-" + path.rsplit("/", 1)[1])).write_bytes(open(path, "rb").read())
    new = write_crops(night2, 1, seed=8)
    score.run(["--input", str(night1), "--anchor", str(anchor), "--output", str(tmp_path / "n1"), *RUNNER])
    summary = score.run(["--input", str(night2), "--anchor", str(anchor), "--output",
                         str(tmp_path / "n2"), "--skip_scored", str(tmp_path / "n1"), *RUNNER])
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
        score.run(["--input", str(real_photos), "--anchor", str(anchor), "--output",
                   str(tmp_path / name), *RUNNER])
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
        found = {index for index, stage in enumerate(runner.stages)
                 for transform in stage.transforms if step in transform.unique_name}
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
        Image.fromarray(photo[top:top + 64, left:left + 64]).save(folder / f"{i:04d}.png")
    peaks = {}
    for count in (200, 2000):
        manifest = tmp_path / f"first{count}.txt"
        manifest.write_text("\n".join(str(folder / f"{i:04d}.png") for i in range(count)))
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, "--input", str(manifest),
                                 "--anchor", str(anchor), "--output", str(tmp_path / f"out{count}"),
                                 *RUNNER], capture_output=True, text=True, check=True)
        peaks[count] = int(result.stdout.rsplit("PEAK_RSS_KB", 1)[1])
    assert peaks[2000] <= 1.15 * peaks[200], peaks
