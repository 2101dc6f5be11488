"""Calibrate an anchor on your own real images (docs/METHOD.md §5.6): list, decode and embed
them, take them all as the held-out real images the p-values are read against, keep every
statistic as it is, write. False positives on one's own domain (phone photos, a site's
thumbnails) come from a calibration on other photos; this re-derives the thresholds from yours."""

from __future__ import annotations

import time

import apache_beam as beam
import numpy as np

from anchorscan.anchors.anchor import Anchor
from anchorscan.anchors.anchor_file import anchor_from_bytes
from anchorscan.anchors.calibration import MIN_CALIBRATION, CalibrationRows
from anchorscan.anchors.errors import NotEnoughImagesError
from anchorscan.anchors.io.storage import read_checked_file
from anchorscan.anchors.statistics import HoldOut, Statistics, StatisticsLayout
from anchorscan.pipelines.common import anchor_and_extractor, chain_steps
from anchorscan.pipelines.flags import command_parser, input_pattern, text
from anchorscan.pipelines.options import (
    INPUT_HELP,
    add_decoding_args,
    add_http_args,
    add_runtime_args,
    counter_totals,
    error_total,
    parse,
)
from anchorscan.transforms.chain import ImageFeatures
from anchorscan.transforms.fitting import LoadAnchor, WriteAnchor
from anchorscan.transforms.sinks import WriteErrors, cleaned_on_failure
from anchorscan.transforms.statistics import AccumulateStatistics

# Fewer of your images than this leave p-values below 1 / n to the calibration's tail model.
FEW_IMAGES = 200


def parser():
    parser = command_parser("calibrate")
    parser.add_argument("--anchor", type=text, required=True, help="the anchor to calibrate (local or gs://)")
    parser.add_argument(
        "--input", type=input_pattern, action="append", required=True, help=f"your real images: {INPUT_HELP}"
    )
    parser.add_argument("--output", type=text, required=True, help="the calibrated anchor file to write")
    parser.add_argument(
        "--keep_held_out",
        action="store_true",
        help="calibrate on the anchor's own held-out images and yours together (default: yours alone)",
    )
    parser.add_argument(
        "--errors", type=text, default=None, help="prefix of the errors table (default: the output's path)"
    )
    add_runtime_args(parser)
    add_decoding_args(parser, perturbation=False)
    add_http_args(parser)
    return parser


def calibrated(anchor: Anchor, yours: Statistics, keep_held_out: bool) -> Anchor:
    rows = yours.held_out
    if rows is None or len(rows) < MIN_CALIBRATION:
        raise NotEnoughImagesError(
            f"only {len(rows or ())} of your real images could be embedded (need at least {MIN_CALIBRATION})"
        )
    if keep_held_out and anchor.calibration_rows is not None:
        rows = CalibrationRows.merged([anchor.calibration_rows, rows])
    return anchor.calibrated_on(rows)


def flagged_share(anchor: Anchor, features: np.ndarray) -> float:
    return float(np.mean(anchor.assess(features)["is_suspect"])) if len(features) else float("nan")


def cross_calibrated_share(anchor: Anchor, rows: CalibrationRows) -> float:
    """The share of your images an anchor calibrated on the other half of them flags (two
    halves by key): what to expect on more images like yours."""
    odd = rows.keys % 2 == 1
    shares = []
    for held in (odd, ~odd):
        if held.sum() >= MIN_CALIBRATION and (~held).sum():
            part = CalibrationRows(rows.keys[held], rows.features[held])
            shares.append(flagged_share(anchor.calibrated_on(part), rows.features[~held]))
    return float(np.mean(shares)) if shares else float("nan")


def run(argv=None, test_pipeline=None) -> dict:
    args, options = parse(parser(), argv)
    tensors, _, spec, backbone, extractor = anchor_and_extractor(args)
    started = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    anchor = pipeline | "Anchor" >> LoadAnchor(args.anchor)
    yours = pipeline | "Real" >> ImageFeatures(args.input, chain_steps(args, options, backbone, extractor))
    # Every image of yours is a calibration image: none feeds a statistic.
    layout = StatisticsLayout((), HoldOut(1.0, by_phash=False), spec.dim)
    statistics = yours.embedded | "Statistics" >> AccumulateStatistics(layout)
    _ = (
        anchor
        | "Calibrate" >> beam.Map(calibrated, beam.pvalue.AsSingleton(statistics), args.keep_held_out)
        | "WriteAnchor" >> WriteAnchor(args.output, tensors.get("projection"))
    )
    _ = yours.errors | WriteErrors(args.errors or args.output)
    with cleaned_on_failure([f"{args.errors or args.output}-errors"]):
        result = pipeline.run()
        result.wait_until_finish()

    before, _ = anchor_from_bytes(read_checked_file(args.anchor), args.anchor)
    after, _ = anchor_from_bytes(read_checked_file(args.output), args.output)
    rows = after.calibration_rows
    assert rows is not None  # calibrated_on keeps them
    summary = {
        "anchor": args.output,
        "images": after.n_calibration,
        "fpr": after.config.fpr,
        "flagged_before": flagged_share(before, rows.features),
        "flagged_after": cross_calibrated_share(before, rows),
        "errors": error_total(counter_totals(result)),
        "seconds": time.time() - started,
    }
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    few = (
        f"\nnote        fewer than {FEW_IMAGES} images: p-values below 1/{summary['images']} rest on the "
        "calibration's tail model"
        if summary["images"] < FEW_IMAGES
        else ""
    )
    print(
        f"anchor      {summary['anchor']}\n"
        f"calibrated  on {summary['images']} real images, {summary['errors']} errors\n"
        f"flagged     {summary['flagged_before']:.1%} of them before (nominal {summary['fpr']:.1%}); "
        f"{summary['flagged_after']:.1%} after, each half scored by the other half's calibration\n"
        f"time        {summary['seconds']:.1f} s{few}"
    )
