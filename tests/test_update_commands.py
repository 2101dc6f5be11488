"""update, flag, export-delta and merge end to end on real photo crops (the backbone runs:
slow)."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

from anchorscan.anchors.anchor_file import anchor_from_bytes, read_metadata
from anchorscan.anchors.updating import ROUND_SHARE
from anchorscan.pipelines import fit, score, update
from anchorscan.pipelines.cli import main
from helpers import HOLD_OUT_BY_NAME, RUNNER, read_parquet_rows, write_crops


@pytest.fixture(scope="module")
def more_photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("more")
    write_crops(folder, count_per_photo=4, seed=5)
    return folder


@pytest.fixture(scope="module")
def updated_anchor(fitted_anchor, more_photos, tmp_path_factory):
    anchor, _ = fitted_anchor
    output = tmp_path_factory.mktemp("updated") / "updated.safetensors"
    summary = update.run(
        [
            "--anchor",
            str(anchor),
            "--input",
            str(more_photos),
            "--output",
            str(output),
            "--trusted",
            *RUNNER,
        ]
    )
    return output, summary


def scores_of(anchor, folder, prefix) -> dict:
    score.run(["--input", str(folder), "--anchor", str(anchor), "--output", str(prefix), *RUNNER])
    return {row["uri"]: row for row in read_parquet_rows(f"{prefix}-scores-*.parquet")}


def test_update_scores_like_a_fit_on_both(fitted_anchor, real_photos, more_photos, updated_anchor, tmp_path):
    _anchor, _ = fitted_anchor
    updated, summary = updated_anchor
    union = tmp_path / "union.safetensors"
    fit.run(
        [
            "--input",
            str(real_photos),
            "--input",
            str(more_photos),
            "--anchor",
            str(union),
            "--calibration_fraction",
            "0.3",
            *HOLD_OUT_BY_NAME,
            *RUNNER,
        ]
    )
    a, b = read_metadata(updated.read_bytes()), read_metadata(union.read_bytes())
    assert (a["n"], a["n_calibration"]) == (b["n"], b["n_calibration"])
    assert summary["refused"] == 0 and summary["n"] == a["n"] > summary["n_before"]
    left = scores_of(updated, more_photos, tmp_path / "u")
    right = scores_of(union, more_photos, tmp_path / "f")
    assert left.keys() == right.keys()
    for uri, row in left.items():
        for column in ("score", "semantic", "statistical", "forensic", "p_forensic", "p_semantic"):
            # the same images' features in other batches: CPU kernels sum in another order
            # (about 1e-6 relative, README "Nightly scans"); the maths alone is held to 1e-6 in
            # tests/test_updating.py
            assert row[column] == pytest.approx(right[uri][column], rel=1e-3, abs=1e-6), column
        assert row["component"] == "forensic" and row["p_flagged"] == 1.0


def test_guard_refuses_and_records_flagged_images(fitted_anchor, more_photos, tmp_path, capsys):
    anchor, _ = fitted_anchor
    output = tmp_path / "guarded.safetensors"
    # an admission p-value this strict refuses most real crops: the guard and its table at work
    code = main(
        [
            "update",
            "--anchor",
            str(anchor),
            "--input",
            str(more_photos),
            "--output",
            str(output),
            "--admit",
            "0.9",
            *RUNNER,
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    refused = read_parquet_rows(str(output) + "-refused-*.parquet")
    assert refused and f"refused     {len(refused)} images" in printed
    assert all(
        row["uri"].startswith(str(more_photos))
        and row["anchor_score"] > -np.log10(0.9)
        and row["reason"] == "flagged"
        for row in refused
    )


def test_untrusted_images_never_join_the_calibration(fitted_anchor, more_photos, tmp_path):
    anchor, _ = fitted_anchor
    output = tmp_path / "untrusted.safetensors"
    summary = update.run(
        ["--anchor", str(anchor), "--input", str(more_photos), "--output", str(output), *RUNNER]
    )
    before, after = anchor_from_bytes(anchor.read_bytes())[0], anchor_from_bytes(output.read_bytes())[0]
    assert np.array_equal(after.calibration_rows.keys, before.calibration_rows.keys)
    assert summary["n_calibration"] == before.n_calibration and summary["admitted"] > 0
    # the round counted at most ROUND_SHARE of the anchor's real images
    assert before.moments.n < after.moments.n <= before.moments.n + int(ROUND_SHARE * before.moments.n)


def test_a_round_that_does_not_look_real_is_refused_whole(fitted_anchor, real_photos, tmp_path, capsys):
    """Thumbnails blown up by pixel repetition, admitted without the per-image check (--admit
    none): their p-values pile up in the lowest third, the round is refused, nothing is written
    but its table. (Smoothly upscaled ones look like soft real photos to the softness-aware
    anchor, and with the fixture's 10 held-out images the test needs 12 of 14 in the band.)"""
    from PIL import Image

    anchor, _ = fitted_anchor
    fakes = tmp_path / "upscaled"
    fakes.mkdir()
    for path in sorted(real_photos.glob("*.png"))[:14]:
        image = Image.open(path)
        small = image.resize((image.width // 4, image.height // 4), Image.Resampling.BOX)
        small.resize(image.size, Image.Resampling.NEAREST).save(fakes / path.name)
    output = tmp_path / "poisoned.safetensors"
    argv = [
        "update",
        "--anchor",
        str(anchor),
        "--input",
        str(fakes),
        "--output",
        str(output),
        "--admit",
        "none",
    ]
    assert main([*argv, *RUNNER]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()[-1]
    assert "do not look like real photos as a batch" in error and "--trusted" in error
    assert "the round test refused them all" in captured.out
    assert not output.exists()
    refused = read_parquet_rows(str(output) + "-refused-*.parquet")
    assert len(refused) == 14 and {row["reason"] for row in refused} == {"round"}


def test_flag_then_score_names_the_component(fitted_anchor, real_photos, tmp_path):
    anchor, _ = fitted_anchor
    from PIL import Image, ImageFilter

    fakes = tmp_path / "fakes"
    fakes.mkdir()
    for path in sorted(real_photos.glob("*.png"))[:12]:
        Image.open(path).filter(ImageFilter.GaussianBlur(2)).save(fakes / path.name)
    flagged = tmp_path / "flagged.safetensors"
    assert (
        main(
            [
                "flag",
                "--anchor",
                str(anchor),
                "--generator",
                "blurry",
                "--input",
                str(fakes),
                "--output",
                str(flagged),
                *RUNNER,
            ]
        )
        == 0
    )
    loaded, metadata = anchor_from_bytes(flagged.read_bytes())
    assert metadata["flagged"] == {"blurry": 12} and "flag:blurry" in loaded.calibration
    rows = scores_of(flagged, fakes, tmp_path / "s")
    assert {row["component"] for row in rows.values()} <= {"forensic", "flag:blurry"}
    assert all(0 < row["p_flagged"] <= 1 for row in rows.values())


def test_export_delta_and_merge_from_the_command_line(fitted_anchor, updated_anchor, tmp_path, capsys):
    anchor, _ = fitted_anchor
    updated, _ = updated_anchor
    delta = tmp_path / "site.delta"
    assert (
        main(["export-delta", "--anchor", str(updated), "--since", str(anchor), "--output", str(delta)]) == 2
    )
    assert "at least 64 (--min_count)" in capsys.readouterr().err and not delta.exists()
    assert (
        main(
            [
                "export-delta",
                "--anchor",
                str(updated),
                "--since",
                str(anchor),
                "--output",
                str(delta),
                "--min_count",
                "5",
            ]
        )
        == 0
    )
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(anchor), str(delta), "--output", str(merged)]) == 0
    site, _ = anchor_from_bytes(updated.read_bytes())
    result, _ = anchor_from_bytes(merged.read_bytes())
    assert result.moments.n == site.moments.n
    # Chan's merge of (base, delta) against the site's own statistics: rounding of the
    # subtraction, amplified by n / n_added (about 3 here)
    assert np.allclose(
        result.moments.m2, site.moments.m2, rtol=1e-8, atol=1e-10 * np.abs(site.moments.m2).max()
    )
    assert main(["merge", str(updated), str(delta), "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "images the base already has" in capsys.readouterr().err


def test_calibrate_on_your_own_reals_moves_the_thresholds_not_the_statistics(fitted_anchor, tmp_path):
    from PIL import Image, ImageFilter

    from anchorscan.anchors.anchor_file import statistics_id
    from anchorscan.pipelines import calibrate

    anchor, _ = fitted_anchor
    # A domain of one's own: soft thumbnails, which the anchor's calibration never saw.
    yours = tmp_path / "yours"
    yours.mkdir()
    for path in write_crops(yours, count_per_photo=5, seed=13):
        image = Image.open(path).convert("RGB")
        small = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
        soft = small.resize(image.size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1.5))
        pathlib.Path(path).unlink()
        soft.save(path.rsplit(".", 1)[0] + ".png")
    output = tmp_path / "calibrated.safetensors"
    # The anchor flags most of these: a calibration refused unless forced (the upscales test
    # below), as here, where they are known to be real.
    summary = calibrate.run(
        ["--anchor", str(anchor), "--input", str(yours), "--output", str(output), "--force", *RUNNER]
    )
    before, _ = anchor_from_bytes(anchor.read_bytes())
    after, _ = anchor_from_bytes(output.read_bytes())
    assert statistics_id(after.statistics()) == statistics_id(before.statistics())  # not refitted
    assert after.n_calibration == summary["images"] == len(list(yours.iterdir()))
    assert not np.array_equal(after.calibration["forensic"], before.calibration["forensic"])
    # Each half scored against the other half's calibration: near the nominal rate whatever the
    # old calibration made of these images (30 images: one of 15 is 6.7 %, so 2 in 30 at most).
    assert 0.0 <= summary["flagged_after"] <= 2 / 30 < summary["flagged_before"] + 2 / 30
    kept = tmp_path / "kept.safetensors"
    calibrate.run(
        [
            "--anchor",
            str(anchor),
            "--input",
            str(yours),
            "--output",
            str(kept),
            "--keep_held_out",
            "--force",
            *RUNNER,
        ]
    )
    assert anchor_from_bytes(kept.read_bytes())[0].n_calibration == after.n_calibration + before.n_calibration


def test_calibrate_refuses_upscales_the_anchor_flags_unless_forced(fitted_anchor, tmp_path, capsys):
    """23 bicubic upscales of real photos, all flagged by the anchor: calibrating on them would
    make it flag none of their kind. Refused with nothing written; --force calibrates and the
    lineage says so."""
    from PIL import Image

    anchor, _ = fitted_anchor
    upscales = tmp_path / "upscales"
    upscales.mkdir()
    for i, path in enumerate(write_crops(upscales, count_per_photo=4, seed=17)):
        image = Image.open(path).convert("RGB")
        pathlib.Path(path).unlink()
        if i < 23:
            small = image.resize((image.width // 4, image.height // 4), Image.Resampling.BICUBIC)
            small.resize(image.size, Image.Resampling.BICUBIC).save(path.rsplit(".", 1)[0] + ".png")
    output = tmp_path / "cal" / "calibrated.safetensors"
    output.parent.mkdir()
    argv = ["calibrate", "--anchor", str(anchor), "--input", str(upscales), "--output", str(output), *RUNNER]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    flagged = re.search(r"the anchor flags ([\d.]+)% of these images \(more than 50%\)", error)
    assert flagged and float(flagged.group(1)) > 90 and "--force" in error, error
    assert list(output.parent.iterdir()) == []

    assert main([*argv, "--force"]) == 0
    capsys.readouterr()
    assert main(["info", str(output)]) == 0
    calibrated = [line for line in capsys.readouterr().out.splitlines() if line.startswith("calibrated ")]
    assert len(calibrated) == 1 and calibrated[0].endswith("images=23 distinct=23 forced=yes")


def test_calibrate_refuses_copies_of_one_photo(fitted_anchor, tmp_path, capsys):
    """150 copies of one photo calibrate as one image: refused as mostly duplicates, and forced
    still too few distinct images to calibrate on (never 150 votes for one picture)."""
    anchor, _ = fitted_anchor
    copies = tmp_path / "copies"
    copies.mkdir()
    photo = pathlib.Path(write_crops(tmp_path, count_per_photo=1, seed=3)[0])
    for i in range(150):
        (copies / f"copy_{i}{photo.suffix}").write_bytes(photo.read_bytes())
    output = tmp_path / "cal" / "calibrated.safetensors"
    output.parent.mkdir()
    argv = ["calibrate", "--anchor", str(anchor), "--input", str(copies), "--output", str(output), *RUNNER]
    assert main(argv) == 2
    assert "only 1 of the 150 images are distinct" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 2
    assert "only 1 distinct images of yours" in capsys.readouterr().err
    assert list(output.parent.iterdir()) == []


def test_a_trusted_update_of_six_images_exports_and_merges(fitted_anchor, tmp_path, capsys):
    """Six images: M2 of the few added is near singular, and its subtraction leaves round-off
    below zero on the diagonal (-5e-16 was refused as a forgery); within the PSD tolerance."""
    anchor, _ = fitted_anchor
    six = tmp_path / "six"
    six.mkdir()
    write_crops(six, count_per_photo=1, seed=23)
    site = tmp_path / "site.safetensors"
    argv = ["update", "--anchor", str(anchor), "--input", str(six), "--output", str(site), "--trusted"]
    assert main([*argv, *RUNNER]) == 0
    delta = tmp_path / "site.delta"
    argv = ["export-delta", "--anchor", str(site), "--since", str(anchor), "--output", str(delta)]
    assert main([*argv, "--min_count", "1"]) == 0
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(anchor), str(delta), "--output", str(merged)]) == 0, capsys.readouterr().err
    assert (
        anchor_from_bytes(merged.read_bytes())[0].moments.n
        == anchor_from_bytes(site.read_bytes())[0].moments.n
    )
