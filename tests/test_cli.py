"""The `anchorscan` command line: info, and refusals with clear messages."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest

from anchorscan.anchors.anchor_file import anchor_from_bytes, anchor_to_bytes
from anchorscan.anchors.tables import ERROR_COLUMNS, SCORE_COLUMNS, markdown_table
from anchorscan.pipelines.cli import main


def test_info_json_has_the_documented_keys(fitted_anchor, capsys):
    anchor, _ = fitted_anchor
    assert main(["info", str(anchor), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("format_version", "backbone", "weights_sha256", "n", "d", "shrinkage", "k", "config"):
        assert key in info
    assert info["d"] == 1280 + 768 + 10  # semantic, statistical, forensic


def test_score_refuses_an_anchor_from_other_weights(fitted_anchor, real_photos, tmp_path, capsys):
    anchor_path, _ = fitted_anchor
    anchor, metadata = anchor_from_bytes(anchor_path.read_bytes())
    anchor.spec = dataclasses.replace(anchor.spec, weights_sha256="0" * 64)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(anchor_to_bytes(anchor, metadata["projection"]))
    code = main(
        [
            "score",
            "--input",
            str(real_photos),
            "--anchor",
            str(foreign),
            "--output",
            str(tmp_path / "out"),
            "--runner",
            "FnApiRunner",
        ]
    )
    assert code == 2
    message = capsys.readouterr().err
    assert "weights_sha256" in message and "fitted on different features" in message
    assert len(message.strip().splitlines()) == 1 and "Traceback" not in message
    assert not list(tmp_path.glob("out-*"))  # refused before any work


def test_score_refuses_an_anchor_fitted_before_the_forensic_tiles(
    fitted_anchor, real_photos, tmp_path, capsys
):
    anchor_path, _ = fitted_anchor
    anchor, metadata = anchor_from_bytes(anchor_path.read_bytes())
    layout = {name: value for name, value in anchor.spec.layout.items() if name != "forensic_tiles"}
    anchor.spec = dataclasses.replace(anchor.spec, layout=layout)  # its features read the centre crop alone
    old = tmp_path / "old.safetensors"
    old.write_bytes(anchor_to_bytes(anchor, metadata["projection"]))
    code = main(
        ["score", "--input", str(real_photos), "--anchor", str(old), "--output", str(tmp_path / "out")]
    )
    assert code == 2
    message = capsys.readouterr().err
    assert "forensic_tiles" in message and "fitted on different features" in message
    assert len(message.strip().splitlines()) == 1 and "Traceback" not in message
    assert not list(tmp_path.glob("out-*"))  # refused before any work


def test_missing_required_option_is_reported(tmp_path, capsys):
    assert main(["score", "--input", str(tmp_path), "--anchor", "a.safetensors"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        "anchorscan score: error: the following arguments are required: --output "
        "(see anchorscan score --help)"
    )


RUNTIME = {
    "--weights",
    "--device",
    "--precision",
    "--runtime",
    "--batch_size",
    "--torch_threads",
    "--large_model",
}
DECODING = {
    "--max_pixels",
    "--max_bytes",
    "--max_shard_bytes",
    "--max_skip_bytes",
    "--min_side",
    "--decode_timeout",
    "--read_timeout",
    "--decode_processes",
    "--decode_ahead",
    "--perturbation",
}
HTTP = {"--http_timeout", "--http_retries", "--http_max_per_host", "--http_max_time"}
FEATURES = {"--backbone", "--attention", "--resize", "--statistical_budget", "--projection_seed"}
FLAGS = {
    "fit": {
        "--input",
        "--anchor",
        "--errors",
        "--calibration_fraction",
        "--calibration_group",
        "--fpr",
        "--explained_variance",
        "--combine",
        "--statistical",
        "--channels",
        "--forensic_levels",
        "--calibration_key",
        "--alarm_share",
        "--alarm_calibration",
        "--softened_images",
    }
    | FEATURES
    | RUNTIME
    | DECODING
    | HTTP,
    "score": {
        "--input",
        "--anchor",
        "--output",
        "--head",
        "--with_anchor",
        "--combine",
        "--statistical",
        "--channels",
        "--skip_scored",
        "--overwrite",
        "--provenance",
        "--c2pa_trust_anchors",
    }
    | RUNTIME
    | DECODING
    | HTTP,
    "fit-head": {"--kind", "--real", "--fake", "--output", "--errors", "--k", "--max_per_class", "--features"}
    | FEATURES
    | RUNTIME
    | DECODING
    | HTTP,
    "evaluate": {
        "--dataset",
        "--anchor",
        "--head",
        "--output",
        "--split",
        "--sweep",
        "--channels",
        "--combine",
    }
    | RUNTIME
    | DECODING
    | HTTP,
    "report": {"--scores", "--output", "--anchor", "--labels", "--gallery"},
    "info": {"--json"},
    "update": {
        "--anchor",
        "--input",
        "--output",
        "--admit",
        "--trusted",
        "--forgetting",
        "--errors",
        "--softened_images",
    }
    | RUNTIME
    | DECODING
    | HTTP,
    "calibrate": {"--anchor", "--input", "--output", "--keep_held_out", "--errors", "--force"}
    | RUNTIME
    | (DECODING - {"--perturbation"})
    | HTTP,
    "flag": {"--anchor", "--generator", "--input", "--output", "--errors"} | RUNTIME | DECODING | HTTP,
    "export-delta": {
        "--anchor",
        "--since",
        "--output",
        "--min_count",
        "--noise",
        "--rank",
        "--seed",
        "--sign",
    },
    "merge": {"--output", "--trust"},
    "keygen": {"--output"},
    "stream": {
        "--watch",
        "--anchor",
        "--output",
        "--window_seconds",
        "--learn_real",
        "--poll_seconds",
        "--stop_after_seconds",
        "--settle_seconds",
        "--pubsub_subscription",
    }
    | RUNTIME
    | (DECODING - {"--perturbation"})
    | HTTP,
    "curate": {
        "--scores",
        "--output",
        "--follow_anchor",
        "--by",
        "--max_score",
        "--drop_top",
        "--keep",
        "--reshard",
        "--samples_per_shard",
        "--max_bytes",
        "--overwrite",
        "--provenance",
    }
    | HTTP,
}


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_help_lists_exactly_the_commands_own_flags(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: anchorscan {command} ")
    listed = set(re.findall(r"^  (--[a-z0-9_]+)", text, re.MULTILINE))
    assert listed == FLAGS[command]


def test_an_unknown_flag_is_refused_by_name(tmp_path, capsys):
    code = main(["score", "--input", str(tmp_path), "--anchor", "a", "--output", "o", "--inptu", "x"])
    assert code == 2 and "--inptu" in capsys.readouterr().err


def test_a_closed_set_is_checked_by_the_parser(capsys):
    assert main(["fit-head", "--kind", "svm", "--real", "r", "--fake", "f", "--output", "h"]) == 2
    assert "invalid choice: 'svm'" in capsys.readouterr().err


def test_the_reference_tables_are_the_schemas():
    reference = (Path(__file__).parents[1] / "docs" / "REFERENCE.md").read_text()
    assert markdown_table(SCORE_COLUMNS) in reference
    assert markdown_table(ERROR_COLUMNS) in reference


def test_the_readme_summary_names_real_columns():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    summary = readme.split("\n## What the columns mean\n", 1)[1].split("\n## ", 1)[0]
    first_cells = re.findall(r"^\| (`.*?`) \|", summary, flags=re.MULTILINE)
    named = {name for cell in first_cells for name in re.findall(r"`(\w+)`", cell)}
    assert "score" in named and named <= {column.name for column in SCORE_COLUMNS}, named
    assert all(f"`{column.name}`" in summary for column in ERROR_COLUMNS)


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    return error


def test_a_missing_anchor_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nowhere.safetensors"
    code = main(
        ["score", "--input", str(tmp_path), "--anchor", str(missing), "--output", str(tmp_path / "out")]
    )
    assert code == 2
    assert one_line_error(capsys) == f"anchorscan score: error: {missing}: file not found"


def test_info_on_a_file_that_is_not_an_anchor_is_one_line_and_exit_2(tmp_path, capsys):
    other = tmp_path / "photo.jpg"
    other.write_bytes(b"\xff\xd8 not an anchor")
    assert main(["info", str(other)]) == 2
    assert "not an anchorscan anchor file" in one_line_error(capsys)


def test_a_bad_flag_value_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["fit", "--input", str(tmp_path), "--anchor", str(tmp_path / "a.safetensors"), "--fpr", "2"])
    assert code == 2
    assert "argument --fpr: must be in (0, 0.5], got 2" in one_line_error(capsys)


def test_an_output_under_a_regular_file_is_one_line_and_exit_2(fitted_anchor, tmp_path, capsys):
    anchor, _ = fitted_anchor
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    code = main(
        [
            "score",
            "--input",
            str(tmp_path),
            "--anchor",
            str(anchor),
            "--output",
            str(blocker / "out"),
            "--runner",
            "FnApiRunner",
        ]
    )
    assert code == 2
    error = one_line_error(capsys)
    assert error == (
        f"anchorscan score: error: cannot write --output {blocker}/out-scores: "
        f"{blocker} is a file, not a folder"
    )


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing"), "--debug"]) == 2
    error = capsys.readouterr().err
    assert "Traceback" in error and error.strip().endswith("file not found")


def test_an_unexpected_error_is_an_internal_error_with_its_traceback(monkeypatch, capsys):
    from anchorscan.pipelines import info

    def broken(argv=None):
        raise KeyError("a bug")

    monkeypatch.setattr(info, "run", broken)
    assert main(["info", "anything"]) == 1
    error = capsys.readouterr().err
    assert "anchorscan info: internal error" in error
    assert "Traceback" in error and "KeyError: 'a bug'" in error


@pytest.mark.parametrize(
    "beam_flags, expected",
    [
        ([], os.cpu_count()),
        (
            ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"],
            max(1, os.cpu_count() // 2),
        ),
        (["--runner", "DataflowRunner"], 1),  # an SDK process per core, each with its own decoder
        (["--decode_processes", "3", "--runner", "DataflowRunner"], 3),
    ],
    ids=["in_process", "multi_process", "dataflow", "given"],
)
def test_decode_processes_share_the_cores_among_sdk_processes(beam_flags, expected):
    from anchorscan.pipelines import score
    from anchorscan.pipelines.options import decode_processes, parse

    args, options = parse(score.parser(), ["--input", "x", "--anchor", "a", "--output", "o", *beam_flags])
    assert decode_processes(args, options) == expected


def test_info_names_the_forensic_channel(fitted_anchor, capsys):
    anchor, _ = fitted_anchor
    assert main(["info", str(anchor)]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["d_forensic"] == "10"
    assert lines["forensic_level_names"].startswith("['sharp', 'blur0.4'")
    # the default score reads every channel, forensic first (the primary), the others as alarms
    assert lines["channels"] == "['forensic', 'semantic', 'statistical']"
    assert lines["combine"] == "alarms" and lines["forensic_levels"] == "softness_path"


def test_fit_says_when_its_hold_out_is_too_small_for_the_rate(real_photos, tmp_path, capsys):
    # Issue 26: a small fit holds out a handful of images, whose ranks cannot reach the 1 % rate
    # nor the alarms' 0.1 % on their own; the summary says so and how many it would take.
    from helpers import HOLD_OUT_BY_NAME, RUNNER

    anchor = tmp_path / "a.safetensors"
    argv = ["fit", "--input", str(real_photos), "--anchor", str(anchor), "--calibration_fraction", "0.3"]
    assert main([*argv, *HOLD_OUT_BY_NAME, *RUNNER]) == 0
    out = capsys.readouterr().out
    held_out = int(re.search(r"(\d+) held out for calibration", out).group(1))
    line = next(line for line in out.splitlines() if line.startswith("calibration "))
    assert f"{held_out} held-out images rank p-values down to 1/{held_out + 1} only" in line
    assert "--fpr 0.01 rests on the tail model" in line
    # forensic decides alone at p < 0.008 (80 % of the budget), each alarm at 0.001 (10 %)
    assert "forensic at p < 0.008 needs 124" in line and "semantic at p < 0.001 needs 999" in line
