"""Beam transforms that change an anchor: absorb more real images (`update`, with the poisoning
guard and the fit's hold-out rule) or a flagged generator's images (`flag`). The statistics are
merged by the same CombineFn as `fit`; the final step is one call into anchors.updating."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from anchorscan.anchors import updating
from anchorscan.anchors.anchor import Anchor
from anchorscan.anchors.anchor_file import anchor_to_bytes
from anchorscan.anchors.calibration import holds_out
from anchorscan.anchors.io.storage import write_atomically
from anchorscan.anchors.softness import LEVEL_SETS
from anchorscan.anchors.stats import Moments
from anchorscan.anchors.tables import REFUSED_SCHEMA
from anchorscan.transforms.combine import MomentsCombineFn
from anchorscan.transforms.fitting import calibration_row, calibration_rows, smallest_keys

REFUSED = "refused"


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
            anchor.score(vectors[:, : anchor.spec.dim])["score"] if not keep.all() else np.zeros(len(batch))
        )
        self.admitted.inc(int(keep.sum()))
        self.refused.inc(int((~keep).sum()))
        for row, admit, score in zip(batch, keep, scores):
            if admit:
                yield row
            else:
                yield beam.pvalue.TaggedOutput(REFUSED, {"uri": row[0].uri, "anchor_score": float(score)})


def _write(anchor: Anchor, uri: str, projection) -> str:
    write_atomically(uri, anchor_to_bytes(anchor, projection))
    return uri


def _updated(anchor: Anchor, backbone: Moments, forensic: Moments, pairs: list, forgetting: float) -> Anchor:
    held_out = calibration_rows(pairs) if pairs else None
    return updating.updated(anchor, backbone, forensic, held_out, forgetting)


class UpdateAnchor(beam.PTransform):
    """Embedded real images (rows with every forensic level, as `fit`'s) -> the updated anchor
    file at ``output_uri``, and the refused images' rows. ``anchor`` is the loaded anchor (a
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
        fanout: int = 4,
    ):
        super().__init__()
        self.anchor, self.output_uri, self.spec, self.config = anchor, output_uri, spec, config
        self.projection, self.threshold, self.forgetting, self.fanout = (
            projection,
            threshold,
            forgetting,
            fanout,
        )

    def expand(self, embedded):
        guarded = (
            embedded
            | "GuardBatch" >> beam.BatchElements(min_batch_size=1, max_batch_size=256)
            | "Admit"
            >> beam.ParDo(AdmitFn(self.threshold), beam.pvalue.AsSingleton(self.anchor)).with_outputs(
                REFUSED, main="admitted"
            )
        )
        fraction, group = self.config.calibration_fraction, self.config.calibration_group
        fit_rows, held_rows = guarded.admitted | "HoldOut" >> beam.Partition(
            lambda row, _: int(holds_out(row[0].uri, fraction, group)), 2
        )
        split = self.spec.d_backbone
        width = split + len(LEVEL_SETS[self.config.forensic_levels]) * self.spec.d_forensic

        def moments(name: str, start: int, stop: int):
            return beam.pvalue.AsSingleton(
                fit_rows
                | f"{name}Vectors" >> beam.Map(lambda row: row[1][0][start:stop])
                | f"{name}Moments"
                >> beam.CombineGlobally(MomentsCombineFn(stop - start)).with_fanout(self.fanout)
            )

        held = (
            held_rows
            | "CalibrationRows" >> beam.Map(calibration_row, self.spec.dim)
            | "SmallestKeys" >> smallest_keys()
        )
        written = (
            self.anchor
            | "Update"
            >> beam.Map(
                _updated,
                moments("Backbone", 0, split),
                moments("Forensic", split, width),
                beam.pvalue.AsSingleton(held),
                self.forgetting,
            )
            | "WriteAnchor" >> beam.Map(_write, self.output_uri, self.projection)
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


def _flagged(anchor: Anchor, images: Moments, generator: str) -> Anchor:
    return updating.flagged(anchor, generator, images)


class FlagGenerator(beam.PTransform):
    """Embedded images of one generator -> the anchor with them as a flagged class, at
    ``output_uri``."""

    def __init__(self, anchor, output_uri: str, spec, projection, generator: str):
        super().__init__()
        self.anchor, self.output_uri, self.spec = anchor, output_uri, spec
        self.projection, self.generator = projection, generator

    def expand(self, embedded):
        dim = self.spec.dim
        moments = (
            embedded
            | "Vectors" >> beam.Map(lambda row: row[1][0][:dim])
            | "Moments" >> beam.CombineGlobally(MomentsCombineFn(dim))
        )
        return (
            self.anchor
            | "Flag" >> beam.Map(_flagged, beam.pvalue.AsSingleton(moments), self.generator)
            | "WriteAnchor" >> beam.Map(_write, self.output_uri, self.projection)
        )
