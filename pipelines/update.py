"""Update an anchor with more real images: list, decode, embed, guard, hold out, merge the
statistics into the anchor's, calibrate again, write (docs/METHOD.md §9.2)."""

from __future__ import annotations

import time

import apache_beam as beam

from anchorscan.anchors.anchor import AnchorConfig
from anchorscan.anchors.anchor_file import read_metadata
from anchorscan.anchors.errors import UsageError
from anchorscan.anchors.io.storage import read_checked_file
from anchorscan.anchors.softness import softened
from anchorscan.anchors.updating import admission_threshold
from anchorscan.pipelines.common import anchor_and_extractor, chain_steps
from anchorscan.pipelines.flags import admit_value, command_parser, float_in, text
from anchorscan.pipelines.options import (
    INPUT_HELP,
    add_decoding_args,
    add_runtime_args,
    counter_totals,
    error_total,
    parse,
)
from anchorscan.transforms.chain import ImageFeatures
from anchorscan.transforms.fitting import LoadAnchor, UpdateAnchor, WriteRefused
from anchorscan.transforms.sinks import WriteErrors


def parser():
    parser = command_parser("update")
    parser.add_argument("--anchor", type=text, required=True, help="the anchor to update (local or gs://)")
    parser.add_argument(
        "--input", type=text, action="append", required=True, help=f"real images: {INPUT_HELP}"
    )
    parser.add_argument("--output", type=text, required=True, help="the updated anchor file to write")
    parser.add_argument(
        "--admit",
        type=admit_value,
        default="fpr",
        help="poisoning guard: admit only images whose p-value against the current "
        "anchor is at least this ('fpr': the anchor's own rate, i.e. what it "
        "does not flag; a p-value; 'none': admit everything)",
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
    add_runtime_args(parser)
    add_decoding_args(parser)
    return parser


def run(argv=None, test_pipeline=None) -> dict:
    args, options = parse(parser(), argv)
    tensors, metadata, spec, backbone, extractor = anchor_and_extractor(args)
    config = AnchorConfig(**metadata["config"])
    threshold = admission_threshold(config, args.admit)
    if not 0.0 < args.forgetting <= 1.0:
        raise UsageError(f"--forgetting must be in (0, 1], got {args.forgetting}")

    started = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    anchor = pipeline | "Anchor" >> LoadAnchor(args.anchor)
    steps = chain_steps(args, options, backbone, extractor).with_softened(softened(config.forensic_levels))
    real = pipeline | "Real" >> ImageFeatures(args.input, steps)
    _, refused = real.embedded | "Update" >> UpdateAnchor(
        anchor, args.output, spec, config, tensors.get("projection"), threshold, args.forgetting
    )
    prefix = args.errors or args.output
    _ = refused | WriteRefused(prefix)
    _ = real.errors | WriteErrors(prefix)
    result = pipeline.run()
    result.wait_until_finish()

    after = read_metadata(read_checked_file(args.output), args.output)
    counters = counter_totals(result)
    summary = {
        "anchor": args.output,
        "n_before": metadata["n"],
        "n": after["n"],
        "n_calibration": after["n_calibration"],
        "admitted": counters.get("images_admitted", 0),
        "refused": counters.get("images_refused", 0),
        "admit": args.admit,
        "errors": error_total(counters),
        "seconds": time.time() - started,
        "refused_table": f"{prefix}-refused-*.parquet",
    }
    print_update_summary(summary)
    return summary


def print_update_summary(summary: dict) -> None:
    print(
        f"anchor      {summary['anchor']}\n"
        f"admitted    {summary['admitted']} images (n {summary['n_before']} -> {summary['n']}, "
        f"{summary['n_calibration']} held out for calibration)\n"
        f"refused     {summary['refused']} images the current anchor flags (--admit "
        f"{summary['admit']}): {summary['refused_table']}\n"
        f"errors      {summary['errors']}\n"
        f"time        {summary['seconds']:.1f} s"
    )
