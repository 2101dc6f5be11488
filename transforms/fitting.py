"""Beam transforms that make or change an anchor from embedded images: fit it on real images,
absorb more real images (`update`, behind the poisoning guard) or a flagged generator's images
(`flag`). Each accumulates through the one statistics step (transforms/statistics.py) and ends
in one call into the maths (anchors/anchor.py, anchors/updating.py) and one write."""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from anchorscan.anchors import channels, updating
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


def hold_out_rule(config: AnchorConfig) -> HoldOut:
    """The configuration's hold-out rule (docs/METHOD.md §5.1)."""
    return HoldOut(config.calibration_fraction, config.calibration_group, config.calibration_key == "phash")


def copies_hold_out(config: AnchorConfig) -> HoldOut | None:
    """The images whose softened copies the backbone embeds at fit time: the held-out ones,
    where the alarms are calibrated per softness level (docs/METHOD.md §5.4); else none."""
    return hold_out_rule(config) if config.alarm_calibration == "per_level" else None


def anchor_layout(spec: FeatureSpec, config: AnchorConfig) -> StatisticsLayout:
    """The statistics an anchor is made of, for rows with every softness level (fit's rows),
    held out by the configuration's rule."""
    return StatisticsLayout.for_anchor(spec, level_names(config.forensic_levels), hold_out_rule(config))


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
    """The guard's first part: batches of embedded images in, those the current anchor does not
    flag out, each with whether it lies in the round test's band (``updating.admission``); the
    others tagged REFUSED as refused-table rows."""

    def __init__(self, threshold: float | None):
        self.threshold = threshold
        self.admitted = Metrics.counter("anchorscan", "images_admitted")
        self.near = Metrics.counter("anchorscan", "images_near_threshold")
        self.refused = Metrics.counter("anchorscan", "images_refused")

    def process(self, batch, anchor: Anchor):
        vectors = np.stack([vector for _, (vector, _) in batch])
        keep, near, scores = updating.admission(anchor, vectors, self.threshold)
        self.admitted.inc(int(keep.sum()))
        self.near.inc(int(near.sum()))
        self.refused.inc(int((~keep).sum()))
        for row, admit, close, score in zip(batch, keep, near, scores):
            if admit:
                yield row, bool(close), float(score)
            else:
                yield beam.pvalue.TaggedOutput(REFUSED, refused_row(row, score, "flagged"))


def _counted_admitted(row):
    Metrics.counter("anchorscan", "images_admitted").inc()
    return row


def refused_row(row, score: float, reason: str) -> dict:
    return {"uri": row[0].uri, "anchor_score": score, "reason": reason}


def _round_test(counts: tuple[int, int], anchor: Anchor, threshold: float | None) -> updating.RoundTest:
    return updating.round_test(*counts, anchor, threshold)


class ApplyRoundTest(beam.DoFn):
    """The guard's second part: an admitted image goes on to the statistics unless its round
    was refused, then it is a REFUSED row (a round is refused whole, never half admitted)."""

    def process(self, admitted, test: updating.RoundTest):
        row, _, score = admitted
        if not test.refused:
            yield row
            return
        yield beam.pvalue.TaggedOutput(REFUSED, refused_row(row, score, "round"))


def _sum_pairs(pairs) -> tuple[int, int]:
    pairs = list(pairs)
    return sum(pair[0] for pair in pairs), sum(pair[1] for pair in pairs)


def _updated(anchor: Anchor, statistics: Statistics, test, forgetting: float, trusted: bool):
    """The updated anchor, or nothing where the round was refused (the anchor is not written)."""
    if test is not None and test.refused:
        Metrics.counter("anchorscan", "rounds_refused").inc()
        return
    yield updating.updated(anchor, statistics, forgetting, trusted)


