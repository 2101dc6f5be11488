"""Score feature vectors against an anchor (a side input), in batches, and fit one."""
from __future__ import annotations

import hashlib

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from anchorscan.anchors.anchor import COMPONENTS, Anchor, AnchorConfig, AnchorModel
from anchorscan.anchors.anchor_file import anchor_from_bytes, anchor_to_bytes
from anchorscan.anchors.calibration import holds_out, max_log_bayes_factor
from anchorscan.anchors.heads import head_from_bytes
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.transforms.combine import MomentsCombineFn
from anchorscan.transforms.io import read_bytes, write_atomically
from anchorscan.transforms.schema import error_row
from anchorscan.transforms.threads import limit_blas_threads

ERRORS = "errors"
MIN_CALIBRATION = 5


class ScoreBatchFn(beam.DoFn):
    """Scores batches against the anchor and, given one, a head whose score then decides."""

    def __init__(self, combine: str | None = None, statistical: str | None = None,
                 with_anchor: bool = False):
        self.combine, self.statistical, self.with_anchor = combine, statistical, with_anchor
        self.scored = Metrics.counter("anchorscan", "images_scored")
        self.suspects = Metrics.counter("anchorscan", "images_suspect")

    def process(self, batch, anchor: Anchor, anchor_id: str, head=None, head_id: str = ""):
        finite = []
        for meta, (vector, positions) in batch:
            if np.isfinite(vector).all():
                finite.append((meta, (vector, positions)))
            else:
                yield beam.pvalue.TaggedOutput(
                    ERRORS, error_row(meta.uri, "score", "features are not finite (NaN or inf)"))
        if not finite:
            return
        vectors = np.stack([vector for _, (vector, _) in finite])
        scores = anchor.score(vectors, self.combine, self.statistical)
        scores["anchor_score"] = scores["score"]
        if head is not None:
            scores["score"] = head.score(vectors)
            if self.with_anchor:
                scores["score"] = scores["score"] + max_log_bayes_factor(scores["anchor_score"])
            scores["is_suspect"] = scores["score"] > 0
        self.scored.inc(len(finite))
        self.suspects.inc(int(scores["is_suspect"].sum()))
        for i, (meta, (_, positions)) in enumerate(finite):
            yield {
                "uri": meta.uri, "sha256": meta.sha256,
                **{name: float(scores[name][i]) for name in (
                    "score", "anchor_score", "p_semantic", "p_statistical", "semantic",
                    "statistical", "t2", "spe", "statistical_raw")},
                "is_suspect": bool(scores["is_suspect"][i]), "head": head_id,
                "width": meta.width, "height": meta.height, "preprocess": meta.preprocess,
                "attention_positions": float(positions), "anchor_id": anchor_id,
            }


def load_anchor(uri: str) -> tuple[Anchor, dict]:
    limit_blas_threads()  # the anchor's eigendecompositions run beside torch's threads
    return anchor_from_bytes(read_bytes(uri))


def head_id(head, data: bytes) -> str:
    return f"{head.kind}:{hashlib.sha256(data).hexdigest()[:16]}"


def load_head(uri: str, with_anchor: bool = False) -> tuple:
    data = read_bytes(uri)
    head = head_from_bytes(data)
    return head, head_id(head, data) + ("+anchor" if with_anchor else "")


class ScoreFeatures(beam.PTransform):
    """(ImageMeta, (vector, positions)) -> score rows and error rows; the anchor (and head) files
    are read once into side inputs."""

    def __init__(self, anchor_uri: str, combine: str | None = None, statistical: str | None = None,
                 head_uri: str | None = None, with_anchor: bool = False, max_batch_size: int = 256):
        super().__init__()
        self.anchor_uri, self.combine, self.statistical = anchor_uri, combine, statistical
        self.head_uri, self.with_anchor, self.max_batch_size = head_uri, with_anchor, max_batch_size

    def expand(self, embedded):
        loaded = (embedded.pipeline | "AnchorUri" >> beam.Create([self.anchor_uri])
                  | "LoadAnchor" >> beam.Map(load_anchor))
        anchor = beam.pvalue.AsSingleton(loaded | "Anchor" >> beam.Map(lambda pair: pair[0]))
        anchor_id = beam.pvalue.AsSingleton(
            loaded | "AnchorId" >> beam.Map(lambda pair: pair[1]["checksum"][:16]))
        head_inputs = []
        if self.head_uri:
            head = (embedded.pipeline | "HeadUri" >> beam.Create([self.head_uri])
                    | "LoadHead" >> beam.Map(load_head, self.with_anchor))
            head_inputs = [beam.pvalue.AsSingleton(head | "Head" >> beam.Map(lambda pair: pair[0])),
                           beam.pvalue.AsSingleton(head | "HeadId" >> beam.Map(lambda pair: pair[1]))]
        outputs = (embedded
                   | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.max_batch_size)
                   | "Score" >> beam.ParDo(ScoreBatchFn(self.combine, self.statistical, self.with_anchor),
                                           anchor, anchor_id, *head_inputs).with_outputs(
                                               ERRORS, main="scores"))
        return outputs.scores, outputs[ERRORS]


