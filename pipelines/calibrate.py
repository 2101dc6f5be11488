"""Calibrate an anchor on your own real images (docs/METHOD.md §5.6): list, decode and embed
them, take them all as the held-out real images the p-values are read against, keep every
statistic as it is, write. False positives on one's own domain (phone photos, a site's
thumbnails) come from a calibration on other photos; this re-derives the thresholds from yours."""

from __future__ import annotations

import dataclasses
import datetime

import apache_beam as beam
import numpy as np

from anchorscan.anchors.anchor import Anchor
from anchorscan.anchors.anchor_file import anchor_from_bytes
from anchorscan.anchors.calibration import (
    CALIBRATION_PREFIX,
    MAX_CALIBRATION_ROWS,
    MIN_CALIBRATION,
    CalibrationRows,
    holds_out,
)
from anchorscan.anchors.errors import NotEnoughImagesError, UserError
from anchorscan.anchors.io.storage import read_checked_file
from anchorscan.pipelines.common import StartingAnchor, anchor_and_extractor, chain_steps
from anchorscan.pipelines.options import (
    add_anchor_output_args,
    error_total,
    errors_table,
    image_flag_groups,
)
from anchorscan.pipelines.runner import BeamCommand
from anchorscan.transforms.chain import ImageFeatures
from anchorscan.transforms.fitting import LoadAnchor, WriteAnchor
from anchorscan.transforms.sinks import WriteErrors

# Fewer of your images than this leave p-values below 1 / n to the calibration's tail model.
FEW_IMAGES = 200
# Refused without --force: more than this share of your (distinct) images flagged by the anchor
# at its own threshold. Real photos of a domain the anchor was not calibrated on raise its
# false-positive rate from the nominal fpr (1 % by default) to some tens of percent; when most
# of them are flagged, the anchor sees them as unlike every real photo it knows, which is what
# generated or processed images (upscales) look like. Calibrating on them moves the thresholds
# above them and their kind is never flagged again.
MOSTLY_FLAGGED = 0.5
# Refused without --force: fewer distinct images (by content) than this share of those read.
# Copies calibrate as one image each; a folder that is mostly copies is not the sample of your
# domain that calibrate is for.
MOSTLY_DISTINCT = 0.5


class CalibrationRefused(UserError, ValueError):
    """Your images would switch detection off; the message says why and that --force overrides."""


