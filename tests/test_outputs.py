"""Where a scan writes: never beside another scan's tables, never into a prefix another scan is
writing, and --skip_scored reads score tables only."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from test_shards import error_rows, read_unit, score_rows, write_scan

from anchorscan.anchors.calibration import MIN_CALIBRATION
from anchorscan.pipelines import score
from anchorscan.pipelines.cli import main
from anchorscan.transforms.sinks import PrefixLock
from helpers import RUNNER, read_parquet_rows, write_crops
from shard_fixtures import write_img2dataset

MULTI_PROCESS = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
RUNNERS = {"in_process": [], "multi_process": MULTI_PROCESS}


@pytest.fixture(scope="module")
def few_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("few")
    return folder, sorted(write_crops(folder, count_per_photo=1, seed=3))


def scan(anchor, folder, prefix, *flags):
    return main(
        ["score", "--input", str(folder), "--anchor", str(anchor), "--output", str(prefix), *RUNNER, *flags]
    )


def test_a_second_scan_into_the_same_prefix_refuses_and_overwrite_leaves_only_its_shards(
    fitted_anchor, few_images, tmp_path, capsys
):
    anchor, _ = fitted_anchor
    folder, uris = few_images
    prefix = tmp_path / "out"
    assert scan(anchor, folder, prefix, *MULTI_PROCESS) == 0
    # As if the first scan had written another shard count: the names a second scan writes
    # differ from these, so only deleting them keeps the tables from mixing.
    for path in tmp_path.glob("out-*.parquet"):
        os.replace(path, path.with_name(path.name.replace("-of-", "-of-0009")))
    old = sorted(tmp_path.glob("out-*.parquet"))
    capsys.readouterr()

    assert scan(anchor, folder, prefix) == 2
    error = capsys.readouterr().err
    assert f"--output {prefix} already holds {len(old)} table files" in error and "--overwrite" in error
    assert sorted(tmp_path.glob("out-*.parquet")) == old  # refused before touching anything

    assert scan(anchor, folder, prefix, "--overwrite") == 0
    assert not set(old) & set(tmp_path.glob("out-*.parquet"))
    rows = read_parquet_rows(f"{prefix}-scores-*.parquet")
    assert sorted(row["uri"] for row in rows) == uris  # once each, from the new scan only


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_scan_refuses_a_prefix_that_another_scan_is_writing(
    fitted_anchor, few_images, tmp_path, capsys, runner
):
    anchor, _ = fitted_anchor
    folder, _ = few_images
    prefix = tmp_path / "out"
    with PrefixLock(str(prefix)):
        assert scan(anchor, folder, prefix, *RUNNERS[runner]) == 2
    error = capsys.readouterr().err
    assert f"another scan (pid {os.getpid()} on " in error and f"{prefix}.lock is locked" in error
    assert not list(tmp_path.glob("out-*.parquet"))
    assert not (tmp_path / "out.lock").exists()  # released by the holder


LOCK_AND_DIE = """
import os, signal, sys
from anchorscan.transforms.sinks import PrefixLock
PrefixLock(sys.argv[1]).__enter__()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_scan_leaves_no_lock_behind(fitted_anchor, few_images, tmp_path):
    anchor, _ = fitted_anchor
    folder, uris = few_images
    prefix = tmp_path / "out"
    died = subprocess.run([sys.executable, "-c", LOCK_AND_DIE, str(prefix)])
    assert died.returncode == -signal.SIGKILL and (tmp_path / "out.lock").exists()
    assert scan(anchor, folder, prefix) == 0
    assert len(read_parquet_rows(f"{prefix}-scores-*.parquet")) == len(uris)


def test_skip_scored_reads_score_tables_only_whatever_its_glob_matches(fitted_anchor, few_images, tmp_path):
    anchor, _ = fitted_anchor
    folder, uris = few_images
    night1 = tmp_path / "night1"
    night1.mkdir()
    (night1 / "broken.jpg").write_bytes(b"not an image")  # so that night 1 has an errors table
    for uri in uris:
        shutil.copy(uri, night1)
    assert scan(anchor, night1, tmp_path / "n1") == 0
    (tmp_path / "n1-notes.txt").write_text("a file the glob also matches")
    summary = score.run(
        [
            "--input",
            str(folder),
            "--anchor",
            str(anchor),
            "--output",
            str(tmp_path / "n2"),
            "--skip_scored",
            str(tmp_path / "n1-*"),
            *RUNNER,
        ]
    )
    assert summary["reused"] == len(uris) and summary["scored"] == 0


# --- what --overwrite deletes, and where a prefix points (issue 24) ---------------------------


def curate_cli(scores, output, *flags) -> int:
    return main(["curate", "--scores", str(scores), "--output", str(output), *flags, *RUNNER])


