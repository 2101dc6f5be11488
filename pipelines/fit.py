"""Fit an anchor on real images: list, decode, embed, fit (merge statistics, calibrate), write."""

from __future__ import annotations

import dataclasses

from anchorscan.anchors.anchor import (
    ALARM_CALIBRATIONS,
    CALIBRATION_KEYS,
    CHANNELS,
    COMBINERS,
    STATISTICAL_MODES,
    AnchorConfig,
)
from anchorscan.anchors.anchor_file import read_metadata
from anchorscan.anchors.calibration import hold_out_note
from anchorscan.anchors.constraints import ALARM_SHARE, CALIBRATION_FRACTION, EXPLAINED_VARIANCE, FPR
from anchorscan.anchors.io.gcs import check_paths
from anchorscan.anchors.io.storage import check_writable, read_checked_file
from anchorscan.anchors.models.features import BackboneConfig, FeatureExtractor
from anchorscan.anchors.softness import LEVEL_SETS, softened
from anchorscan.pipelines.common import chain_steps, driver_extractor
from anchorscan.pipelines.flags import bounded, checked_flags, choice_list, input_pattern, regex, text
from anchorscan.pipelines.options import (
    INPUT_HELP,
    add_backbone_args,
    add_softening_arg,
    backbone_config,
    error_total,
    image_flag_groups,
)
from anchorscan.pipelines.runner import BeamCommand
from anchorscan.transforms.chain import ImageFeatures
from anchorscan.transforms.fitting import FitAnchor, copies_hold_out
from anchorscan.transforms.sinks import WriteErrors


def command_flags(parser) -> None:
    parser.add_argument(
        "--input", type=input_pattern, action="append", required=True, help=f"real images: {INPUT_HELP}"
    )
    parser.add_argument(
        "--anchor", type=text, required=True, help="the anchor file to write (local or gs://)"
    )
    parser.add_argument(
        "--errors", type=text, default=None, help="prefix of the errors table (default: the anchor's path)"
    )


# The anchor group's bounds, each stated once: its flags' types and anchor_config's checks.
ANCHOR_BOUNDS = {
    "fpr": FPR,
    "explained_variance": EXPLAINED_VARIANCE,
    "calibration_fraction": CALIBRATION_FRACTION,
    "alarm_share": ALARM_SHARE,
}


def anchor_flags(parser) -> None:
    group = parser.add_argument_group("anchor")
    group.add_argument(
        "--calibration_fraction",
        type=bounded(CALIBRATION_FRACTION),
        default=AnchorConfig.calibration_fraction,
        help="share of real images held out (by URI hash) to calibrate p-values",
    )
    group.add_argument(
        "--calibration_group",
        type=regex,
        default=None,
        help="regex: URIs with the same match (its first group) are held out together",
    )
    group.add_argument(
        "--fpr",
        type=bounded(FPR),
        default=AnchorConfig.fpr,
        help="false-positive rate on real images at which is_suspect is set",
    )
    group.add_argument(
        "--explained_variance",
        type=bounded(EXPLAINED_VARIANCE),
        default=AnchorConfig.explained_variance,
        help="variance kept by the statistical part's leading eigenpairs",
    )
    group.add_argument(
        "--combine",
        default=AnchorConfig.combine,
        choices=sorted(COMBINERS),
        help="how the channels' p-values combine: alarms (the first channel ranks, the others join "
        "where they fire on their own), fisher or tippett",
    )
    group.add_argument(
        "--statistical",
        default=AnchorConfig.statistical,
        choices=sorted(STATISTICAL_MODES),
        help="statistical distance decoupled from content, or raw",
    )
    group.add_argument(
        "--channels",
        type=choice_list(CHANNELS),
        default=",".join(AnchorConfig.channels),
        help=f"comma-separated channels the score combines, among {', '.join(CHANNELS)} (with "
        "--combine alarms the first is the primary one)",
    )
    group.add_argument(
        "--calibration_key",
        default=AnchorConfig.calibration_key,
        choices=CALIBRATION_KEYS,
        help="without --calibration_group, what holds images out together: phash (the picture's "
        "perceptual hash: re-encodes and resizes of one photo) or uri",
    )
    group.add_argument(
        "--alarm_share",
        type=bounded(ALARM_SHARE),
        default=AnchorConfig.alarm_share,
        help="with --combine alarms: the share of the --fpr budget each channel after the first "
        "spends; it joins the score only where it fires on its own at that share",
    )
    group.add_argument(
        "--alarm_calibration",
        default=AnchorConfig.alarm_calibration,
        choices=ALARM_CALIBRATIONS,
        help="held_out: the content alarms against all held-out real images, silent at softness "
        "levels too few of them have; per_level: against the held-out images and their softened "
        "copies at the image's softness level (nine more forward passes per held-out image)",
    )
    group.add_argument(
        "--forensic_levels",
        default=AnchorConfig.forensic_levels,
        choices=sorted(LEVEL_SETS),
        help="softness_path: real photos' focus blur and upscales are real; sharp: "
        "only for corpora known to be sharp (more recall, soft photos flagged)",
    )
    add_softening_arg(group)


