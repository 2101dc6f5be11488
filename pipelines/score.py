"""Score a corpus against an anchor: list, decode, embed, score, write Parquet."""

from __future__ import annotations

import dataclasses

import apache_beam as beam

from anchorscan.anchors.anchor import AnchorConfig
from anchorscan.anchors.anchor_file import anchor_id, verified_contents
from anchorscan.anchors.errors import UsageError
from anchorscan.anchors.io.gcs import check_paths
from anchorscan.anchors.io.storage import check_writable, read_checked_file
from anchorscan.anchors.models.features import BackboneConfig, FeatureExtractor
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.pipelines.common import chain_steps, driver_extractor
from anchorscan.pipelines.flags import input_pattern, text
from anchorscan.pipelines.options import (
    INPUT_HELP,
    add_provenance_args,
    add_score_choice_args,
    backbone_config,
    image_flag_groups,
)
from anchorscan.pipelines.runner import BeamCommand, Guarded
from anchorscan.transforms.carried import carried_columns, score_schema
from anchorscan.transforms.chain import ImageFeatures
from anchorscan.transforms.scoring import RESAMPLED, ScoreChoices, ScoreFeatures, load_head, reused_row
from anchorscan.transforms.sinks import (
    TABLE_NAMES,
    Outputs,
    ReadPreviousScores,
    WriteErrors,
    WriteScores,
    score_tables,
)


def command_flags(parser) -> None:
    parser.add_argument(
        "--input", type=input_pattern, action="append", required=True, help=f"images: {INPUT_HELP}"
    )
    parser.add_argument("--anchor", type=text, required=True, help="the anchor file (local or gs://)")
    parser.add_argument(
        "--output",
        type=text,
        required=True,
        help="prefix of PREFIX-scores-*.parquet and PREFIX-errors-*.parquet",
    )
    parser.add_argument(
        "--head", type=text, default=None, help="a head file from fit-head: its score decides"
    )
    parser.add_argument(
        "--with_anchor",
        action="store_true",
        help="with an lda or logistic --head: add the anchor's evidence to its log-odds",
    )
    add_score_choice_args(parser)
    parser.add_argument(
        "--skip_scored",
        type=text,
        default=None,
        help="PREFIX or glob of earlier scores: content scored with the same detector reuses its row",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the tables that --output already holds (deleted before the scan writes)",
    )


@dataclasses.dataclass(frozen=True)
class Prepared:
    outputs: Outputs
    backbone: BackboneConfig
    extractor: FeatureExtractor
    config: AnchorConfig
    detector: str
    head: str
    carried: list
    previous_tables: list[str]


def prepare(args, options) -> Prepared:
    check_paths([*args.input, args.anchor, args.output, args.head, args.skip_scored, args.weights])
    outputs = Outputs(args.output, TABLE_NAMES)
    check_writable(f"{args.output}-scores", "--output")
    # The driver only checks the anchor; workers derive its scoring matrices.
    _, metadata = verified_contents(read_checked_file(args.anchor), args.anchor)
    spec, config = FeatureSpec.from_dict(metadata), AnchorConfig.from_dict(metadata["config"])
    backbone = backbone_config(args, spec)
    extractor = driver_extractor(backbone)
    spec.require_same(extractor.spec, f"anchor {args.anchor}")  # refuse before any work
    head = check_head(args, extractor.spec)
    return Prepared(
        outputs,
        backbone,
        extractor,
        config,
        anchor_id(metadata),
        head,
        carried_columns(args.input),  # the manifests' other columns, for the score table
        score_tables(args.skip_scored) if args.skip_scored else [],
    )


def graph(pipeline, args, options, prepared: Prepared) -> None:
    """Read, decode, embed, score, write. Each row carries the columns its manifest lists for it."""
    carried = prepared.carried
    previous = (
        pipeline
        | "Previous" >> ReadPreviousScores(prepared.previous_tables, prepared.detector, prepared.head)
        if args.skip_scored
        else None
    )
    steps = chain_steps(args, options, prepared.backbone, prepared.extractor, args.c2pa_trust_anchors)
    names = tuple(name for name, _ in carried)
    scanned = pipeline | "Images" >> ImageFeatures(args.input, steps, names, previous)
    choices = ScoreChoices(args.combine, args.statistical, args.channels, args.with_anchor)
    rows, score_errors = scanned.embedded | "Score" >> ScoreFeatures(
        args.anchor, choices, args.head, carried, provenance=args.provenance
    )
    reused = scanned.reused | "Reused" >> beam.Map(reused_row, carried)
    _ = (rows, reused) | "AllScores" >> beam.Flatten() | WriteScores(args.output, score_schema(carried))
    _ = (*scanned.errors, score_errors) | WriteErrors(args.output)


