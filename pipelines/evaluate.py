"""Evaluate a detector like the papers do: per-generator AP, AUROC, accuracies and TPR at low FPR
on labelled data in the layouts people already have."""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq

from anchorscan.anchors.layouts import LAYOUTS, read_layout
from anchorscan.anchors.metrics import detection_metrics
from anchorscan.pipelines import score
from anchorscan.anchors.anchor_file import read_metadata
from anchorscan.transforms.io import read_bytes

COLUMNS = ("generator", "n_real", "n_fake", "ap", "auroc", "acc", "real_acc", "fake_acc",
           "tpr_at_fpr1", "tpr_at_fpr5")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="anchorscan evaluate",
        description="Score labelled images and write per-generator metrics. Other options pass "
                    "through to `score`; write them as --name=value (--runner=DataflowRunner) or "
                    "after ROOT, so that their values are not taken for ROOT.")
    parser.add_argument("root", help="the dataset's root folder, or the manifest file for --layout manifest")
    parser.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    parser.add_argument("--anchor", required=True)
    parser.add_argument("--head", default="anchor",
                        help="'anchor' (the calibrated one-class score), a head file from fit-head, "
                             "or anchor+HEAD_FILE: an lda/logistic head's log-odds plus the anchor's "
                             "evidence")
    parser.add_argument("--output", required=True, help="folder for metrics.csv, metrics.md, metrics.json")
    parser.add_argument("--split", default="val", help="genimage: which split to read")
    parser.add_argument("--perturbation", default=None,
                        help="applied to real and fake images alike: jpeg:Q, png, blur:SIGMA, scale:F")
    parser.add_argument("--sweep", default=None,
                        help="comma-separated perturbations to evaluate one after another "
                             "(e.g. jpeg:95,jpeg:75,blur:1); writes sweep.csv")
    return parser.parse_known_args(argv)


def metrics_table(labels: dict[str, tuple[int, str]], rows: list[dict], threshold: float) -> list[dict]:
    """One row per generator and a last `mean` row (the mean of the generators' metrics, as the
    papers report it); ``labels``: uri -> (label, generator). A generator is measured against
    the real images filed under it (ForenSynths, GenImage) or, where it has none, against all
    real images (a manifest with a shared real set)."""
    scored: dict[tuple[int, str], list[float]] = {}
    for row in rows:
        label, generator = labels[row["uri"]]
        scored.setdefault((label, generator), []).append(row["score"])
    all_reals = [s for (label, _), values in scored.items() if label == 0 for s in values]
    table = []
    for generator in sorted(g for label, g in scored if label == 1):
        reals = scored.get((0, generator), all_reals)
        fakes = scored[(1, generator)]
        y = np.r_[np.zeros(len(reals)), np.ones(len(fakes))]
        table.append({"generator": generator,
                      **detection_metrics(y, np.r_[reals, fakes], threshold)})
    if table:
        mean = {"generator": "mean", "n_real": sum(r["n_real"] for r in table),
                "n_fake": sum(r["n_fake"] for r in table)}
        for key in COLUMNS[3:]:
            values = [r[key] for r in table if not math.isnan(r[key])]
            mean[key] = float(np.mean(values)) if values else float("nan")
        table.append(mean)
    return table


def write_table(table: list[dict], folder: str, header: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: row[key] for key in COLUMNS} for row in table)
    with open(os.path.join(folder, "metrics.json"), "w") as handle:
        json.dump({"detector": header, "metrics": table}, handle, indent=2)
    lines = [f"# {header}", "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in table:
        lines.append("| " + " | ".join(_fmt(row[key]) for key in COLUMNS) + " |")
    with open(os.path.join(folder, "metrics.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{100 * value:.2f}" if not math.isnan(value) else "n/a"
    return str(value)


def evaluate_once(images, args, passthrough, folder: str, perturbation: str | None) -> list[dict]:
    os.makedirs(folder, exist_ok=True)
    manifest = os.path.join(folder, "inputs.txt")
    with open(manifest, "w") as handle:
        handle.write("\n".join(image.uri for image in images) + "\n")
    prefix = os.path.join(folder, "scores")
    argv = ["--input", manifest, "--anchor", args.anchor, "--output", prefix, *passthrough]
    if args.head.startswith("anchor+"):
        argv += ["--head", args.head[len("anchor+"):], "--with_anchor"]
    elif args.head != "anchor":
        argv += ["--head", args.head]
    if perturbation:
        argv += ["--perturbation", perturbation]
    score.run(argv)
    rows = pq.read_table(sorted(glob.glob(prefix + "-scores-*.parquet")),
                         columns=["uri", "score"]).to_pylist()
    labels = {image.uri: (image.label, image.generator) for image in images}
    # the anchor calls an image suspect above -log10(fpr); a head above 0
    fpr = read_metadata(read_bytes(args.anchor))["fpr"]
    threshold = -math.log10(fpr) if args.head == "anchor" else 0.0
    detector = "anchor" if args.head == "anchor" else f"head {args.head}"
    header = f"{detector}{f', {perturbation}' if perturbation else ''} on {args.layout} {args.root}"
    table = metrics_table(labels, rows, threshold)
    write_table(table, folder, header)
    unscored = len(images) - len(rows)
    if unscored:
        print(f"{unscored} images could not be scored: see {prefix}-errors-*.parquet")
    return table


def run(argv=None) -> list[dict]:
    args, passthrough = parse_args(argv)
    kwargs = {"split": args.split} if args.layout == "genimage" else {}
    root = args.root if "://" in args.root else os.path.abspath(args.root)
    images = read_layout(args.layout, root, **kwargs)
    if not args.sweep:
        return evaluate_once(images, args, passthrough, args.output, args.perturbation)
    sweep = []
    for perturbation in ["none", *args.sweep.split(",")]:
        slug = perturbation.replace(":", "")
        table = evaluate_once(images, args, passthrough, os.path.join(args.output, slug),
                              None if perturbation == "none" else perturbation)
        sweep.append({"perturbation": perturbation, **table[-1]})
    with open(os.path.join(args.output, "sweep.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["perturbation", *COLUMNS])
        writer.writeheader()
        writer.writerows({key: row[key] for key in ["perturbation", *COLUMNS]} for row in sweep)
    return sweep
