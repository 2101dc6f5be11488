"""Flag a generator: a few of its images become a labelled fake class of the anchor, whose
Fisher direction joins the score at once (docs/METHOD.md §9.3)."""

from __future__ import annotations

import time

import apache_beam as beam

from anchorscan.anchors.anchor_file import read_metadata
from anchorscan.anchors.io.storage import read_checked_file
from anchorscan.pipelines.common import anchor_and_extractor, chain_steps
from anchorscan.pipelines.flags import command_parser, generator_name, input_pattern, text
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
from anchorscan.transforms.fitting import FlagGenerator, LoadAnchor
from anchorscan.transforms.sinks import WriteErrors, cleaned_on_failure


def parser():
    parser = command_parser("flag")
    parser.add_argument("--anchor", type=text, required=True, help="the anchor (local or gs://)")
    parser.add_argument(
        "--generator",
        type=generator_name,
        required=True,
        help="the generator's name (letters, digits, '_', '.', '-'); flagging "
        "the same name again adds to its images",
    )
    parser.add_argument(
        "--input",
        type=input_pattern,
        action="append",
        required=True,
        help=f"the generator's images: {INPUT_HELP}",
    )
    parser.add_argument("--output", type=text, required=True, help="the anchor file to write")
    parser.add_argument(
        "--errors", type=text, default=None, help="prefix of the errors table (default: the output's path)"
    )
    add_runtime_args(parser)
    add_decoding_args(parser)
    add_http_args(parser)
    return parser


def run(argv=None, test_pipeline=None) -> dict:
    args, options = parse(parser(), argv)
    tensors, metadata, spec, backbone, extractor = anchor_and_extractor(args)

    started = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    anchor = pipeline | "Anchor" >> LoadAnchor(args.anchor)
    images = pipeline | "Images" >> ImageFeatures(args.input, chain_steps(args, options, backbone, extractor))
    _ = images.embedded | "Flag" >> FlagGenerator(
        anchor, args.output, spec, tensors.get("projection"), args.generator
    )
    _ = images.errors | WriteErrors(args.errors or args.output)
    with cleaned_on_failure([f"{args.errors or args.output}-errors"]):
        result = pipeline.run()
        result.wait_until_finish()

    after = read_metadata(read_checked_file(args.output), args.output)
    summary = {
        "anchor": args.output,
        "generator": args.generator,
        "images": after["flagged"][args.generator] - metadata.get("flagged", {}).get(args.generator, 0),
        "flagged": after["flagged"],
        "errors": error_total(counter_totals(result)),
        "seconds": time.time() - started,
    }
    print(
        f"anchor      {summary['anchor']}\n"
        f"flagged     {summary['images']} images of {args.generator} "
        f"(now {after['flagged'][args.generator]}; all flagged: {after['flagged']})\n"
        f"errors      {summary['errors']}\n"
        f"time        {summary['seconds']:.1f} s"
    )
    return summary
