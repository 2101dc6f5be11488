"""Update an anchor with more real images: list, decode, embed, guard (unless --trusted), merge
the statistics into the anchor's, calibrate again, write (docs/METHOD.md §9.2). A round the
guard refuses as a whole writes its refused table and no anchor, and exits 2 saying why."""

from __future__ import annotations

import dataclasses

from anchorscan.anchors.anchor import AnchorConfig
from anchorscan.anchors.anchor_file import anchor_from_bytes, read_metadata
from anchorscan.anchors.errors import UsageError, UserError
from anchorscan.anchors.io.storage import read_checked_file
from anchorscan.anchors.softness import softened
from anchorscan.anchors.updating import DEFAULT_ADMIT, ROUND_SHARE, admission_threshold, round_test
from anchorscan.pipelines.common import StartingAnchor, anchor_and_extractor, chain_steps
from anchorscan.pipelines.flags import admit_value, float_in
from anchorscan.pipelines.options import (
    add_anchor_output_args,
    add_softening_arg,
    error_total,
    image_flag_groups,
)
from anchorscan.pipelines.runner import BeamCommand
from anchorscan.transforms.chain import ImageFeatures
from anchorscan.transforms.fitting import LoadAnchor, UpdateAnchor, WriteRefused, copies_hold_out
from anchorscan.transforms.sinks import WriteErrors


def command_flags(parser) -> None:
    add_anchor_output_args(
        parser,
        "the anchor to update (local or gs://)",
        "real images",
        "the updated anchor file to write",
        "the errors and refused tables",
    )
    parser.add_argument(
        "--admit",
        type=admit_value,
        default=None,
        help=f"poisoning guard: admit only images whose p-value against the current anchor is at "
        f"least this ({DEFAULT_ADMIT} by default: within the central 90 %% of its held-out real photos; "
        "'fpr': the anchor's own rate, what it does not flag; 'none': every image, the round test "
        "and the bound still apply)",
    )
    parser.add_argument(
        "--trusted",
        action="store_true",
        help="the images are known real photos (e.g. your own): no guard; held out for calibration "
        "by the anchor's rule, as fit does (then update(fit(A), B) scores like fit(A + B))",
    )
    parser.add_argument(
        "--forgetting",
        type=float_in(0.0, 1.0),
        default=1.0,
        help="weight of the anchor's old statistics, in (0, 1] (1: no forgetting; "
        "below 1 the anchor can no longer export deltas against its base)",
    )
    add_softening_arg(parser)


@dataclasses.dataclass(frozen=True)
class Prepared:
    anchor: StartingAnchor
    config: AnchorConfig
    admit: str
    threshold: float | None  # None: every image admitted


def prepare(args, options) -> Prepared:
    if args.trusted and args.admit is not None:
        raise UsageError("--trusted admits every image; --admit is the guard of untrusted updates")
    anchor = anchor_and_extractor(args)
    config = AnchorConfig.from_dict(anchor.metadata["config"])
    admit = "none" if args.trusted else args.admit or DEFAULT_ADMIT
    return Prepared(anchor, config, admit, admission_threshold(config, admit))


def tables(args, _) -> list[str]:
    prefix = args.errors or args.output
    return [f"{prefix}-refused", f"{prefix}-errors"]


def graph(pipeline, args, options, prepared: Prepared) -> None:
    start = prepared.anchor
    anchor = pipeline | "Anchor" >> LoadAnchor(args.anchor)
    steps = chain_steps(args, options, start.backbone, start.extractor).for_fitting(
        softened(prepared.config.forensic_levels),
        args.softened_images,
        copies_hold_out(prepared.config) if args.trusted else None,
    )
    real = pipeline | "Real" >> ImageFeatures(args.input, steps)
    _, refused = real.embedded | "Update" >> UpdateAnchor(
        anchor,
        args.output,
        start.spec,
        prepared.config,
        start.tensors.get("projection"),
        prepared.threshold,
        args.forgetting,
        args.trusted,
    )
    prefix = args.errors or args.output
    _ = refused | WriteRefused(prefix)
    _ = real.errors | WriteErrors(prefix)


def summary(args, prepared: Prepared, counters: dict[str, int]) -> dict:
    summary = {
        "anchor": args.output,
        "n_before": prepared.anchor.metadata["n"],
        "admitted": counters.get("images_admitted", 0),
        "near_threshold": counters.get("images_near_threshold", 0),
        "refused": counters.get("images_refused", 0),
        "round_refused": bool(counters.get("rounds_refused", 0)),
        "admit": prepared.admit,
        "trusted": args.trusted,
        "errors": error_total(counters),
        "refused_table": f"{args.errors or args.output}-refused-*.parquet",
    }
    if not summary["round_refused"]:
        after = read_metadata(read_checked_file(args.output), args.output)
        summary.update(n=after["n"], n_calibration=after["n_calibration"])
    return summary


def verdict(args, prepared: Prepared, summary: dict) -> None:
    """A round the guard refused as a whole: the same test the pipeline ran, from the same
    counts, says why in words."""
    if summary["round_refused"]:
        anchor_now, _ = anchor_from_bytes(read_checked_file(args.anchor), args.anchor)
        test = round_test(summary["admitted"], summary["near_threshold"], anchor_now, prepared.threshold)
        raise RoundRefused(
            f"{args.output} was not written: {test.reason()} (the round's images: {summary['refused_table']})"
        )


class RoundRefused(UserError):
    """The guard refused the round as a whole: no anchor was written."""


def print_update_summary(summary: dict) -> None:
    if summary["trusted"]:
        admitted = f"{summary['admitted']} trusted images, held out by the anchor's rule"
    elif "n" not in summary:
        admitted = (
            f"none: {summary['admitted']} images passed the per-image check, {summary['near_threshold']} "
            "of them just above the threshold, and the round test refused them all (reason round)"
        )
    else:
        admitted = (
            f"{summary['admitted']} images ({summary['near_threshold']} just above the threshold; "
            f"none held out; a round counts at most {ROUND_SHARE:.0%} of the anchor's images)"
        )
    outcome = (
        f"n {summary['n_before']} -> {summary['n']}, {summary['n_calibration']} held out for calibration"
        if "n" in summary
        else "the round was refused: no anchor written"
    )
    print(
        f"anchor      {summary['anchor']} ({outcome})\n"
        f"admitted    {admitted}\n"
        f"refused     {summary['refused']} images below --admit {summary['admit']} against the "
        f"current anchor: {summary['refused_table']}\n"
        f"errors      {summary['errors']}\n"
        f"time        {summary['seconds']:.1f} s"
    )


COMMAND = BeamCommand(
    "update",
    (command_flags, *image_flag_groups()),
    prepare,
    tables=tables,
    graph=graph,
    summary=summary,
    printed=print_update_summary,
    verdict=verdict,
)
parser, run = COMMAND.parser, COMMAND.run
