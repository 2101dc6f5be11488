"""End-to-end fit and score with Beam on real photo crops and broken files."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline

from anchorscan.anchors.anchor_file import read_metadata
from anchorscan.anchors.tables import ERROR_SCHEMA, SCORE_SCHEMA
from anchorscan.pipelines import score
from helpers import RUNNER, read_parquet_rows, write_crops


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A scan folder: fresh real crops, one small image, and files that cannot be decoded."""
    folder = tmp_path_factory.mktemp("scan")
    good = write_crops(folder, count_per_photo=2, seed=1)
    small = write_crops(folder / "..", count_per_photo=1, size=(100, 150), seed=2)[:1]
    os.replace(small[0], folder / "small.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("<html>404 Not Found</html>")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(pathlib.Path(good[0]).read_bytes()[:300])
    return folder, good + [str(folder / "small.png")]


def test_fit_records_every_real_image(fitted_anchor, real_photos):
    anchor, _summary = fitted_anchor
    metadata = read_metadata(anchor.read_bytes())
    assert metadata["n"] + metadata["n_calibration"] == len(os.listdir(real_photos))
    assert metadata["n_calibration"] >= 5
    assert metadata["backbone"] == "efficientnet-lite0"
    assert 0 < metadata["shrinkage"] <= 1 and 1 <= metadata["k"] < metadata["n"]


def test_every_input_ends_in_exactly_one_output(fitted_anchor, scan, tmp_path):
    anchor, _ = fitted_anchor
    folder, decodable = scan
    missing_glob = str(folder / "nothing-*.webp")
    prefix = str(tmp_path / "out")
    pipeline = test_pipeline.TestPipeline(options=PipelineOptions(RUNNER))
    summary = score.run(
        [
            "--input",
            str(folder),
            "--input",
            missing_glob,
            "--anchor",
            str(anchor),
            "--output",
            prefix,
            *RUNNER,
        ],
        test_pipeline=pipeline,
    )

    scores = read_parquet_rows(prefix + "-scores-*.parquet")
    errors = read_parquet_rows(prefix + "-errors-*.parquet")
    scored_uris = [row["uri"] for row in scores]
    error_uris = [row["uri"] for row in errors]
    expected = {str(path) for path in folder.iterdir()} | {missing_glob}
    assert sorted(scored_uris + error_uris) == sorted(expected)  # each exactly once
    assert set(scored_uris) == set(decodable)

    stage_of = {row["uri"]: row for row in errors}
    assert stage_of[missing_glob]["stage"] == "list"
    assert stage_of[str(folder / "empty.jpg")]["stage"] == "decode"
    assert "empty" in stage_of[str(folder / "empty.jpg")]["error"]
    assert "HTML" in stage_of[str(folder / "text.png")]["error"]
    assert stage_of[str(folder / "truncated.jpg")]["stage"] == "decode"

    assert summary["scored"] == len(decodable)
    assert summary["errors"] == {"list": 1, "decode": 3}
    assert set(scores[0]) == set(SCORE_SCHEMA.names) and set(errors[0]) == set(ERROR_SCHEMA.names)
    by_uri = {row["uri"]: row for row in scores}
    assert by_uri[str(folder / "small.png")]["preprocess"] == "upscale+center_crop"
    assert by_uri[str(folder / "small.png")]["width"] == 150
    for row in scores:
        assert 0 < row["p_semantic"] <= 1 and 0 < row["p_statistical"] <= 1
        assert np.isclose(row["statistical"], row["t2"] + row["spe"])
        assert row["is_suspect"] == (row["score"] > 2.0)  # -log10(0.01)


def test_scores_do_not_depend_on_batching(fitted_anchor, scan, tmp_path):
    anchor, _ = fitted_anchor
    folder, _ = scan
    rows = []
    for batch_size in (1, 7):
        prefix = str(tmp_path / f"b{batch_size}")
        score.run(
            [
                "--input",
                str(folder / "*.png"),
                "--anchor",
                str(anchor),
                "--output",
                prefix,
                "--batch_size",
                str(batch_size),
                *RUNNER,
            ]
        )
        rows.append({row["uri"]: row for row in read_parquet_rows(prefix + "-scores-*.parquet")})
    assert rows[0].keys() == rows[1].keys()
    for uri, row in rows[0].items():
        assert row["sha256"] == rows[1][uri]["sha256"]
        assert row["score"] == pytest.approx(rows[1][uri]["score"], rel=1e-4, abs=1e-6)


def test_workers_can_share_one_model(fitted_anchor, scan, tmp_path):
    anchor, _ = fitted_anchor
    folder, _ = scan
    prefix = str(tmp_path / "shared")
    summary = score.run(
        [
            "--input",
            str(folder / "*.png"),
            "--anchor",
            str(anchor),
            "--output",
            prefix,
            "--large_model",
            "--direct_num_workers",
            "2",
            "--direct_running_mode",
            "multi_processing",
            *RUNNER,
        ]
    )
    rows = read_parquet_rows(prefix + "-scores-*.parquet")
    assert summary["scored"] == len(rows) == len([p for p in folder.glob("*.png") if p.name != "text.png"])


def test_progress_counts_each_run_from_zero(capsys):
    from anchorscan.transforms.progress import ReportProgress

    for _ in range(2):  # two pipelines in one process, as in tests or a notebook
        reporter = ReportProgress("embedded", every_seconds=0.0)
        for i in range(3):
            list(reporter.process(i, total=3))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"] * 2
