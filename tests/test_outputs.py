"""Where a scan writes: never beside another scan's tables, never into a prefix another scan is
writing, and --skip_scored reads score tables only."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from anchorscan.pipelines import score
from anchorscan.pipelines.cli import main
from anchorscan.transforms.sinks import PrefixLock
from helpers import RUNNER, read_parquet_rows, write_crops

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