class UpdateAnchor(beam.PTransform):
    """Embedded real images (rows with every forensic level, as `fit`'s) -> the updated anchor
    file at ``output_uri``, and the refused images' rows. ``anchor``: the loaded anchor (a
    PCollection of one) with its ``spec`` and ``config``. Trusted images are all admitted and
    held out by the anchor's rule, as `fit` holds out; untrusted ones pass the guard
    (docs/METHOD.md §9.2): refused where the anchor flags them (``threshold``), refused as a
    round where the round test fails, none held out, the round's weight bounded."""

    def __init__(
        self,
        anchor,
        output_uri: str,
        spec,
        config,
        projection,
        threshold: float | None,
        forgetting: float = 1.0,
        trusted: bool = False,
    ):
        super().__init__()
        self.anchor, self.output_uri, self.spec, self.config = anchor, output_uri, spec, config
        self.projection, self.threshold, self.forgetting = projection, threshold, forgetting
        self.trusted = trusted

    def expand(self, embedded):
        layout = anchor_layout(self.spec, self.config)
        if self.trusted:
            statistics = (
                embedded
                | "CountTrusted" >> beam.Map(_counted_admitted)
                | "Statistics" >> AccumulateStatistics(layout)
            )
            test, refused = None, embedded.pipeline | "NoneRefused" >> beam.Create([])
        else:
            guarded = (
                embedded
                | "GuardBatch" >> beam.BatchElements(min_batch_size=1, max_batch_size=256)
                | "Admit"
                >> beam.ParDo(AdmitFn(self.threshold), beam.pvalue.AsSingleton(self.anchor)).with_outputs(
                    REFUSED, main="admitted"
                )
            )
            test = (
                guarded.admitted
                | "CountBand" >> beam.Map(lambda admitted: (1, int(admitted[1])))
                | "RoundCounts" >> beam.CombineGlobally(_sum_pairs)
                | "RoundTest" >> beam.Map(_round_test, beam.pvalue.AsSingleton(self.anchor), self.threshold)
            )
            passed = guarded.admitted | "ApplyRoundTest" >> beam.ParDo(
                ApplyRoundTest(), beam.pvalue.AsSingleton(test)
            ).with_outputs(REFUSED, main="passed")
            untrusted = dataclasses.replace(layout, hold_out=None)  # none joins the calibration
            statistics = passed.passed | "Statistics" >> AccumulateStatistics(untrusted)
            refused = (guarded[REFUSED], passed[REFUSED]) | "AllRefused" >> beam.Flatten()
        written = (
            self.anchor
            | "Update"
            >> beam.FlatMap(
                _updated,
                beam.pvalue.AsSingleton(statistics),
                beam.pvalue.AsSingleton(test) if test is not None else None,
                self.forgetting,
                self.trusted,
            )
            | "WriteAnchor" >> WriteAnchor(self.output_uri, self.projection)
        )
        return written, refused


class WriteRefused(beam.PTransform):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def expand(self, rows):
        return rows | "WriteRefused" >> beam.io.WriteToParquet(
            f"{self.prefix}-refused", REFUSED_SCHEMA, file_name_suffix=".parquet"
        )


def _flagged(anchor: Anchor, images: Statistics, generator: str) -> Anchor:
    return updating.flagged(anchor, generator, images.moments[channels.flag_statistic(generator)])


class FlagGenerator(beam.PTransform):
    """Embedded images of one generator -> the anchor with them as a flagged class, at
    ``output_uri``."""

    def __init__(self, anchor, output_uri: str, spec, projection, generator: str):
        super().__init__()
        self.anchor, self.output_uri, self.spec = anchor, output_uri, spec
        self.projection, self.generator = projection, generator

    def expand(self, embedded):
        layout = StatisticsLayout.whole(channels.flag_statistic(self.generator), self.spec.dim)
        statistics = embedded | "Statistics" >> AccumulateStatistics(layout)
        return (
            self.anchor
            | "Flag" >> beam.Map(_flagged, beam.pvalue.AsSingleton(statistics), self.generator)
            | "WriteAnchor" >> WriteAnchor(self.output_uri, self.projection)
        )
