"""Fit a UnivFD head (nearest neighbour, LDA probe, logistic probe) on labelled images: list,
decode and embed each class, then per-class statistics or banks, then the head's file."""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np

from anchorscan.anchors.errors import NotEnoughImagesError, UsageError
from anchorscan.anchors.heads import (
    FAKE,
    HEADS,
    PARTS,
    REAL,
    LinearProbeHead,
    LogisticHead,
    NearestNeighbourHead,
    head_from_bytes,
)
from anchorscan.anchors.io.gcs import check_paths
from anchorscan.anchors.io.storage import check_writable, read_checked_file, write_atomically
from anchorscan.anchors.models.features import BackboneConfig, FeatureExtractor
from anchorscan.anchors.statistics import StatisticsLayout
from anchorscan.pipelines.common import chain_steps, driver_extractor
from anchorscan.pipelines.flags import int_in, positive_int, text
from anchorscan.pipelines.options import (
    INPUT_HELP,
    add_backbone_args,
    backbone_config,
    error_total,
    errors_table,
    image_flag_groups,
)
from anchorscan.pipelines.runner import BeamCommand
from anchorscan.transforms.chain import ImageFeatures
from anchorscan.transforms.sinks import WriteErrors
from anchorscan.transforms.statistics import AccumulateStatisticsPerKey


def command_flags(parser) -> None:
    parser.add_argument(
        "--kind",
        required=True,
        choices=sorted(HEADS),
        help="nn: nearest neighbour; lda: closed-form linear probe; logistic: the UnivFD paper's probe",
    )
    parser.add_argument(
        "--real", type=text, action="append", required=True, help=f"real images: {INPUT_HELP}"
    )
    parser.add_argument(
        "--fake", type=text, action="append", required=True, help=f"generated images: {INPUT_HELP}"
    )
    parser.add_argument("--output", type=text, required=True, help="the head file to write (local or gs://)")
    parser.add_argument(
        "--errors", type=text, default=None, help="prefix of the errors table (default: the head's path)"
    )
    parser.add_argument(
        "--features",
        default=None,
        choices=PARTS,
        help="what the head reads: every channel (semantic, statistical, forensic; lda only, its "
        "default) or the semantic embedding (UnivFD's probe; nn and logistic read only this)",
    )
    parser.add_argument("--k", type=int_in(1, 1000), default=1, help="nn: neighbours per class")
    parser.add_argument(
        "--max_per_class",
        type=positive_int,
        default=10000,
        help="nn and logistic: bank size per class (a uniform sample)",
    )


def _fit_from_banks(_, banks: dict, kind: str, spec, k: int):
    for label, name in ((REAL, "real"), (FAKE, "fake")):
        if not banks.get(label):
            raise NotEnoughImagesError(f"no {name} image could be embedded: a head needs both classes")
    features = np.concatenate([np.stack(banks[REAL]), np.stack(banks[FAKE])])
    labels = np.r_[np.full(len(banks[REAL]), REAL), np.full(len(banks[FAKE]), FAKE)]
    if kind == "nn":
        return NearestNeighbourHead.fit(spec, features, labels, k=min(k, len(banks[REAL]), len(banks[FAKE])))
    return LogisticHead.fit(spec, features, labels)


def _fit_lda(_, statistics: dict, spec, parts: str):
    if REAL not in statistics or FAKE not in statistics:
        raise NotEnoughImagesError("a head needs both real and fake images that can be embedded")
    real, fake = (statistics[label].moments["class"] for label in (REAL, FAKE))
    return LinearProbeHead.fit(spec, real, fake, parts)


@dataclasses.dataclass(frozen=True)
class Prepared:
    features: str
    backbone: BackboneConfig
    extractor: FeatureExtractor


def prepare(args, options) -> Prepared:
    features = args.features or ("all" if args.kind == "lda" else "semantic")
    if features != "semantic" and args.kind != "lda":
        raise UsageError(
            f"--features {features} is for the lda head; {args.kind} heads read "
            "the semantic embedding, as in UnivFD"
        )
    check_paths([*args.real, *args.fake, args.output, args.errors, args.weights])
    check_writable(args.output, "--output")
    if args.errors:
        check_writable(f"{args.errors}-errors", "--errors")
    backbone = backbone_config(args)
    return Prepared(features, backbone, driver_extractor(backbone))


def graph(pipeline, args, options, prepared: Prepared) -> None:
    spec = prepared.extractor.spec
    steps = chain_steps(args, options, prepared.backbone, prepared.extractor)
    classes, errors = [], []
    for label, name, patterns in ((REAL, "Real", args.real), (FAKE, "Fake", args.fake)):
        images = pipeline | name >> ImageFeatures(patterns, steps, progress_label=f"{name.lower()} images")
        classes.append(images.embedded | f"{name}Label" >> beam.Map(lambda row, label=label: (label, row)))
        errors += images.errors
    labelled = tuple(classes) | "Labelled" >> beam.Flatten()
    once = pipeline | "Once" >> beam.Create([None])
    if args.kind == "lda":
        statistics = (
            labelled
            | "ClassStatistics" >> AccumulateStatisticsPerKey(StatisticsLayout.whole("class", spec.dim))
            | "ByClass" >> beam.combiners.ToDict()
        )
        head = once | "FitHead" >> beam.Map(
            _fit_lda, beam.pvalue.AsSingleton(statistics), spec, prepared.features
        )
    else:
        banks = (
            labelled
            | "Vectors" >> beam.Map(lambda pair: (pair[0], pair[1][1][0]))
            | "Banks" >> beam.combiners.Sample.FixedSizePerKey(args.max_per_class)
            | "BanksByClass" >> beam.combiners.ToDict()
        )
        head = once | "FitHead" >> beam.Map(
            _fit_from_banks, beam.pvalue.AsSingleton(banks), args.kind, spec, args.k
        )
    output = args.output
    _ = head | "WriteHead" >> beam.Map(lambda fitted: write_atomically(output, fitted.to_bytes()))
    _ = tuple(errors) | WriteErrors(args.errors or args.output)


def summary(args, prepared: Prepared, counters: dict[str, int]) -> dict:
    return {
        "output": args.output,
        "kind": args.kind,
        "head": head_from_bytes(read_checked_file(args.output), args.output),
        "errors": error_total(counters),
    }


def print_summary(summary: dict) -> None:
    counts = summary["head"].counts
    print(
        f"head        {summary['output']} ({summary['kind']})\n"
        f"images      {counts['real']} real, {counts['fake']} fake, {summary['errors']} errors\n"
        f"time        {summary['seconds']:.1f} s"
    )


COMMAND = BeamCommand(
    "fit-head",
    (command_flags, add_backbone_args, *image_flag_groups()),
    prepare,
    tables=errors_table,
    graph=graph,
    summary=summary,
    printed=print_summary,
)
parser = COMMAND.parser


def run(argv=None, test_pipeline=None):
    """The fitted head."""
    return COMMAND.run(argv, test_pipeline)["head"]
