"""The Markdown tables of docs/QUALITY.md's round-3 measurement, from report_fold.sh's outputs.

    python tools/devdata/report_tables.py OUT

Per family: AUROC (PNG / JPEG q90) and the share flagged at the anchor's threshold (fpr 1 %)
and at p < 0.05, from evaluate's metrics.csv; per channel alone, the AUROC of -log10 of its
p-value (the p_ columns of the scores); the near-real negatives and the soft real photos: the
share flagged; the LDA probe's AUROC beside the default.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score as auroc

CHANNELS = ("forensic", "semantic", "statistical")
SOFT = [
    *("blur:0.3", "blur:0.45", "blur:0.6", "blur:0.8", "blur:1.0", "blur:1.2"),
    *("defocus:1", "defocus:1.5", "defocus:2.5", "motion:3", "motion:5", "motion:9"),
    *("thumbnail:0.8", "thumbnail:0.625", "thumbnail:0.5"),
]


def group(family: str) -> str:
    if family.startswith(("maxim", "nlm")):
        return "restoration"
    if family.startswith("demosaic"):
        return "demosaic"
    if family == "rife":
        return "frame interpolation"
    if family.startswith("bicubic"):
        return "control (bicubic)"
    return "SR"


def metrics(folder: Path) -> dict[str, dict]:
    with open(folder / "metrics.csv", newline="") as handle:
        return {row["generator"]: row for row in csv.DictReader(handle)}


def labels(path: Path) -> dict[str, tuple[str, str]]:
    with open(path, newline="") as handle:
        return {row["uri"]: (row["label"], row["generator"]) for row in csv.DictReader(handle)}


def scores(folder: Path) -> dict[str, dict]:
    columns = ["uri", "score", "is_suspect", *(f"p_{name}" for name in CHANNELS)]
    table = pa.concat_tables(
        pq.read_table(path, columns=columns) for path in sorted(folder.glob("scores-scores-*.parquet"))
    )
    return {row["uri"]: row for row in table.to_pylist()}


def channel_aurocs(rows: dict[str, dict], truth: dict[str, tuple[str, str]]) -> dict[str, dict[str, float]]:
    """{family: {channel: AUROC}} against the clean reals (generator empty)."""

    def evidence(row, channel):
        return -math.log10(max(row[f"p_{channel}"], 1e-300))

    reals = [row for uri, row in rows.items() if truth[uri] == ("real", "")]
    families = sorted({generator for label, generator in truth.values() if label == "fake"})
    out = {}
    for family in families:
        fakes = [row for uri, row in rows.items() if truth.get(uri) == ("fake", family)]
        y = np.r_[np.zeros(len(reals)), np.ones(len(fakes))]
        out[family] = {
            channel: auroc(y, np.array([evidence(row, channel) for row in reals + fakes]))
            for channel in CHANNELS
        }
    return out


def pct(value: str | float) -> str:
    return f"{100 * float(value):.0f} %"


def main(out: Path) -> None:
    png, jpeg = metrics(out / "default" / "none"), metrics(out / "default" / "jpeg90")
    lda = metrics(out / "lda")
    truth = labels(out / "labels.csv")
    per_channel = channel_aurocs(scores(out / "default" / "none"), truth)
    fakes = [name for name in png if name in per_channel]

    print(
        "| family | group | AUROC PNG / JPEG q90 | flagged at fpr 1 % | flagged at p < 0.05 | "
        "forensic / semantic / statistical alone | LDA probe |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    by_group: dict[str, list[str]] = {}
    for name in sorted(fakes, key=lambda name: (group(name), name)):
        by_group.setdefault(group(name), []).append(name)
        row, after = png[name], jpeg[name]
        alone = " / ".join(f"{per_channel[name][channel]:.2f}" for channel in CHANNELS)
        print(
            f"| {name} | {group(name)} | {float(row['auroc']):.3f} / {float(after['auroc']):.3f} | "
            f"{pct(row['fake_acc'])} / {pct(after['fake_acc'])} | "
            f"{pct(row['fake_acc_p05'])} / {pct(after['fake_acc_p05'])} | {alone} | "
            f"{float(lda[name]['auroc']):.3f} |"
        )
    print()
    print(
        "| group | families | mean AUROC PNG / JPEG q90 | mean flagged at 1 % | at p < 0.05 | "
        "forensic / semantic / statistical alone | LDA probe |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, members in by_group.items():

        def mean(table, column, members=members):
            return float(np.mean([float(table[member][column]) for member in members]))

        alone = " / ".join(
            f"{np.mean([per_channel[member][channel] for member in members]):.2f}" for channel in CHANNELS
        )
        print(
            f"| {name} | {len(members)} | {mean(png, 'auroc'):.3f} / {mean(jpeg, 'auroc'):.3f} | "
            f"{pct(mean(png, 'fake_acc'))} / {pct(mean(jpeg, 'fake_acc'))} | "
            f"{pct(mean(png, 'fake_acc_p05'))} / {pct(mean(jpeg, 'fake_acc_p05'))} | {alone} | "
            f"{mean(lda, 'auroc'):.3f} |"
        )
    first = png[fakes[0]]
    print(
        f"\nclean reals ({first['n_real']}): flagged {pct(1 - float(first['real_acc']))} at fpr 1 %, "
        f"{pct(1 - float(first['real_acc_p05']))} at p < 0.05 (PNG); after JPEG q90 "
        f"{pct(1 - float(jpeg[fakes[0]]['real_acc']))} / {pct(1 - float(jpeg[fakes[0]]['real_acc_p05']))}; "
        f"LDA probe at its threshold: {pct(1 - float(lda[fakes[0]]['real_acc']))}"
    )
    print("\n| real photos after | images | flagged at fpr 1 % | at p < 0.05 |")
    print("| --- | --- | --- | --- |")
    processed = [name for name in png if name not in per_channel and name != "mean"]
    for name in processed:
        row = png[name]
        print(
            f"| {name} | {row['n_real']} | {pct(1 - float(row['real_acc']))} | "
            f"{pct(1 - float(row['real_acc_p05']))} |"
        )
    print("\n| soft real photos | flagged at fpr 1 % | at p < 0.05 |")
    print("| --- | --- | --- |")
    shares = []
    for condition in SOFT:
        rows = scores(out / "soft" / condition.replace(":", "")).values()
        flagged = float(np.mean([row["is_suspect"] for row in rows]))
        loose = float(np.mean([row["score"] > -math.log10(0.05) for row in rows]))
        shares.append((flagged, loose))
        print(f"| {condition} | {pct(flagged)} | {pct(loose)} |")
    print(
        f"| **mean of the {len(SOFT)}** | **{pct(np.mean([s[0] for s in shares]))}** | "
        f"**{pct(np.mean([s[1] for s in shares]))}** |"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
