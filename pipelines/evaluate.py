"""Evaluate a detector like the papers do: per-generator AP, AUROC, accuracies and TPR at low FPR
on labelled datasets in the folder structures people already have."""

from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np
from apache_beam.io.filesystems import FileSystems

from anchorscan.anchors.anchor import AnchorConfig
from anchorscan.anchors.anchor_file import read_metadata
from anchorscan.anchors.io.datasets import DATASETS, GENIMAGE_SPLITS, read_dataset
from anchorscan.anchors.io.gcs import check_paths
from anchorscan.anchors.io.storage import check_writable, read_bytes, read_checked_file, write_atomically
from anchorscan.anchors.io.uris import Location
from anchorscan.anchors.metrics import detection_metrics
from anchorscan.pipelines import score
from anchorscan.pipelines.flags import command_parser, perturbation_list, text
from anchorscan.pipelines.options import (
    add_score_choice_args,
    image_flag_groups,
    parse,
)
from anchorscan.transforms.listing import files_below, read_parquet_rows

COLUMNS = (
    "generator",
    "n_real",
    "n_fake",
    "ap",
    "auroc",
    "acc",
    "real_acc",
    "fake_acc",
    "real_acc_p05",
    "fake_acc_p05",
    "tpr_at_fpr1",
    "tpr_at_fpr5",
)


def parser():
    parser = command_parser("evaluate")
    parser.add_argument(
        "root", type=text, help="the dataset's root folder, or the manifest file for --dataset manifest"
    )
    parser.add_argument(
        "--dataset", required=True, choices=DATASETS, help="how the dataset names real and generated images"
    )
    parser.add_argument("--anchor", type=text, required=True, help="the anchor file")
    parser.add_argument(
        "--head",
        type=text,
        default="anchor",
        help="'anchor' (the calibrated one-class score), a head file from fit-head, "
        "or anchor+HEAD_FILE (an lda/logistic head's log-odds plus the anchor's evidence)",
    )
    parser.add_argument(
        "--output",
        type=text,
        required=True,
        help="folder for metrics.csv, metrics.md, metrics.json (local or gs://)",
    )
    parser.add_argument("--split", default="val", choices=GENIMAGE_SPLITS, help="genimage: which split")
    add_score_choice_args(parser, "the anchor's ", statistical=False)
    parser.add_argument(
        "--sweep",
        type=perturbation_list,
        default=None,
        help="comma-separated perturbations evaluated one after another "
        "(e.g. jpeg:95,jpeg:75,blur:1); writes sweep.csv",
    )
    for add in image_flag_groups():
        add(parser)
    return parser


def label_of(labels: dict[str, tuple[int, str]], uri: str) -> tuple[int, str]:
    """A URI's (label, generator); a sample of a tar shard that the manifest labels as a whole
    takes its shard's."""
    if uri in labels:
        return labels[uri]
    sample = Location.parse(uri).shard_and_key
    if sample is None:
        raise KeyError(uri)
    return labels[sample[0]]


def metrics_table(
    labels: dict[str, tuple[int, str]], rows: list[dict], threshold: float, second_threshold: float = math.nan
) -> list[dict]:
    """One row per generator and a last `mean` row (the mean of the generators' metrics, as the
    papers report it); ``labels``: uri -> (label, generator). A generator is measured against
    the real images filed under it (ForenSynths, GenImage) or, where it has none, against all
    real images (a manifest with a shared real set). Real images filed under a name no fake
    has (a processing of real photos: `jpeg_q75`, `watermark`) get a row of their own: the
    share the detector flags among them, at ``threshold`` and ``second_threshold``."""
    scored: dict[tuple[int, str], list[float]] = {}
    for row in rows:
        label, generator = label_of(labels, row["uri"])
        scored.setdefault((label, generator), []).append(row["score"])
    fake_generators = {g for label, g in scored if label == 1}
    # a real image filed as "real" (as many manifests do) is in the shared set too
    processings = sorted(
        g for label, g in scored if label == 0 and g.lower() not in ("", "real") and g not in fake_generators
    )
    all_reals = [
        s for (label, g), values in scored.items() if label == 0 and g not in processings for s in values
    ]
    table = []
    for generator in sorted(fake_generators):
        reals = scored.get((0, generator), all_reals)
        fakes = scored[(1, generator)]
        y = np.r_[np.zeros(len(reals)), np.ones(len(fakes))]
        metrics = detection_metrics(y, np.r_[reals, fakes], threshold, second_threshold)
        table.append({"generator": generator, **metrics})
    for generator in processings:
        reals = scored[(0, generator)]
        metrics = detection_metrics(np.zeros(len(reals)), np.asarray(reals), threshold, second_threshold)
        table.append({"generator": generator, **metrics})
    generators = [row for row in table if row["n_fake"]]  # the papers' mean: over generators
    if generators:
        mean = {
            "generator": "mean",
            "n_real": sum(r["n_real"] for r in generators),
            "n_fake": sum(r["n_fake"] for r in generators),
        }
        for key in COLUMNS[3:]:
            values = [r[key] for r in generators if not math.isnan(r[key])]
            mean[key] = float(np.mean(values)) if values else float("nan")
        table.append(mean)
    elif any(label == 0 for label, _ in scored):  # real images only: a last row pools them
        pooled = np.asarray([s for (label, _), values in scored.items() if label == 0 for s in values])
        table.append(
            {
                "generator": "all",
                **detection_metrics(np.zeros(len(pooled)), pooled, threshold, second_threshold),
            }
        )
    return table


