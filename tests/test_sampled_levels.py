"""An anchor whose softness levels were simulated on a sample of its images (issue 29): fit
past `--softened_images`, then every command that reads an anchor, from the command line. The
sample is set low so that a few dozen crops cross it, as 2,000 photos cross the default."""

from __future__ import annotations

import pytest

from anchorscan.anchors.anchor_file import read_metadata, verified_contents
from anchorscan.anchors.calibration import holds_out, uri_key
from anchorscan.pipelines import fit, score, stream, update
from anchorscan.pipelines.cli import main
from anchorscan.transforms.inference import softening_chosen
from helpers import HOLD_OUT_BY_NAME, RUNNER, read_parquet_rows, write_crops

SAMPLE = 12  # of the 36 session crops (and of an update's 24): both cross it
FRACTION = 0.3


class Listed:
    def __init__(self, uri):
        self.uri = uri


def expected_counts(paths: list[str], sample: int) -> tuple[int, int]:
    """(fitted images, fitted images whose levels are simulated), by the rules themselves: the
    hold-out by file name and the softening sample over every listed image."""
    fitted = [path for path in paths if not holds_out(path, FRACTION, HOLD_OUT_BY_NAME[1])]
    chosen = [path for path in fitted if softening_chosen(Listed(path), len(paths), sample)]
    return len(fitted), len(chosen)


def moments_counts(path) -> dict:
    return read_metadata(path.read_bytes())["moments"]


def expected_softened_keys(paths: list[str], sample: int) -> set[int]:
    """The held-out images whose softness levels are simulated: fit embeds their softened
    copies with the backbone too (docs/METHOD.md §5.4)."""
    held = [path for path in paths if holds_out(path, FRACTION, HOLD_OUT_BY_NAME[1])]
    return {uri_key(path) for path in held if softening_chosen(Listed(path), len(paths), sample)}


def softened_keys(path) -> set[int]:
    tensors, metadata = verified_contents(path.read_bytes())
    assert metadata["format_version"] == 5
    keys = tensors["calibration.softened_keys"]
    levels = len(metadata["forensic_level_names"]) - 1
    assert tensors["calibration.softened_features"].shape == (len(keys), levels * metadata["d"])
    return set(keys.tolist())


def assert_levels_sampled(counts: dict, backbone: int, softened: int) -> None:
    assert counts["backbone"] == counts["forensic.sharp"] == backbone
    levels = [name for name in counts if name.startswith("forensic.") and name != "forensic.sharp"]
    assert levels and all(counts[name] == softened for name in levels)


@pytest.fixture(scope="module")
def sampled_anchor(real_photos, tmp_path_factory):
    anchor = tmp_path_factory.mktemp("sampled") / "anchor.safetensors"
    argv = ["--input", str(real_photos), "--anchor", str(anchor), "--calibration_fraction", str(FRACTION)]
    per_level = ["--alarm_calibration", "per_level"]  # the held-out images' copies are embedded
    fit.run([*argv, *HOLD_OUT_BY_NAME, "--softened_images", str(SAMPLE), *per_level, *RUNNER])
    return anchor


def test_fit_samples_the_softened_levels_as_its_rule_says(sampled_anchor, real_photos):
    paths = sorted(str(path) for path in real_photos.iterdir())
    fitted, chosen = expected_counts(paths, SAMPLE)
    assert 0 < chosen < fitted  # the sample is crossed: the case this module is about
    assert_levels_sampled(moments_counts(sampled_anchor), fitted, chosen)
    # the held-out images in the sample, and only they, keep their softened copies
    kept = softened_keys(sampled_anchor)
    assert kept == expected_softened_keys(paths, SAMPLE) and kept