@pytest.fixture
def scanned_shards(tmp_path):
    """Two img2dataset shards and the tables of a scan that kept all six samples."""
    written = write_img2dataset(tmp_path / "i2d", shards=2, per_shard=3)
    uris = [uri for shard in written["shards"] for uri in written["samples"][shard]]
    table = score_rows(uris, written["images"], [0.0] * len(uris), [False] * len(uris))
    write_scan(tmp_path / "scan", table, error_rows([]))
    return written


def test_overwrite_deletes_only_the_names_a_curation_writes(scanned_shards, tmp_path):
    (tmp_path / "c3").mkdir()
    # A user's files that begin like curate's: "a digit, then anything" matched the first two.
    mine = [
        "cur-2024-notes.tar",
        "cur-0-DO-NOT-DELETE.tar",
        "cur-kept.parquet.bak",
        "cur-00000.tar.txt",
        "cur-2024_stats.json",
        "cur-0-notes.parquet",
    ]
    for name in mine:
        (tmp_path / "c3" / name).write_text(f"{name}: the user's")
    args = ["--reshard", "--samples_per_shard", "3"]
    assert curate_cli(tmp_path / "scan", tmp_path / "c3" / "cur", *args) == 0
    shards = {f"cur-0000{i}{ending}" for i in (0, 1) for ending in (".tar", ".parquet", "_stats.json")}
    ours = {"cur-kept.parquet", "cur-keys.npy", "cur-shardindex.json", *shards}
    assert {p.name for p in (tmp_path / "c3").iterdir()} == ours | set(mine)
    assert curate_cli(tmp_path / "scan", tmp_path / "c3" / "cur", "--overwrite") == 0
    left = {p.name for p in (tmp_path / "c3").iterdir()}
    assert left == {"cur-kept.parquet", "cur-keys.npy"} | set(mine)  # the last run's shards went
    assert all((tmp_path / "c3" / name).read_text() == f"{name}: the user's" for name in mine)


def test_a_glob_in_an_output_prefix_is_refused_before_anything_is_deleted(scanned_shards, tmp_path, capsys):
    (tmp_path / "c2").mkdir()
    assert curate_cli(tmp_path / "scan", tmp_path / "c2" / "cur") == 0
    (tmp_path / "c2" / "notes.tar").write_text("the user's")
    before = sorted(p.name for p in (tmp_path / "c2").iterdir())
    for prefix in ("c2/*", "c2/cur-?", "c2/[c]ur"):
        assert curate_cli(tmp_path / "scan", tmp_path / prefix, "--overwrite") == 2
        assert f"--output {tmp_path / prefix}: an output prefix may not hold glob characters" in (
            capsys.readouterr().err
        )
    argv = ["score", "--input", str(tmp_path / "i2d"), "--anchor", str(tmp_path / "none.safetensors")]
    assert main([*argv, "--output", str(tmp_path / "c2" / "*"), "--overwrite", *RUNNER]) == 2
    assert "may not hold glob characters" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "c2").iterdir()) == before  # nothing deleted, nothing written


def test_overwrite_refuses_to_delete_the_shards_a_curation_reads(scanned_shards, tmp_path, capsys):
    (tmp_path / "c3").mkdir()
    prefix = tmp_path / "c3" / "cur"
    assert curate_cli(tmp_path / "scan", prefix, "--reshard", "--samples_per_shard", "3") == 0
    curated = {p.name: p.read_bytes() for p in (tmp_path / "c3").iterdir()}
    # The curated shards scored again, then curated back into their own prefix.
    images = {}
    for shard in sorted((tmp_path / "c3").glob("cur-*.tar")):
        records, errors = read_unit(str(shard))
        assert not errors
        images.update({uri: record.data for uri, record in records.items()})
    uris = sorted(images)
    write_scan(tmp_path / "rescan", score_rows(uris, images, [0.0] * 6, [False] * 6), error_rows([]))
    assert curate_cli(tmp_path / "rescan", prefix, "--reshard", "--overwrite") == 2
    error = capsys.readouterr().err
    assert f"{prefix}-00000.tar is an input of this run" in error and "--overwrite would delete" in error
    assert {p.name: p.read_bytes() for p in (tmp_path / "c3").iterdir()} == curated  # untouched