def _csv(rows: list[dict], columns) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: row[key] for key in columns} for row in rows)
    return buffer.getvalue().encode()


def write_table(table: list[dict], folder: str, header: str) -> None:
    write_atomically(FileSystems.join(folder, "metrics.csv"), _csv(table, COLUMNS))
    write_atomically(
        FileSystems.join(folder, "metrics.json"),
        json.dumps({"detector": header, "metrics": table}, indent=2).encode(),
    )
    lines = [f"# {header}", "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in table:
        lines.append("| " + " | ".join(_fmt(row[key]) for key in COLUMNS) + " |")
    write_atomically(FileSystems.join(folder, "metrics.md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines[2:]))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{100 * value:.2f}" if not math.isnan(value) else "n/a"
    return str(value)


def score_args(args, inputs: str, prefix: str, perturbation: str | None):
    """`score`'s flags for one pass over the dataset: those evaluate shares with score (the
    runtime, decoding and http groups, --channels, --combine), the detector that --head names."""
    scan = score.parser().parse_args(["--input", inputs, "--anchor", args.anchor, "--output", prefix])
    for name in (vars(args).keys() & vars(scan).keys()) - {"input", "output", "head"}:
        setattr(scan, name, getattr(args, name))
    scan.perturbation = perturbation
    scan.overwrite = True  # the scores under evaluate's --output are its own, remade each run
    if args.head.startswith("anchor+"):
        scan.head, scan.with_anchor = args.head[len("anchor+") :], True
    elif args.head != "anchor":
        scan.head = args.head
    return scan


def evaluate_once(images, args, options, folder: str, perturbation: str | None) -> list[dict]:
    inputs = FileSystems.join(folder, "inputs.txt")
    write_atomically(inputs, ("\n".join(image.uri for image in images) + "\n").encode())
    prefix = FileSystems.join(folder, "scores")
    score.scan(score_args(args, inputs, prefix, perturbation), options)
    rows = read_parquet_rows(prefix + "-scores-*.parquet", columns=["uri", "score"])
    labels = {image.uri: (image.label, image.generator) for image in images}
    # The anchor calls an image suspect above its threshold; a head above 0.
    threshold, second = (
        (
            AnchorConfig.from_dict(
                read_metadata(read_checked_file(args.anchor), args.anchor)["config"]
            ).threshold,
            -math.log10(0.05),
        )
        if args.head == "anchor"
        else (0.0, math.nan)
    )
    detector = "anchor" if args.head == "anchor" else f"head {args.head}"
    header = f"{detector}{f', {perturbation}' if perturbation else ''} on {args.dataset} {args.root}"
    table = metrics_table(labels, rows, threshold, second)
    write_table(table, folder, header)
    unscored = len(images) - len(rows)
    if unscored > 0:  # a labelled shard counts once among the images and once per sample among the rows
        print(f"{unscored} images could not be scored: see {prefix}-errors-*.parquet")
    return table


def run(argv=None) -> list[dict]:
    args, options = parse(parser(), argv)
    check_paths([args.root, args.anchor, args.head.removeprefix("anchor+"), args.output, args.weights])
    check_writable(FileSystems.join(args.output, "metrics.csv"), "--output")
    root = args.root if Location.parse(args.root).is_remote else os.path.abspath(args.root)
    images = read_dataset(args.dataset, root, files_below, read_bytes, args.split)
    if not args.sweep:
        return evaluate_once(images, args, options, args.output, args.perturbation)
    sweep = []
    for perturbation in ["none", *args.sweep]:
        slug = perturbation.replace(":", "")
        table = evaluate_once(
            images,
            args,
            options,
            FileSystems.join(args.output, slug),
            None if perturbation == "none" else perturbation,
        )
        sweep.append({"perturbation": perturbation, **table[-1]})
    write_atomically(FileSystems.join(args.output, "sweep.csv"), _csv(sweep, ["perturbation", *COLUMNS]))
    return sweep