def test_info_and_score_read_a_sampled_anchor_and_its_backbone_channels_are_unchanged(
    sampled_anchor, fitted_anchor, real_photos, tmp_path
):
    assert main(["info", str(sampled_anchor)]) == 0
    # by default no copy is embedded: the alarms keep round 4's rule (docs/QUALITY.md, round 5)
    assert "calibration.softened_keys" not in verified_contents(fitted_anchor[0].read_bytes())[0]
    assert read_metadata(sampled_anchor.read_bytes())["level_calibration"]
    rows = {}
    for name, anchor in (("sampled", sampled_anchor), ("full", fitted_anchor[0])):
        prefix = tmp_path / name
        score.run(["--input", str(real_photos), "--anchor", str(anchor), "--output", str(prefix), *RUNNER])
        rows[name] = {row["uri"]: row for row in read_parquet_rows(f"{prefix}-scores-*.parquet")}
    assert rows["sampled"].keys() == rows["full"].keys() and len(rows["sampled"]) == 36
    for uri, row in rows["sampled"].items():
        # the sample changes the softened levels only; the backbone's statistics are the same
        # images' (1e-6: the same features, batched alike, through two fits' float sums)
        for column in ("semantic", "statistical"):
            assert row[column] == pytest.approx(rows["full"][uri][column], rel=1e-6), column
        assert 0.0 < row["p_forensic"] <= 1.0 and row["softness"]


def test_update_export_delta_merge_and_calibrate_on_a_sampled_anchor(sampled_anchor, tmp_path):
    more = tmp_path / "more"
    more.mkdir()
    paths = sorted(write_crops(more, count_per_photo=4, seed=7))
    updated = tmp_path / "updated.safetensors"
    update.run(
        [
            "--anchor",
            str(sampled_anchor),
            "--input",
            str(more),
            "--output",
            str(updated),
            "--trusted",
            "--softened_images",
            str(SAMPLE),
            *RUNNER,
        ]
    )
    before = moments_counts(sampled_anchor)
    fitted, chosen = expected_counts(paths, SAMPLE)
    assert 0 < chosen < fitted
    assert_levels_sampled(
        moments_counts(updated), before["backbone"] + fitted, before["forensic.blur0.4"] + chosen
    )
    assert main(["info", str(updated)]) == 0
    # trusted images are held out as fit holds out: their sampled copies join the kept ones
    grown = softened_keys(updated)
    assert grown == softened_keys(sampled_anchor) | expected_softened_keys(paths, SAMPLE)

    delta, merged = tmp_path / "site.delta", tmp_path / "merged.safetensors"
    export = ["export-delta", "--anchor", str(updated), "--since", str(sampled_anchor)]
    assert main([*export, "--output", str(delta), "--min_count", "3"]) == 0
    assert main(["merge", str(sampled_anchor), str(delta), "--output", str(merged)]) == 0
    assert moments_counts(merged) == moments_counts(updated)  # a delta merges exactly
    assert softened_keys(merged) == softened_keys(sampled_anchor)  # a delta holds no calibration

    calibrated = tmp_path / "calibrated.safetensors"
    argv = ["calibrate", "--anchor", str(merged), "--input", str(more), "--output", str(calibrated)]
    assert main([*argv, *RUNNER]) == 0
    assert moments_counts(calibrated) == moments_counts(merged)


def test_the_stream_scores_against_and_learns_into_a_sampled_anchor(sampled_anchor, tmp_path):
    watched, trusted = tmp_path / "incoming", tmp_path / "trusted"
    watched.mkdir()
    trusted.mkdir()
    incoming = write_crops(watched, count_per_photo=1, seed=9)
    learned = write_crops(trusted, count_per_photo=1, seed=10)
    anchor = tmp_path / "live.safetensors"
    anchor.write_bytes(sampled_anchor.read_bytes())
    before = moments_counts(anchor)
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
            "6",
            "--settle_seconds",
            "0",
            "--learn_real",
            str(trusted),
            *RUNNER,
        ]
    )
    rows = read_parquet_rows(f"{output}-scores-*.parquet")
    assert sorted(row["uri"] for row in rows) == sorted(incoming)
    after = moments_counts(anchor)  # a window's images are all softened: both counts grow alike
    added = after["backbone"] - before["backbone"]
    assert 0 < added <= len(learned)
    assert_levels_sampled(after, before["backbone"] + added, before["forensic.blur0.4"] + added)