def test_a_bare_relative_prefix_finds_the_tables_in_the_working_folder(
    scanned_shards, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    for path in tmp_path.glob("scan-*.parquet"):  # as `score --output s1` names them
        path.rename(path.with_name(path.name.replace("scan-", "s1-")))
    assert curate_cli("s1", "cur") == 0
    assert "samples     6 in 2 shards (from 2 tables)" in capsys.readouterr().out
    assert (tmp_path / "cur-kept.parquet").exists() and (tmp_path / "cur-keys.npy").exists()
    (tmp_path / "cur-0-DO-NOT-DELETE.tar").write_text("the user's")
    assert curate_cli("s1", "cur") == 2  # a bare prefix's outputs are found too
    assert curate_cli("s1", "cur", "--overwrite") == 0
    assert (tmp_path / "cur-0-DO-NOT-DELETE.tar").read_text() == "the user's"


def test_a_curation_whose_shard_is_gone_names_it_and_leaves_nothing(scanned_shards, tmp_path, capsys):
    shard = pathlib.Path(scanned_shards["shards"][1])
    moved = tmp_path / "elsewhere.tar"
    shard.rename(moved)
    (tmp_path / "c3").mkdir()
    prefix = tmp_path / "c3" / "cur"
    assert curate_cli(tmp_path / "scan", prefix, "--reshard", "--samples_per_shard", "2") == 2
    error = capsys.readouterr().err
    assert f"{shard}: the scan read this shard, which cannot be read now (file not found" in error
    assert "Traceback" not in error
    assert not list((tmp_path / "c3").iterdir())  # no .partial, no kept table, no keys
    moved.rename(shard)
    assert curate_cli(tmp_path / "scan", prefix, "--reshard", "--samples_per_shard", "2") == 0


def test_a_refused_calibrate_prints_one_line_and_leaves_nothing(fitted_anchor, tmp_path):
    anchor, _ = fitted_anchor
    yours = tmp_path / "yours"
    yours.mkdir()
    for index in range(30):  # images that cannot be read: no calibration, an errors table's rows
        (yours / f"photo_{index}.jpg").write_bytes(b"not an image")
    command = [sys.executable, "-m", "anchorscan.pipelines.cli", "calibrate", "--anchor", str(anchor)]
    # A bare --output: its errors table's prefix is "cal", in the working folder.
    command += ["--input", "yours", "--output", "cal", *RUNNER]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "anchorscan calibrate: error: only 0 distinct images of yours could be embedded (need at "
        f"least {MIN_CALIBRATION}) [while running 'Calibrate']"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["yours"]  # no cal-errors-*.parquet


def soft_upscales(folder, count: int) -> None:
    """Photos shrunk and blown up again with a blur: what the anchor calls suspect."""
    from PIL import Image, ImageFilter

    folder.mkdir()
    for path in write_crops(folder, count_per_photo=count, seed=13):
        image = Image.open(path).convert("RGB")
        small = image.resize((image.width // 4, image.height // 4), Image.Resampling.BOX)
        small.resize(image.size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2)).save(path)


def test_a_rescan_that_reuses_every_row_counts_its_suspects(fitted_anchor, tmp_path, capsys):
    anchor, _ = fitted_anchor
    soft_upscales(tmp_path / "night", 2)
    assert scan(anchor, tmp_path / "night", tmp_path / "n1") == 0
    suspects = sum(row["is_suspect"] for row in read_parquet_rows(f"{tmp_path}/n1-scores-*.parquet"))
    assert suspects > 0
    capsys.readouterr()
    summary = score.run(
        [
            "--input",
            str(tmp_path / "night"),
            "--anchor",
            str(anchor),
            "--output",
            str(tmp_path / "n2"),
            "--skip_scored",
            str(tmp_path / "n1"),
            *RUNNER,
        ]
    )
    assert summary["scored"] == 0 and summary["suspect"] == suspects
    rows = len(list((tmp_path / "night").iterdir()))
    assert f"suspect     {suspects} ({suspects / rows:.1%};" in capsys.readouterr().out


def test_shards_scored_by_a_relative_path_are_curated_from_another_folder(
    fitted_anchor, tmp_path, monkeypatch, capsys
):
    anchor, _ = fitted_anchor
    (tmp_path / "work").mkdir()
    (tmp_path / "other").mkdir()
    written = write_img2dataset(tmp_path / "work" / "i2d", shards=2, per_shard=3)
    monkeypatch.chdir(tmp_path / "work")
    assert main(["score", "--input", "i2d", "--anchor", str(anchor), "--output", "s1", *RUNNER]) == 0
    rows = read_parquet_rows(f"{tmp_path}/work/s1-scores-*.parquet")
    assert sorted(row["uri"] for row in rows) == sorted(written["images"])  # the absolute paths
    tables = sorted(p.name for p in (tmp_path / "work").glob("s1-*"))
    # an --input glob that matches the tables --overwrite would delete
    argv = ["score", "--input", "*", "--anchor", str(anchor), "--output", "s1", "--overwrite", *RUNNER]
    assert main(argv) == 2
    assert "s1-errors-00000-of-00001.parquet is an input of this run (*)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "work").glob("s1-*")) == tables
    monkeypatch.chdir(tmp_path / "other")
    assert curate_cli(tmp_path / "work" / "s1", "cur", "--reshard", "--drop_top", "0") == 0
    # read again from i2d: the output's sidecar names each sample's source, the scan's URI
    sources = pq.read_table(tmp_path / "other" / "cur-00000.parquet")["source"].to_pylist()
    assert sorted(sources) == sorted(written["images"])
