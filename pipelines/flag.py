"""Flag a generator: a few of its images become a labelled fake class of the anchor, whose
Fisher direction joins the score at once (docs/METHOD.md §9.3)."""

from __future__ import annotations

from anchorscan.anchors.anchor_file import read_metadata
from anchorscan.anchors.io.storage import read_checked_file
from anchorscan.pipelines.common import StartingAnchor, anchor_and_extractor, chain_steps
from anchorscan.pipelines.flags import generator_name
from anchorscan.pipelines.options import (
    add_anchor_output_args,
    error_total,
    errors_table,
    image_flag_groups,
)
from anchorscan.pipelines.runner import BeamCommand
from anchorscan.transforms.chain import ImageFeatures
from anchorscan.transforms.fitting import FlagGenerator, LoadAnchor
from anchorscan.transforms.sinks import WriteErrors


def command_flags(parser) -> None:
    add_anchor_output_args(
        parser, "the anchor (local or gs://)", "the generator's images", "the anchor file to write"
    )
    parser.add_argument(
        "--generator",
        type=generator_name,
        required=True,
        help="the generator's name (letters, digits, '_', '.', '-'); flagging "
        "the same name again adds to its images",
    )


def graph(pipeline, args, options, prepared: StartingAnchor) -> None:
    anchor = pipeline | "Anchor" >> LoadAnchor(args.anchor)
    steps = chain_steps(args, options, prepared.backbone, prepared.extractor)
    images = pipeline | "Images" >> ImageFeatures(args.input, steps)
    _ = images.embedded | "Flag" >> FlagGenerator(
        anchor, args.output, prepared.spec, prepared.tensors.get("projection"), args.generator
    )
    _ = images.errors | WriteErrors(args.errors or args.output)


def summary(args, prepared: StartingAnchor, counters: dict[str, int]) -> dict:
    after = read_metadata(read_checked_file(args.output), args.output)
    before = prepared.metadata.get("flagged", {}).get(args.generator, 0)
    return {
        "anchor": args.output,
        "generator": args.generator,
        "images": after["flagged"][args.generator] - before,
        "flagged": after["flagged"],
        "errors": error_total(counters),
    }


def print_summary(summary: dict) -> None:
    generator, flagged = summary["generator"], summary["flagged"]
    print(
        f"anchor      {summary['anchor']}\n"
        f"flagged     {summary['images']} images of {generator} "
        f"(now {flagged[generator]}; all flagged: {flagged})\n"
        f"errors      {summary['errors']}\n"
        f"time        {summary['seconds']:.1f} s"
    )


COMMAND = BeamCommand(
    "flag",
    (command_flags, *image_flag_groups()),
    anchor_and_extractor,
    tables=errors_table,
    graph=graph,
    summary=summary,
    printed=print_summary,
)
parser, run = COMMAND.parser, COMMAND.run
