"""Fit an anchor from embedded real images with Beam's combiners: hold out a calibration slice,
merge the rest's sufficient statistics, score the held-out images against the fitted model and
sketch their distances."""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from anchorscan.anchors.anchor import Anchor, AnchorConfig
from anchorscan.anchors.anchor_file import anchor_to_bytes
from anchorscan.anchors.calibration import (
    MAX_CALIBRATION_ROWS,
    MIN_CALIBRATION,
    NUM_QUANTILES,
    CalibrationRows,
    holds_out,
    uri_key,
)
from anchorscan.anchors.errors import NotEnoughImagesError, UsageError
from anchorscan.anchors.forensic import ForensicModel
from anchorscan.anchors.io.storage import write_atomically
from anchorscan.anchors.softness import LEVEL_SETS
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.anchors.stats import Moments
from anchorscan.transforms.combine import MomentsCombineFn


def _fit_models(backbone: Moments, forensic: Moments, spec: FeatureSpec, config: AnchorConfig) -> Anchor:
    levels = tuple(name for name, _ in LEVEL_SETS[config.forensic_levels])
    return Anchor.uncalibrated(spec, backbone, ForensicModel.from_levels(levels, forensic), config)


def calibration_row(row, dim: int) -> tuple[int, np.ndarray]:
    """A held-out image as (its URI key, its scoring features)."""
    meta, (vector, _) = row
    return uri_key(meta.uri), vector[:dim]


def smallest_keys(limit: int = MAX_CALIBRATION_ROWS) -> beam.PTransform:
    """The calibration sample: the held-out rows with the smallest URI keys (§5.1)."""
    return beam.combiners.Top.Of(limit, key=lambda pair: pair[0], reverse=True)


def calibration_rows(pairs: list) -> CalibrationRows:
    if not pairs:
        return CalibrationRows([], np.zeros((0, 0)))
    return CalibrationRows([key for key, _ in pairs], np.stack([vector for _, vector in pairs]))


def calibrate(anchor: Anchor, rows: CalibrationRows, num_quantiles: int = NUM_QUANTILES) -> Anchor:
    if len(rows) < MIN_CALIBRATION:
        raise NotEnoughImagesError(
            f"only {len(rows)} real images were held out for calibration (need at least "
            f"{MIN_CALIBRATION}): add real images or raise --calibration_fraction"
        )
    return anchor.calibrated_on(rows, num_quantiles)


def _calibrate(anchor: Anchor, pairs: list, num_quantiles: int) -> Anchor:
    return calibrate(anchor, calibration_rows(pairs), num_quantiles)


def _write_anchor(anchor: Anchor, uri: str, projection) -> str:
    write_atomically(uri, anchor_to_bytes(anchor, projection))
    return uri


class FitAnchor(beam.PTransform):
    """Embedded real images -> the anchor file at ``anchor_uri`` (its URI as the output).

    The rows are [semantic ; statistical ; forensic at each softness level] (the extractor's
    ``softened`` output). A stable hash of each URI (or of its ``calibration_group`` match)
    holds out ``calibration_fraction`` of the images: the rest feed the two channels' moments;
    of the held-out ones, the ``MAX_CALIBRATION_ROWS`` with the smallest URI keys are kept (their
    features go into the anchor), scored against the fitted models and sketched exactly.
    """

    def __init__(
        self,
        anchor_uri: str,
        spec: FeatureSpec,
        config: AnchorConfig,
        projection,
        calibration_fraction: float = 0.1,
        calibration_group: str | None = None,
        num_quantiles: int = NUM_QUANTILES,
        fanout: int = 4,
    ):
        super().__init__()
        if not 0.0 < calibration_fraction < 1.0:
            raise UsageError(f"--calibration_fraction must be in (0, 1), got {calibration_fraction}")
        self.anchor_uri, self.spec, self.config = anchor_uri, spec, config
        self.projection = projection
        self.calibration_fraction, self.calibration_group = calibration_fraction, calibration_group
        self.num_quantiles, self.fanout = num_quantiles, fanout

    def expand(self, embedded):
        fraction, group = self.calibration_fraction, self.calibration_group
        fit_rows, calibration_rows = embedded | "HoldOut" >> beam.Partition(
            lambda row, _: int(holds_out(row[0].uri, fraction, group)), 2
        )
        split = self.spec.d_backbone
        levels = len(LEVEL_SETS[self.config.forensic_levels])
        backbone = (
            fit_rows
            | "BackboneVectors" >> beam.Map(lambda row: row[1][0][:split])
            | "BackboneMoments" >> beam.CombineGlobally(MomentsCombineFn(split)).with_fanout(self.fanout)
        )
        forensic = (
            fit_rows
            | "ForensicVectors" >> beam.Map(lambda row: row[1][0][split:])
            | "ForensicMoments"
            >> beam.CombineGlobally(MomentsCombineFn(levels * self.spec.d_forensic)).with_fanout(self.fanout)
        )
        models = backbone | "FitModels" >> beam.Map(
            _fit_models, beam.pvalue.AsSingleton(forensic), self.spec, self.config
        )
        held_out = (
            calibration_rows
            | "CalibrationRows" >> beam.Map(calibration_row, self.spec.dim)
            | "SmallestKeys" >> smallest_keys()
        )
        return (
            models
            | "Calibrate" >> beam.Map(_calibrate, beam.pvalue.AsSingleton(held_out), self.num_quantiles)
            | "WriteAnchor" >> beam.Map(_write_anchor, self.anchor_uri, self.projection)
        )
