"""Fit an anchor from embedded real images with Beam's combiners: hold out a calibration slice,
merge the rest's sufficient statistics, score the held-out images against the fitted model and
sketch their distances."""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from anchorscan.anchors.anchor import COMPONENTS, Anchor, AnchorConfig
from anchorscan.anchors.anchor_file import anchor_to_bytes
from anchorscan.anchors.calibration import NUM_QUANTILES, holds_out
from anchorscan.anchors.errors import NotEnoughImagesError, UsageError
from anchorscan.anchors.forensic import LEVEL_SETS, ForensicModel
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.anchors.stats import Moments
from anchorscan.transforms.combine import MomentsCombineFn
from anchorscan.transforms.io import write_atomically

MIN_CALIBRATION = 5


class _CalibrationDistances(beam.DoFn):
    def process(self, batch, anchor: Anchor):
        distances = anchor.distances(np.stack([vector[:anchor.spec.dim] for _, (vector, _) in batch]))
        for name in COMPONENTS:
            for value in distances[name]:
                yield name, float(value)


def _fit_models(backbone: Moments, forensic: Moments, spec: FeatureSpec,
                config: AnchorConfig) -> Anchor:
    levels = tuple(name for name, _ in LEVEL_SETS[config.forensic_levels])
    return Anchor.uncalibrated(spec, backbone, ForensicModel.from_levels(levels, forensic), config)


def _calibrate(anchor: Anchor, sketches: dict, n_calibration: int) -> Anchor:
    if n_calibration < MIN_CALIBRATION:
        raise NotEnoughImagesError(
            f"only {n_calibration} real images were held out for calibration (need at least "
            f"{MIN_CALIBRATION}): add real images or raise --calibration_fraction")
    return anchor.calibrated(sketches, n_calibration)


def _write_anchor(anchor: Anchor, uri: str, projection) -> str:
    write_atomically(uri, anchor_to_bytes(anchor, projection))
    return uri


class FitAnchor(beam.PTransform):
    """Embedded real images -> the anchor file at ``anchor_uri`` (its URI as the output).

    The rows are [semantic ; statistical ; forensic at each softness level] (the extractor's
    ``softened`` output). A stable hash of each URI (or of its ``calibration_group`` match)
    holds out ``calibration_fraction`` of the images: the rest feed the two channels' moments,
    the held-out ones are scored against the fitted models and their distances sketched with
    ApproximateQuantiles.
    """

    def __init__(self, anchor_uri: str, spec: FeatureSpec, config: AnchorConfig, projection,
                 calibration_fraction: float = 0.1, calibration_group: str | None = None,
                 num_quantiles: int = NUM_QUANTILES, fanout: int = 4):
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
            lambda row, _: int(holds_out(row[0].uri, fraction, group)), 2)
        split = self.spec.d_backbone
        levels = len(LEVEL_SETS[self.config.forensic_levels])
        backbone = (fit_rows
                    | "BackboneVectors" >> beam.Map(lambda row: row[1][0][:split])
                    | "BackboneMoments" >> beam.CombineGlobally(
                        MomentsCombineFn(split)).with_fanout(self.fanout))
        forensic = (fit_rows
                    | "ForensicVectors" >> beam.Map(lambda row: row[1][0][split:])
                    | "ForensicMoments" >> beam.CombineGlobally(
                        MomentsCombineFn(levels * self.spec.d_forensic)).with_fanout(self.fanout))
        models = backbone | "FitModels" >> beam.Map(
            _fit_models, beam.pvalue.AsSingleton(forensic), self.spec, self.config)
        sketches = (calibration_rows
                    | "CalibrationBatch" >> beam.BatchElements(max_batch_size=256)
                    | "Distances" >> beam.ParDo(_CalibrationDistances(),
                                                beam.pvalue.AsSingleton(models))
                    | "Quantiles" >> beam.ApproximateQuantiles.PerKey(num_quantiles=self.num_quantiles)
                    | "ToDict" >> beam.combiners.ToDict())
        n_calibration = calibration_rows | "CountCalibration" >> beam.combiners.Count.Globally()
        return (models
                | "Calibrate" >> beam.Map(_calibrate,
                                          beam.pvalue.AsSingleton(sketches, default_value={}),
                                          beam.pvalue.AsSingleton(n_calibration))
                | "WriteAnchor" >> beam.Map(_write_anchor, self.anchor_uri, self.projection))