def summary(args, prepared: Prepared, counters: dict[str, int]) -> dict:
    return {
        "output": args.output,
        "anchor_id": prepared.detector,
        "scored": counters.get("images_scored", 0),
        "reused": counters.get("images_reused", 0),
        "suspect": counters.get("images_suspect", 0),
        "declared_ai": counters.get("images_declared_ai", 0),
        "provenance": {
            k[len("provenance_") :]: v for k, v in counters.items() if k.startswith("provenance_")
        },
        "resampled": counters.get(RESAMPLED, 0),
        "errors": {k[len("errors_") :]: v for k, v in counters.items() if k.startswith("errors_")},
        "fpr": prepared.config.fpr,
    }


def check_head(args, spec: FeatureSpec) -> str:
    """The head's id ("" without one), after checking that it scores these features."""
    if not args.head:
        if args.with_anchor:
            raise UsageError("--with_anchor combines the anchor with a --head; no --head was given")
        return ""
    head, head_id = load_head(args.head, args.with_anchor)
    head.spec.require_same(spec, f"head {args.head}")
    if args.with_anchor and not head.log_odds:
        raise UsageError(
            f"--with_anchor adds the anchor's evidence to a head's log-odds; a "
            f"{head.kind} head's score is not one (use lda or logistic)"
        )
    return head_id


def print_score_summary(summary: dict) -> None:
    scored, errors = summary["scored"], sum(summary["errors"].values())
    by_stage = ", ".join(f"{stage} {count}" for stage, count in sorted(summary["errors"].items()))
    rows = scored + summary["reused"]  # the suspects counted are those of every row written
    rate = summary["suspect"] / rows if rows else 0.0
    reused = f" (+{summary['reused']} reused from earlier scans)" if summary["reused"] else ""
    rows = scored + summary["reused"]
    resampled = summary["resampled"]
    recall = (
        ": resized before storage, as their metadata says; the forensic channel reads fine "
        "pixels that a downscale erases, so fewer generated images are found among these"
        if resampled
        else ""
    )
    print(
        f"scored      {scored} images against anchor {summary['anchor_id']}{reused}\n"
        f"suspect     {summary['suspect']} ({rate:.1%}; expected on real images: "
        f"{summary['fpr']:.1%})\n"
        f"resampled   {resampled} ({resampled / rows if rows else 0.0:.1%}){recall}\n"
        f"{declared_line(summary)}"
        f"errors      {errors}{f' ({by_stage})' if errors else ''}\n"
        f"time        {summary['seconds']:.1f} s "
        f"({(scored + errors) / max(summary['seconds'], 1e-9):.1f} images/s)\n"
        f"output      {summary['output']}-scores-*.parquet, {summary['output']}-errors-*.parquet"
    )


def declared_line(summary: dict) -> str:
    """The summary's line on declared provenance ("" where no file declared anything): the
    declared-AI images count apart from the statistics' suspects."""
    declared = summary["provenance"]
    if not declared:
        return ""
    scored = max(summary["scored"], 1)
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(declared.items()))
    share = sum(declared.values()) / scored
    acted = (
        f"; {summary['declared_ai']} declared AI, suspect whatever the statistics say"
        if summary["declared_ai"]
        else ""
    )
    return f"declared    {kinds} ({share:.1%} of scored{acted})\n"


COMMAND = BeamCommand(
    "score",
    (command_flags, *image_flag_groups(), add_provenance_args),
    prepare,
    tables=lambda args, _: [f"{args.output}-scores", f"{args.output}-errors"],
    graph=graph,
    summary=summary,
    printed=print_score_summary,
    guarded=lambda args, prepared: Guarded(
        prepared.outputs, args.overwrite, [*args.input, *prepared.previous_tables], "table files"
    ),
    submitted=lambda args, prepared: {"output": args.output, "anchor_id": prepared.detector},
)
parser, run, scan = COMMAND.parser, COMMAND.run, COMMAND.execute