class _CalibrationDistances(beam.DoFn):
    def process(self, batch, model: AnchorModel):
        distances = model.distances(np.stack([vector for _, (vector, _) in batch]))
        for name in COMPONENTS:
            for value in distances[name]:
                yield name, float(value)


def _build_anchor(moments, spec: FeatureSpec, config: AnchorConfig, model: AnchorModel,
                  sketches: dict, n_calibration: int) -> Anchor:
    if n_calibration < MIN_CALIBRATION:
        raise ValueError(
            f"only {n_calibration} real images were held out for calibration (need at least "
            f"{MIN_CALIBRATION}): add real images or raise --calibration_fraction")
    return Anchor(spec, moments, config,
                  {name: np.asarray(sketches[name]) for name in COMPONENTS}, n_calibration, model)


def _write_anchor(anchor: Anchor, uri: str, projection, version: str) -> str:
    write_atomically(uri, anchor_to_bytes(anchor, projection, version))
    return uri


class FitAnchor(beam.PTransform):
    """Embedded real images -> the anchor file at ``anchor_uri`` (its URI as the output).

    A stable hash of each URI (or of its ``calibration_group`` match) holds out
    ``calibration_fraction`` of the images: the rest feed the
    moments, the held-out ones are scored against the fitted model and their distances sketched
    with ApproximateQuantiles.
    """

    def __init__(self, anchor_uri: str, spec: FeatureSpec, config: AnchorConfig, projection,
                 calibration_fraction: float = 0.1, calibration_group: str | None = None,
                 num_quantiles: int = 1001, fanout: int = 4, version: str = ""):
        super().__init__()
        if not 0.0 < calibration_fraction < 1.0:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
        self.anchor_uri, self.spec, self.config = anchor_uri, spec, config
        self.projection, self.version = projection, version
        self.calibration_fraction, self.calibration_group = calibration_fraction, calibration_group
        self.num_quantiles, self.fanout = num_quantiles, fanout

    def expand(self, embedded):
        fraction, group = self.calibration_fraction, self.calibration_group
        fit_rows, calibration_rows = embedded | "HoldOut" >> beam.Partition(
            lambda row, _: int(holds_out(row[0].uri, fraction, group)), 2)
        moments = (fit_rows
                   | "Vectors" >> beam.Map(lambda row: row[1][0])
                   | "Moments" >> beam.CombineGlobally(
                       MomentsCombineFn(self.spec.dim)).with_fanout(self.fanout))
        d_semantic, explained = self.spec.d_semantic, self.config.explained_variance
        model = moments | "FitModel" >> beam.Map(AnchorModel.fit, d_semantic, explained)
        sketches = (calibration_rows
                    | "CalibrationBatch" >> beam.BatchElements(max_batch_size=256)
                    | "Distances" >> beam.ParDo(_CalibrationDistances(),
                                                beam.pvalue.AsSingleton(model))
                    | "Quantiles" >> beam.ApproximateQuantiles.PerKey(num_quantiles=self.num_quantiles)
                    | "ToDict" >> beam.combiners.ToDict())
        n_calibration = calibration_rows | "CountCalibration" >> beam.combiners.Count.Globally()
        return (moments
                | "BuildAnchor" >> beam.Map(
                    _build_anchor, self.spec, self.config, beam.pvalue.AsSingleton(model),
                    beam.pvalue.AsSingleton(sketches, default_value={}),
                    beam.pvalue.AsSingleton(n_calibration))
                | "WriteAnchor" >> beam.Map(_write_anchor, self.anchor_uri, self.projection,
                                            self.version))
