"""The `anchorscan` command line: info, and refusals with clear messages."""
from __future__ import annotations

import dataclasses
import json

from anchorscan.anchors.anchor_file import anchor_from_bytes, anchor_to_bytes
from anchorscan.pipelines.cli import main


def test_info_json_has_the_documented_keys(fitted_anchor, capsys):
    anchor, _ = fitted_anchor
    assert main(["info", str(anchor), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("format_version", "backbone", "weights_sha256", "n", "d", "shrinkage", "k", "config"):
        assert key in info
    assert info["d"] == 2048


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
