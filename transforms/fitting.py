"""Beam transforms that make or change an anchor from embedded images: fit it on real images,
absorb more real images (`update`, behind the poisoning guard) or a flagged generator's images
(`flag`). Each accumulates through the one statistics step (transforms/statistics.py) and ends
in one call into the maths (anchors/anchor.py, anchors/updating.py) and one write."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from anchorscan.anchors import updating
from anchorscan.anchors.anchor import Anchor, AnchorConfig
from anchorscan.anchors.anchor_file import anchor_to_bytes
from anchorscan.anchors.calibration import MIN_CALIBRATION, NUM_QUANTILES
from anchorscan.anchors.errors import NotEnoughImagesError
from anchorscan.anchors.io.storage import write_atomically
from anchorscan.anchors.softness import level_names
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.anchors.statistics import HoldOut, Statistics, StatisticsLayout
from anchorscan.anchors.tables import REFUSED_SCHEMA
from anchorscan.transforms.scoring import load_anchor
from anchorscan.transforms.statistics import AccumulateStatistics

REFUSED = "refused"


def anchor_layout(spec: FeatureSpec, config: AnchorConfig) -> StatisticsLayout:
    """The statistics an anchor is made of, for rows with every softness level (fit's rows),
    held out by the configuration's rule."""
    hold_out = HoldOut(
        config.calibration_fraction, config.calibration_group, config.calibration_key == "phash"
    )
    return StatisticsLayout.for_anchor(spec, level_names(config.forensic_levels), hold_out)


def fitted(
    statistics: Statistics, spec: FeatureSpec, config: AnchorConfig, num_quantiles: int = NUM_QUANTILES
):
    """The anchor on real images' statistics, calibrated on their held-out rows."""
    held_out = statistics.held_out
    if held_out is None or len(held_out) < MIN_CALIBRATION:
        raise NotEnoughImagesError(
            f"only {len(held_out or ())} real images were held out for calibration (need at "
            f"least {MIN_CALIBRATION}): add real images or raise --calibration_fraction"
        )
    anchor = Anchor.from_statistics(spec, config, statistics.moments)
    return anchor.calibrated_on(held_out, num_quantiles)


class LoadAnchor(beam.PTransform):
    """The anchor file at ``uri`` as a one-element PCollection, read where the pipeline runs."""

    def __init__(self, uri: str):
        super().__init__()
        self.uri = uri

    def expand(self, pipeline):
        return (
            pipeline
            | "AnchorUri" >> beam.Create([self.uri])
            | "Read" >> beam.Map(lambda uri: load_anchor(uri)[0])
        )


def _write(anchor: Anchor, uri: str, projection) -> str:
    write_atomically(uri, anchor_to_bytes(anchor, projection))
    return uri


class WriteAnchor(beam.PTransform):
    """An anchor -> its file at ``uri`` (the URI as the output); ``projection``: the
    statistical projection the file records."""

    def __init__(self, uri: str, projection):
        super().__init__()
        self.uri, self.projection = uri, projection

    def expand(self, anchors):
        return anchors | beam.Map(_write, self.uri, self.projection)


class FitAnchor(beam.PTransform):
    """Embedded real images (rows with every forensic level) -> the anchor file at
    ``anchor_uri``: the statistics of the images the hold-out rule keeps, the models fitted
    on them, calibrated on the held-out images' distances (at most ``MAX_CALIBRATION_ROWS``,
    those with the smallest URI keys, kept in the anchor)."""

    def __init__(
        self,
        anchor_uri: str,
        spec: FeatureSpec,
        config: AnchorConfig,
        projection,
        num_quantiles: int = NUM_QUANTILES,
    ):
        super().__init__()
        self.anchor_uri, self.spec, self.config = anchor_uri, spec, config
        self.projection, self.num_quantiles = projection, num_quantiles

    def expand(self, embedded):
        return (
            embedded
            | "Statistics" >> AccumulateStatistics(anchor_layout(self.spec, self.config))
            | "Fit" >> beam.Map(fitted, self.spec, self.config, self.num_quantiles)
            | "WriteAnchor" >> WriteAnchor(self.anchor_uri, self.projection)
        )


class AdmitFn(beam.DoFn):
    """The poisoning guard: batches of embedded images in, those the current anchor does not
    flag out; the others tagged REFUSED as (uri, score) rows."""

    def __init__(self, threshold: float | None):
        self.threshold = threshold
        self.admitted = Metrics.counter("anchorscan", "images_admitted")
        self.refused = Metrics.counter("anchorscan", "images_refused")

    def process(self, batch, anchor: Anchor):
        vectors = np.stack([vector for _, (vector, _) in batch])
        keep = updating.admitted(anchor, vectors, self.threshold)
        scores = (
            anchor.assess(vectors[:, : anchor.spec.dim])["score"] if not keep.all() else np.zeros(len(batch))
        )
        self.admitted.inc(int(keep.sum()))
        self.refused.inc(int((~keep).sum()))
        for row, admit, score in zip(batch, keep, scores):
            if admit:
                yield row
            else:
                yield beam.pvalue.TaggedOutput(REFUSED, {"uri": row[0].uri, "anchor_score": float(score)})


class UpdateAnchor(beam.PTransform):
    """Embedded real images (rows with every forensic level, as `fit`'s) -> the updated anchor
    file at ``output_uri``, and the refused images' rows. ``anchor``: the loaded anchor (a
    PCollection of one) with its ``spec`` and ``config``, whose hold-out rule applies."""

    def __init__(
        self,
        anchor,
        output_uri: str,
        spec,
        config,
        projection,
        threshold: float | None,
        forgetting: float = 1.0,
    ):
        super().__init__()
        self.anchor, self.output_uri, self.spec, self.config = anchor, output_uri, spec, config
        self.projection, self.threshold, self.forgetting = projection, threshold, forgetting

    def expand(self, embedded):
        guarded = (
            embedded
            | "GuardBatch" >> beam.BatchElements(min_batch_size=1, max_batch_size=256)
            | "Admit"
            >> beam.ParDo(AdmitFn(self.threshold), beam.pvalue.AsSingleton(self.anchor)).with_outputs(
                REFUSED, main="admitted"
            )
        )
        statistics = guarded.admitted | "Statistics" >> AccumulateStatistics(
            anchor_layout(self.spec, self.config)
        )
        written = (
            self.anchor
            | "Update" >> beam.Map(updating.updated, beam.pvalue.AsSingleton(statistics), self.forgetting)
            | "WriteAnchor" >> WriteAnchor(self.output_uri, self.projection)
        )
        return written, guarded[REFUSED]


class WriteRefused(beam.PTransform):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def expand(self, rows):
        return rows | "WriteRefused" >> beam.io.WriteToParquet(
            f"{self.prefix}-refused", REFUSED_SCHEMA, file_name_suffix=".parquet"
        )


def _flagged(anchor: Anchor, images: Statistics, generator: str) -> Anchor:
    return updating.flagged(anchor, generator, images.moments[f"flag.{generator}"])


class FlagGenerator(beam.PTransform):
    """Embedded images of one generator -> the anchor with them as a flagged class, at
    ``output_uri``."""

    def __init__(self, anchor, output_uri: str, spec, projection, generator: str):
        super().__init__()
        self.anchor, self.output_uri, self.spec = anchor, output_uri, spec
        self.projection, self.generator = projection, generator

    def expand(self, embedded):
        layout = StatisticsLayout.whole(f"flag.{self.generator}", self.spec.dim)
        statistics = embedded | "Statistics" >> AccumulateStatistics(layout)
        return (
            self.anchor
            | "Flag" >> beam.Map(_flagged, beam.pvalue.AsSingleton(statistics), self.generator)
            | "WriteAnchor" >> WriteAnchor(self.output_uri, self.projection)
        )
