"""Score a corpus against an anchor: read, decode, embed, score, write Parquet."""
from __future__ import annotations

import logging
import time

import apache_beam as beam

from anchorscan.anchors.features import BackboneConfig
from anchorscan.pipelines.common import ReadAndEmbed, build_driver_extractor
from anchorscan.pipelines.options import AnchorOptions, counter_totals, pipeline_options, require
from anchorscan.transforms.io import read_bytes
from anchorscan.anchors.anchor import AnchorConfig
from anchorscan.anchors.anchor_file import verified_contents
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.transforms.scoring import ScoreFeatures, load_head
from anchorscan.transforms.sinks import ReadPreviousScores, WriteErrors, WriteScores


def run(argv=None, test_pipeline=None):
    options = pipeline_options(argv, AnchorOptions)
    score = options.view_as(AnchorOptions)
    require(score, "input", "anchor", "output")
    # The driver only checks the anchor; workers derive its scoring matrices.
    _, metadata = verified_contents(read_bytes(score.anchor))
    spec = FeatureSpec.from_dict(metadata)
    config = AnchorConfig(**metadata["config"])
    AnchorConfig(combine=score.combine or config.combine,
                 statistical=score.statistical or config.statistical)  # validates the choices
    backbone = BackboneConfig(score.backbone or spec.backbone, score.weights,
                              score.attention or spec.layout["attention"],
                              score.resize or spec.preprocessing["resize"],
                              spec.layout["d_statistical"], spec.layout["projection_seed"],
                              score.device, score.precision, score.runtime)
    extractor = build_driver_extractor(backbone)
    spec.require_same(extractor.spec, f"anchor {score.anchor}")  # refuse before any work
    head = ""
    if score.head:
        fitted_head, head = load_head(score.head, score.with_anchor)
        fitted_head.spec.require_same(extractor.spec, f"head {score.head}")
        if score.with_anchor and not fitted_head.log_odds:
            raise ValueError(f"--with_anchor adds the anchor's evidence to a head's log-odds; a "
                             f"{fitted_head.kind} head's score is not one (use lda or logistic)")
    elif score.with_anchor:
        raise ValueError("--with_anchor combines the anchor with a --head; no --head was given")

    anchor_id = metadata["checksum"][:16]

    started = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    previous = (pipeline | "Previous" >> ReadPreviousScores(score.skip_scored, anchor_id, head)
                if score.skip_scored else None)
    images = pipeline | "Read" >> ReadAndEmbed(score.input, score, backbone, extractor, previous)
    rows, score_errors = images["embedded"] | "Score" >> ScoreFeatures(
        score.anchor, score.combine, score.statistical, score.head, score.with_anchor)
    _ = (rows, images["reused"]) | "AllScores" >> beam.Flatten() | WriteScores(score.output)
    _ = (images["errors"], score_errors) | WriteErrors(score.output)
    result = pipeline.run()
    result.wait_until_finish()

    counters = counter_totals(result)
    summary = {
        "output": score.output, "anchor_id": anchor_id,
        "scored": counters.get("images_scored", 0), "reused": counters.get("images_reused", 0),
        "suspect": counters.get("images_suspect", 0),
        "errors": {k[len("errors_"):]: v for k, v in counters.items() if k.startswith("errors_")},
        "seconds": time.time() - started, "fpr": config.fpr,
    }
    print_score_summary(summary)
    return summary


def print_score_summary(summary: dict) -> None:
    scored, errors = summary["scored"], sum(summary["errors"].values())
    by_stage = ", ".join(f"{stage} {count}" for stage, count in sorted(summary["errors"].items()))
    rate = summary["suspect"] / scored if scored else 0.0
    reused = f" (+{summary['reused']} reused from earlier scans)" if summary["reused"] else ""
    print(f"scored      {scored} images against anchor {summary['anchor_id']}{reused}\n"
          f"suspect     {summary['suspect']} ({rate:.1%}; expected on real images: "
          f"{summary['fpr']:.1%})\n"
          f"errors      {errors}{f' ({by_stage})' if errors else ''}\n"
          f"time        {summary['seconds']:.1f} s ({(scored + errors) / max(summary['seconds'], 1e-9):.1f} images/s)\n"
          f"output      {summary['output']}-scores-*.parquet, {summary['output']}-errors-*.parquet")


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.WARNING)
    run()
