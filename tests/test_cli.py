"""The `anchorscan` command line: info, and refusals with clear messages."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from anchorscan.anchors.anchor_file import anchor_from_bytes, anchor_to_bytes
from anchorscan.pipelines.cli import main
from anchorscan.transforms.schema import ERROR_COLUMNS, SCORE_COLUMNS, markdown_table


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
    code = main(["score", "--input", str(real_photos), "--anchor", str(foreign),
                 "--output", str(tmp_path / "out"), "--runner", "FnApiRunner"])
    assert code == 1
    message = capsys.readouterr().err
    assert "weights_sha256" in message and "fitted on different features" in message
    assert not list(tmp_path.glob("out-*"))  # refused before any work


def test_missing_required_option_is_reported(tmp_path, capsys):
    assert main(["score", "--input", str(tmp_path), "--anchor", "a.safetensors"]) == 2
    error = capsys.readouterr().err
    assert "usage: anchorscan score" in error and "--output" in error


RUNTIME = {"--weights", "--device", "--precision", "--runtime", "--batch_size", "--torch_threads",
           "--large_model"}
DECODING = {"--max_pixels", "--max_bytes", "--min_side", "--decode_timeout", "--decode_threads",
            "--decode_ahead", "--perturbation"}
FEATURES = {"--backbone", "--attention", "--resize", "--statistical_budget", "--projection_seed"}
FLAGS = {
    "fit": {"--input", "--anchor", "--errors", "--calibration_fraction", "--calibration_group",
            "--fpr", "--explained_variance", "--combine", "--statistical", "--channels",
            "--forensic_levels"} | FEATURES | RUNTIME | DECODING,
    "score": {"--input", "--anchor", "--output", "--head", "--with_anchor", "--combine",
              "--statistical", "--channels", "--skip_scored"} | RUNTIME | DECODING,
    "fit-head": {"--kind", "--real", "--fake", "--output", "--errors", "--k", "--max_per_class",
                 "--features"}
                | FEATURES | RUNTIME | DECODING,
    "evaluate": {"--dataset", "--anchor", "--head", "--output", "--split", "--sweep", "--channels",
                 "--combine"}
                | RUNTIME | DECODING,
    "report": {"--scores", "--output", "--anchor", "--labels", "--gallery"},
    "info": {"--json"},
    "update": {"--anchor", "--input", "--output", "--admit", "--forgetting", "--errors"} | RUNTIME | DECODING,
    "flag": {"--anchor", "--generator", "--input", "--output", "--errors"} | RUNTIME | DECODING,
    "export-delta": {"--anchor", "--since", "--output", "--min_count", "--noise", "--rank", "--seed"},
    "merge": {"--output"},
    "stream": {"--watch", "--anchor", "--output", "--window_seconds", "--learn_real", "--poll_seconds",
               "--stop_after_seconds", "--pubsub_subscription"} | RUNTIME | (DECODING - {"--perturbation"}),
}


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_help_lists_exactly_the_commands_own_flags(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: anchorscan {command} ")
    listed = set(re.findall(r"^  (--[a-z_]+)", text, re.MULTILINE))
    assert listed == FLAGS[command]


def test_an_unknown_flag_is_refused_by_name(tmp_path, capsys):
    code = main(["score", "--input", str(tmp_path), "--anchor", "a", "--output", "o", "--inptu", "x"])
    assert code == 2 and "--inptu" in capsys.readouterr().err


def test_a_closed_set_is_checked_by_the_parser(capsys):
    assert main(["fit-head", "--kind", "svm", "--real", "r", "--fake", "f", "--output", "h"]) == 2
    assert "invalid choice: 'svm'" in capsys.readouterr().err


def test_the_readme_tables_are_the_schemas():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert markdown_table(SCORE_COLUMNS) in readme
    assert markdown_table(ERROR_COLUMNS) in readme