def anchor_config(args) -> AnchorConfig:
    """The anchor group's settings, each bound checked as its flag's type checks it."""
    checked_flags(ANCHOR_BOUNDS, args)
    return AnchorConfig(
        explained_variance=args.explained_variance,
        fpr=args.fpr,
        combine=args.combine,
        statistical=args.statistical,
        channels=args.channels,
        forensic_levels=args.forensic_levels,
        calibration_fraction=args.calibration_fraction,
        calibration_group=args.calibration_group,
        calibration_key=args.calibration_key,
        alarm_share=args.alarm_share,
        alarm_calibration=args.alarm_calibration,
    )


@dataclasses.dataclass(frozen=True)
class Prepared:
    config: AnchorConfig
    backbone: BackboneConfig
    extractor: FeatureExtractor


def prepare(args, options) -> Prepared:
    check_paths([*args.input, args.anchor, args.errors, args.weights])
    check_writable(args.anchor, "--anchor")
    check_writable(args.errors or args.anchor, "--errors")
    config = anchor_config(args)
    backbone = backbone_config(args)
    # the spec and projection the anchor records
    return Prepared(config, backbone, driver_extractor(backbone))


def graph(pipeline, args, options, prepared: Prepared) -> None:
    config, extractor = prepared.config, prepared.extractor
    # The forensic channel's softness levels are simulated on each real crop as it is embedded
    # (and the backbone sees the held-out ones' softened copies where the alarms need them).
    steps = chain_steps(args, options, prepared.backbone, extractor).for_fitting(
        softened(config.forensic_levels), args.softened_images, copies_hold_out(config)
    )
    real = pipeline | "Real" >> ImageFeatures(args.input, steps)
    _ = real.embedded | "Fit" >> FitAnchor(args.anchor, extractor.spec, config, extractor.projection)
    _ = real.errors | WriteErrors(args.errors or args.anchor)


def summary(args, prepared: Prepared, counters: dict[str, int]) -> dict:
    config = prepared.config
    metadata = read_metadata(read_checked_file(args.anchor), args.anchor)
    return {
        "anchor": args.anchor,
        "n": metadata["n"],
        "n_calibration": metadata["n_calibration"],
        "d": metadata["d"],
        "k": metadata["k"],
        "shrinkage": metadata["shrinkage"],
        "calibration_note": hold_out_note(
            metadata["n_calibration"],
            tuple(config.channels),
            config.combine,
            config.fpr,
            config.alarm_share,
        ),
        "level_calibration": metadata.get("level_calibration", {}),
        "errors": error_total(counters),
    }


def print_fit_summary(summary: dict) -> None:
    images = summary["n"] + summary["n_calibration"]
    print(
        f"anchor      {summary['anchor']}\n"
        f"images      {images} real ({summary['n']} fitted, {summary['n_calibration']} "
        f"held out for calibration), {summary['errors']} errors\n"
        f"features    d={summary['d']}, k={summary['k']}, shrinkage={summary['shrinkage']:.3f}\n"
        f"time        {summary['seconds']:.1f} s ({images / max(summary['seconds'], 1e-9):.1f} images/s)"
    )
    if summary["calibration_note"]:
        print(f"calibration {summary['calibration_note']}")
    if summary.get("level_calibration"):
        counts = ", ".join(f"{level} {n}" for level, n in summary["level_calibration"].items())
        print(
            f"levels      the alarms are calibrated per softness level, each on its held-out images and "
            f"softened copies (ranks reach 1/(n + 1), the tail model below): {counts}; a level "
            "missing here leaves them silent"
        )


COMMAND = BeamCommand(
    "fit",
    (command_flags, anchor_flags, add_backbone_args, *image_flag_groups()),
    prepare,
    tables=lambda args, _: [f"{args.errors or args.anchor}-errors"],
    graph=graph,
    summary=summary,
    printed=print_fit_summary,
    submitted=lambda args, _: {"anchor": args.anchor},
)
parser, run = COMMAND.parser, COMMAND.run
