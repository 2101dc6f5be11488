"""Score feature vectors against an anchor (a side input), in batches."""

from __future__ import annotations

import hashlib

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from anchorscan.anchors import anchor_file
from anchorscan.anchors.anchor import Anchor
from anchorscan.anchors.calibration import max_log_bayes_factor
from anchorscan.anchors.heads import head_from_bytes
from anchorscan.anchors.io.storage import read_bytes
from anchorscan.anchors.tables import error_row, score_row
from anchorscan.anchors.threads import limit_blas_threads

ERRORS = "errors"


class ScoreBatchFn(beam.DoFn):
    """Scores batches against the anchor and, given one, a head whose score then decides."""

    def __init__(
        self,
        combine: str | None = None,
        statistical: str | None = None,
        channels: tuple[str, ...] | None = None,
        with_anchor: bool = False,
    ):
        self.combine, self.statistical, self.channels = combine, statistical, channels
        self.with_anchor = with_anchor
        self.scored = Metrics.counter("anchorscan", "images_scored")
        self.suspects = Metrics.counter("anchorscan", "images_suspect")

    def process(self, batch, anchor: Anchor, anchor_id: str, head=None, head_id: str = ""):
        finite = []
        for meta, (vector, positions) in batch:
            if np.isfinite(vector).all():
                finite.append((meta, (vector, positions)))
            else:
                yield beam.pvalue.TaggedOutput(
                    ERRORS, error_row(meta.uri, "score", "features are not finite (NaN or inf)")
                )
        if not finite:
            return
        vectors = np.stack([vector for _, (vector, _) in finite])
        scores = anchor.score(vectors, self.combine, self.statistical, self.channels)
        scores["anchor_score"] = scores["score"]
        if head is not None:
            scores["score"] = head.score(vectors)
            if self.with_anchor:
                scores["score"] = scores["score"] + max_log_bayes_factor(scores["anchor_score"])
            scores["is_suspect"] = scores["score"] > 0
        self.scored.inc(len(finite))
        self.suspects.inc(int(scores["is_suspect"].sum()))
        for i, (meta, (_, positions)) in enumerate(finite):
            yield score_row(meta, scores, i, positions, head_id, anchor_id)


def load_anchor(uri: str) -> tuple[Anchor, dict]:
    limit_blas_threads()  # the anchor's eigendecompositions run beside torch's threads
    return anchor_file.anchor_from_bytes(read_bytes(uri))


def head_id(head, data: bytes) -> str:
    return f"{head.kind}:{hashlib.sha256(data).hexdigest()[:16]}"


def load_head(uri: str, with_anchor: bool = False) -> tuple:
    data = read_bytes(uri)
    head = head_from_bytes(data)
    return head, head_id(head, data) + ("+anchor" if with_anchor else "")


class ScoreFeatures(beam.PTransform):
    """(ImageMeta, (vector, positions)) -> score rows and error rows; the anchor (and head) files
    are read once into side inputs."""

    def __init__(
        self,
        anchor_uri: str,
        combine: str | None = None,
        statistical: str | None = None,
        channels: tuple[str, ...] | None = None,
        head_uri: str | None = None,
        with_anchor: bool = False,
        max_batch_size: int = 256,
    ):
        super().__init__()
        self.anchor_uri, self.combine, self.statistical = anchor_uri, combine, statistical
        self.channels = channels
        self.head_uri, self.with_anchor, self.max_batch_size = head_uri, with_anchor, max_batch_size

    def expand(self, embedded):
        loaded = (
            embedded.pipeline
            | "AnchorUri" >> beam.Create([self.anchor_uri])
            | "LoadAnchor" >> beam.Map(load_anchor)
        )
        anchor = beam.pvalue.AsSingleton(loaded | "Anchor" >> beam.Map(lambda pair: pair[0]))
        anchor_id = beam.pvalue.AsSingleton(
            loaded | "AnchorId" >> beam.Map(lambda pair: anchor_file.anchor_id(pair[1]))
        )
        head_inputs = []
        if self.head_uri:
            head = (
                embedded.pipeline
                | "HeadUri" >> beam.Create([self.head_uri])
                | "LoadHead" >> beam.Map(load_head, self.with_anchor)
            )
            head_inputs = [
                beam.pvalue.AsSingleton(head | "Head" >> beam.Map(lambda pair: pair[0])),
                beam.pvalue.AsSingleton(head | "HeadId" >> beam.Map(lambda pair: pair[1])),
            ]
        outputs = (
            embedded
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.max_batch_size)
            | "Score"
            >> beam.ParDo(
                ScoreBatchFn(self.combine, self.statistical, self.channels, self.with_anchor),
                anchor,
                anchor_id,
                *head_inputs,
            ).with_outputs(ERRORS, main="scores")
        )
        return outputs.scores, outputs[ERRORS]
