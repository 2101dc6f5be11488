"""UnivFD heads through the pipelines, and `evaluate` on the datasets people have."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter
from sklearn.metrics import average_precision_score, roc_auc_score

from anchorscan.anchors.heads import head_from_bytes
from anchorscan.pipelines import evaluate, fit_head, score
from anchorscan.pipelines.evaluate import COLUMNS
from helpers import RUNNER, read_parquet_rows, write_crops


def make_fakes(reals, folder):
    """Stand-ins for generated images: the real crops downscaled and upscaled back (the
    bicubic super-resolution of the development set), then blurred."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in reals:
        image = Image.open(path).convert("RGB")
        small = image.resize((image.width // 4, image.height // 4), Image.BICUBIC)
        fake = small.resize(image.size, Image.BICUBIC).filter(ImageFilter.GaussianBlur(1))
        fake.save(folder / (path.rsplit("/", 1)[1].rsplit(".", 1)[0] + ".png"))
    return sorted(str(p) for p in folder.iterdir())


@pytest.fixture(scope="module")
def forensynths_tree(tmp_path_factory):
    """ROOT/<generator>/{0_real,1_fake}: two 'generators' with their own real images."""
    root = tmp_path_factory.mktemp("forensynths")
    for seed, generator in ((11, "bicubic"), (12, "bicubic_b")):
        reals = write_crops(_mkdir(root / generator / "0_real"), 1, seed=seed)
        make_fakes(reals, root / generator / "1_fake")
    return root


def _mkdir(path):
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module")
def lda_head(real_photos, tmp_path_factory):
    folder = tmp_path_factory.mktemp("head")
    fakes = make_fakes(sorted(str(p) for p in real_photos.glob("*_[0-3].*")), folder / "fake")
    path = folder / "lda.safetensors"
    head = fit_head.run(
        [
            "--kind",
            "lda",
            "--real",
            str(real_photos),
            "--fake",
            str(folder / "fake"),
            "--output",
            str(path),
            *RUNNER,
        ]
    )
    return path, head, len(fakes)


def test_fit_head_counts_both_classes(lda_head, real_photos):
    path, head, fakes = lda_head
    assert head.counts == {"real": len(list(real_photos.iterdir())), "fake": fakes}
    assert head_from_bytes(path.read_bytes()).kind == "lda"


def test_nn_head_bank_is_capped(real_photos, tmp_path):
    fake_folder = tmp_path / "fake"
    make_fakes(sorted(str(p) for p in real_photos.glob("*_[0-2].*")), fake_folder)
    head = fit_head.run(
        [
            "--kind",
            "nn",
            "--real",
            str(real_photos),
            "--fake",
            str(fake_folder),
            "--max_per_class",
            "10",
            "--k",
            "3",
            "--output",
            str(tmp_path / "nn"),
            *RUNNER,
        ]
    )
    assert head.counts == {"real": 10, "fake": 10} and head.k == 3


def test_score_with_a_head_keeps_the_anchor_components(fitted_anchor, lda_head, forensynths_tree, tmp_path):
    anchor, _ = fitted_anchor
    head_path, _head, _ = lda_head
    prefix = str(tmp_path / "out")
    score.run(
        [
            "--input",
            str(forensynths_tree / "bicubic" / "1_fake"),
            "--anchor",
            str(anchor),
            "--head",
            str(head_path),
            "--output",
            prefix,
            *RUNNER,
        ]
    )
    rows = read_parquet_rows(prefix + "-scores-*.parquet")
    assert rows and all(row["head"].startswith("lda:") for row in rows)
    for row in rows:
        assert row["is_suspect"] == (row["score"] > 0)
        assert row["anchor_score"] >= 0 and np.isfinite(row["semantic"])
    # rows from the anchor alone are not reused for a scan with a head, and vice versa
    plain = str(tmp_path / "plain")
    score.run(
        [
            "--input",
            str(forensynths_tree / "bicubic" / "1_fake"),
            "--anchor",
            str(anchor),
            "--output",
            plain,
            *RUNNER,
        ]
    )
    summary = score.run(
        [
            "--input",
            str(forensynths_tree / "bicubic" / "1_fake"),
            "--anchor",
            str(anchor),
            "--head",
            str(head_path),
            "--output",
            str(tmp_path / "again"),
            "--skip_scored",
            plain,
            *RUNNER,
        ]
    )
    assert summary["reused"] == 0 and summary["scored"] == len(rows)


def test_evaluate_writes_per_generator_metrics(fitted_anchor, lda_head, forensynths_tree, tmp_path):
    anchor, _ = fitted_anchor
    head_path, _, _ = lda_head
    out = tmp_path / "eval"
    table = evaluate.run(
        [
            "--dataset",
            "forensynths",
            str(forensynths_tree),
            "--anchor",
            str(anchor),
            "--head",
            str(head_path),
            "--output",
            str(out),
            *RUNNER,
        ]
    )
    with open(out / "metrics.csv") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS
        written = list(reader)
    assert [row["generator"] for row in written] == ["bicubic", "bicubic_b", "mean"]
    assert json.loads((out / "metrics.json").read_text())["metrics"][-1]["generator"] == "mean"
    assert "| bicubic |" in (out / "metrics.md").read_text()

    # The metrics agree with scikit-learn on the scores that were written.
    rows = {row["uri"]: row["score"] for row in read_parquet_rows(str(out / "scores-scores-*.parquet"))}
    generator = forensynths_tree / "bicubic"
    labels = [0] * 6 + [1] * 6
    scores = [rows[str(p)] for p in sorted((generator / "0_real").iterdir())] + [
        rows[str(p)] for p in sorted((generator / "1_fake").iterdir())
    ]
    assert table[0]["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert table[0]["ap"] == pytest.approx(average_precision_score(labels, scores))
    assert table[-1]["auroc"] == pytest.approx(np.mean([table[0]["auroc"], table[1]["auroc"]]))


def test_evaluate_sweep_perturbs_both_classes(fitted_anchor, forensynths_tree, tmp_path):
    anchor, _ = fitted_anchor
    out = tmp_path / "sweep"
    evaluate.run(
        [
            "--dataset",
            "forensynths",
            str(forensynths_tree),
            "--anchor",
            str(anchor),
            "--output",
            str(out),
            "--sweep",
            "jpeg:50",
            *RUNNER,
        ]
    )
    with open(out / "sweep.csv") as handle:
        assert [row["perturbation"] for row in csv.DictReader(handle)] == ["none", "jpeg:50"]
    rows = read_parquet_rows(str(out / "jpeg50" / "scores-scores-*.parquet"))
    assert len(rows) == 24 and all("jpeg50" in row["preprocess"] for row in rows)


def test_anchor_evidence_adds_to_the_heads_log_odds(fitted_anchor, lda_head, forensynths_tree, tmp_path):
    anchor, _ = fitted_anchor
    head_path, _, _ = lda_head
    folder = str(forensynths_tree / "bicubic_b")
    rows = {}
    for name, extra in (("head", []), ("both", ["--with_anchor"])):
        score.run(
            [
                "--input",
                folder,
                "--anchor",
                str(anchor),
                "--head",
                str(head_path),
                "--output",
                str(tmp_path / name),
                *extra,
                *RUNNER,
            ]
        )
        rows[name] = {
            row["uri"]: row for row in read_parquet_rows(str(tmp_path / f"{name}-scores-*.parquet"))
        }
    for uri, head_row in rows["head"].items():
        p = 10.0 ** -head_row["anchor_score"]
        bound = -np.log(-np.e * p * np.log(p)) if p < 1 / np.e else 0.0  # Sellke-Bayarri-Berger
        assert rows["both"][uri]["score"] == pytest.approx(head_row["score"] + bound, abs=1e-9)
        assert rows["both"][uri]["head"] == head_row["head"] + "+anchor"
    table = evaluate.run(
        [
            "--dataset",
            "forensynths",
            str(forensynths_tree),
            "--anchor",
            str(anchor),
            "--head",
            f"anchor+{head_path}",
            "--output",
            str(tmp_path / "eval"),
            *RUNNER,
        ]
    )
    assert table[-1]["generator"] == "mean" and 0 <= table[-1]["auroc"] <= 1


def test_anchor_evidence_needs_a_log_odds_head(fitted_anchor, real_photos, tmp_path):
    anchor, _ = fitted_anchor
    fakes = make_fakes(sorted(str(p) for p in real_photos.glob("*_0.*")), tmp_path / "fake")
    nn = tmp_path / "nn.safetensors"
    fit_head.run(
        [
            "--kind",
            "nn",
            "--real",
            str(real_photos),
            "--fake",
            str(tmp_path / "fake"),
            "--output",
            str(nn),
            *RUNNER,
        ]
    )
    with pytest.raises(ValueError, match="log-odds"):
        score.run(
            [
                "--input",
                fakes[0],
                "--anchor",
                str(anchor),
                "--head",
                str(nn),
                "--with_anchor",
                "--output",
                str(tmp_path / "out"),
                *RUNNER,
            ]
        )


def test_processed_real_photos_get_rows_of_their_own():
    # uri -> (label, generator): a shared real set, one family, and two processings of reals.
    labels = {f"r{i}": (0, "") for i in range(10)}
    labels |= {f"f{i}": (1, "gen") for i in range(10)}
    labels |= {f"j{i}": (0, "jpeg_q75") for i in range(8)} | {f"w{i}": (0, "watermark") for i in range(4)}
    scores = {f"r{i}": 0.1 * i for i in range(10)} | {f"f{i}": 2.0 + i for i in range(10)}
    scores |= {f"j{i}": 2.5 if i < 2 else 0.1 for i in range(8)} | {f"w{i}": 0.1 for i in range(4)}
    rows = [{"uri": uri, "score": value} for uri, value in scores.items()]
    table = {row["generator"]: row for row in evaluate.metrics_table(labels, rows, 2.0, 1.3)}
    assert table["jpeg_q75"]["n_fake"] == 0 and table["jpeg_q75"]["real_acc"] == 6 / 8
    assert table["watermark"]["real_acc"] == 1.0 and np.isnan(table["watermark"]["auroc"])
    assert table["gen"]["fake_acc"] == 9 / 10 and table["gen"]["fake_acc_p05"] == 1.0
    assert table["gen"]["real_acc"] == 1.0  # against the shared reals (the processed ones are apart)


def test_reals_filed_as_real_are_the_shared_real_set():
    labels = {f"r{i}": (0, "real") for i in range(10)} | {f"f{i}": (1, "gen") for i in range(10)}
    rows = [{"uri": f"r{i}", "score": 0.1 * i} for i in range(10)]
    rows += [{"uri": f"f{i}", "score": 2.0 + i} for i in range(10)]
    table = {row["generator"]: row for row in evaluate.metrics_table(labels, rows, 2.0, 1.3)}
    assert "real" not in table and table["gen"]["n_real"] == 10 and table["gen"]["auroc"] == 1.0
