"""Update an anchor with more real images: list, decode, embed, guard (unless --trusted), merge
the statistics into the anchor's, calibrate again, write (docs/METHOD.md §9.2). A round the
guard refuses as a whole writes its refused table and no anchor, and exits 2 saying why."""

from __future__ import annotations

import time

import apache_beam as beam

from anchorscan.anchors.anchor import AnchorConfig
from anchorscan.anchors.anchor_file import anchor_from_bytes, read_metadata
from anchorscan.anchors.errors import UsageError, UserError
from anchorscan.anchors.io.storage import read_checked_file
from anchorscan.anchors.softness import softened
from anchorscan.anchors.updating import DEFAULT_ADMIT, ROUND_SHARE, admission_threshold, round_test
from anchorscan.pipelines.common import anchor_and_extractor, chain_steps
from anchorscan.pipelines.flags import admit_value, command_parser, float_in, input_pattern, text
from anchorscan.pipelines.options import (
    INPUT_HELP,
    add_decoding_args,
    add_http_args,
    add_runtime_args,
    add_softening_arg,
    counter_totals,
    error_total,
    parse,
)
from anchorscan.transforms.chain import ImageFeatures
from anchorscan.transforms.fitting import LoadAnchor, UpdateAnchor, WriteRefused, copies_hold_out
from anchorscan.transforms.sinks import WriteErrors, cleaned_on_failure


def parser():
    parser = command_parser("update")
    parser.add_argument("--anchor", type=text, required=True, help="the anchor to update (local or gs://)")
    parser.add_argument(
        "--input", type=input_pattern, action="append", required=True, help=f"real images: {INPUT_HELP}"
    )
    parser.add_argument("--output", type=text, required=True, help="the updated anchor file to write")
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
    parser.add_argument(
        "--errors",
        type=text,
        default=None,
        help="prefix of the errors and refused tables (default: the output's path)",
    )
    add_softening_arg(parser)
    add_runtime_args(parser)
    add_decoding_args(parser)
    add_http_args(parser)
    return parser


def run(argv=None, test_pipeline=None) -> dict:
    args, options = parse(parser(), argv)
    if args.trusted and args.admit is not None:
        raise UsageError("--trusted admits every image; --admit is the guard of untrusted updates")
    tensors, metadata, spec, backbone, extractor = anchor_and_extractor(args)
    config = AnchorConfig.from_dict(metadata["config"])
    admit = "none" if args.trusted else args.admit or DEFAULT_ADMIT
    threshold = admission_threshold(config, admit)

    started = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    anchor = pipeline | "Anchor" >> LoadAnchor(args.anchor)
    steps = chain_steps(args, options, backbone, extractor).for_fitting(
        softened(config.forensic_levels),
        args.softened_images,
        copies_hold_out(config) if args.trusted else None,
    )
    real = pipeline | "Real" >> ImageFeatures(args.input, steps)
    _, refused = real.embedded | "Update" >> UpdateAnchor(
        anchor, args.output, spec, config, tensors.get("projection"), threshold, args.forgetting, args.trusted
    )
    prefix = args.errors or args.output
    _ = refused | WriteRefused(prefix)
    _ = real.errors | WriteErrors(prefix)
    with cleaned_on_failure([f"{prefix}-refused", f"{prefix}-errors"]):
        result = pipeline.run()
        result.wait_until_finish()

    counters = counter_totals(result)
    summary = {
        "anchor": args.output,
        "n_before": metadata["n"],
        "admitted": counters.get("images_admitted", 0),
        "near_threshold": counters.get("images_near_threshold", 0),
        "refused": counters.get("images_refused", 0),
        "round_refused": bool(counters.get("rounds_refused", 0)),
        "admit": admit,
        "trusted": args.trusted,
        "errors": error_total(counters),
        "seconds": time.time() - started,
        "refused_table": f"{prefix}-refused-*.parquet",
    }
    if summary["round_refused"]:
        # The same test the pipeline ran, from the same counts: its reason in words.
        anchor_now, _ = anchor_from_bytes(read_checked_file(args.anchor), args.anchor)
        test = round_test(summary["admitted"], summary["near_threshold"], anchor_now, threshold)
        print_update_summary(summary)
        raise RoundRefused(
            f"{args.output} was not written: {test.reason()} (the round's images: {prefix}-refused-*.parquet)"
        )
    after = read_metadata(read_checked_file(args.output), args.output)
    summary.update(n=after["n"], n_calibration=after["n_calibration"])
    print_update_summary(summary)
    return summary


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