def command_flags(parser) -> None:
    add_anchor_output_args(
        parser,
        "the anchor to calibrate (local or gs://)",
        "your real images",
        "the calibrated anchor file to write",
    )
    parser.add_argument(
        "--keep_held_out",
        action="store_true",
        help="calibrate on the anchor's own held-out images and yours together (default: yours alone)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="calibrate even when the anchor flags most of your images or most are copies (for images "
        "you know are real; recorded in the anchor's lineage)",
    )


def content_row(embedded) -> tuple[int, np.ndarray]:
    """An embedded image as (key, features). The key is its content's (copies of one file are one
    image), its last bit the half its perceptual hash falls in: ``cross_calibrated_share``
    splits by that bit, so re-encodes and resizes of one photo are never scored against each
    other, as fit's hold-out keeps them on one side."""
    meta, (vector, _) = embedded
    half = holds_out(meta.uri, 0.5, phash=meta.phash)
    return (int(meta.sha256[:16], 16) & ~1) | int(half), np.asarray(vector)


def calibrated(
    anchor: Anchor, sample: list, read: int, distinct: int, keep_held_out: bool, force: bool
) -> Anchor:
    """``anchor`` calibrated on your distinct images (``sample``: at most MAX_CALIBRATION_ROWS
    of them, the smallest keys), refused where they would switch detection off unless
    ``force``; the lineage records what calibrated it."""
    if not force and distinct < MOSTLY_DISTINCT * read:
        raise CalibrationRefused(
            f"only {distinct} of the {read} images are distinct (by content): calibrate on a "
            "sample of your real images, not copies, or pass --force"
        )
    if distinct < MIN_CALIBRATION:
        raise NotEnoughImagesError(
            f"only {distinct} distinct images of yours could be embedded (need at least {MIN_CALIBRATION})"
        )
    rows = CalibrationRows.merged([CalibrationRows([key for key, _ in sample], [row for _, row in sample])])
    flagged = flagged_share(anchor, rows.features)
    if not force and flagged > MOSTLY_FLAGGED:
        raise CalibrationRefused(
            f"the anchor flags {flagged:.1%} of these images (more than {MOSTLY_FLAGGED:.0%}): "
            "calibrating on them would stop it flagging images like them; calibrate on real photos "
            "of your domain, or pass --force if these are"
        )
    if keep_held_out and anchor.calibration_rows is not None:
        rows = CalibrationRows.merged([anchor.calibration_rows, rows])
    result = anchor.calibrated_on(rows)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    forced = "yes" if force else "no"
    result.lineage += (f"{CALIBRATION_PREFIX}{date} images={read} distinct={distinct} forced={forced}",)
    return result


def flagged_share(anchor: Anchor, features: np.ndarray) -> float:
    return float(np.mean(anchor.assess(features)["is_suspect"])) if len(features) else float("nan")


def cross_calibrated_share(anchor: Anchor, rows: CalibrationRows) -> float:
    """The share of your images an anchor calibrated on the other half of them flags (two
    halves by the keys' last bit: by perceptual hash, ``content_row``): what to expect on more
    images like yours."""
    odd = rows.keys % 2 == 1
    shares = []
    for held in (odd, ~odd):
        if held.sum() >= MIN_CALIBRATION and (~held).sum():
            part = CalibrationRows(rows.keys[held], rows.features[held])
            shares.append(flagged_share(anchor.calibrated_on(part), rows.features[~held]))
    return float(np.mean(shares)) if shares else float("nan")


def graph(pipeline, args, options, prepared: StartingAnchor) -> None:
    anchor = pipeline | "Anchor" >> LoadAnchor(args.anchor)
    steps = chain_steps(args, options, prepared.backbone, prepared.extractor)
    steps = dataclasses.replace(steps, decoding=dataclasses.replace(steps.decoding, perceptual_hash=True))
    yours = pipeline | "Real" >> ImageFeatures(args.input, steps)
    # Every image of yours is a calibration image, each content once: none feeds a statistic.
    rows = yours.embedded | "Rows" >> beam.Map(content_row)
    distinct = rows | "Distinct" >> beam.CombinePerKey(lambda copies: next(iter(copies)))
    sample = distinct | "Sample" >> beam.combiners.Top.Smallest(MAX_CALIBRATION_ROWS, key=lambda row: row[0])
    read = yours.embedded | "Read" >> beam.combiners.Count.Globally()
    distinct_count = distinct | "DistinctCount" >> beam.combiners.Count.Globally()
    _ = (
        anchor
        | "Calibrate"
        >> beam.Map(
            calibrated,
            beam.pvalue.AsSingleton(sample),
            beam.pvalue.AsSingleton(read),
            beam.pvalue.AsSingleton(distinct_count),
            args.keep_held_out,
            args.force,
        )
        | "WriteAnchor" >> WriteAnchor(args.output, prepared.tensors.get("projection"))
    )
    _ = yours.errors | WriteErrors(args.errors or args.output)


def summary(args, prepared: StartingAnchor, counters: dict[str, int]) -> dict:
    before, _ = anchor_from_bytes(read_checked_file(args.anchor), args.anchor)
    after, _ = anchor_from_bytes(read_checked_file(args.output), args.output)
    rows = after.calibration_rows
    assert rows is not None  # calibrated_on keeps them
    return {
        "anchor": args.output,
        "images": after.n_calibration,
        "record": after.lineage[-1],
        "fpr": after.config.fpr,
        "flagged_before": flagged_share(before, rows.features),
        "flagged_after": cross_calibrated_share(before, rows),
        "errors": error_total(counters),
    }


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
        f"lineage     {summary['record']}\n"
        f"flagged     {summary['flagged_before']:.1%} of them before (nominal {summary['fpr']:.1%}); "
        f"{summary['flagged_after']:.1%} after, each half scored by the other half's calibration\n"
        f"time        {summary['seconds']:.1f} s{few}"
    )


COMMAND = BeamCommand(
    "calibrate",
    (command_flags, *image_flag_groups(perturbation=False)),
    anchor_and_extractor,
    tables=errors_table,
    graph=graph,
    summary=summary,
    printed=print_summary,
)
parser, run = COMMAND.parser, COMMAND.run
