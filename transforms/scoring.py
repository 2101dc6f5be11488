"""Score feature vectors against an anchor (a side input), in batches."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from anchorscan.anchors import anchor_file
from anchorscan.anchors.anchor import Anchor
from anchorscan.anchors.calibration import max_log_bayes_factor
from anchorscan.anchors.heads import head_from_bytes
from anchorscan.anchors.images.provenance import combined, sidecar_provenance
from anchorscan.anchors.io.storage import read_checked_file
from anchorscan.anchors.tables import error_row, score_row
from anchorscan.anchors.threads import limit_blas_threads
from anchorscan.transforms.carried import carried_row, pixels_resampled

ERRORS = "errors"
# The counter of score rows whose input says it was resized before storage.
RESAMPLED = "images_resampled"


@dataclasses.dataclass(frozen=True)
class ScoreChoices:
    """What the score combines, where the command line overrides the anchor's own choices;
    ``with_anchor``: a head's log-odds plus the anchor's evidence."""

    combine: str | None = None
    statistical: str | None = None
    channels: tuple[str, ...] | None = None
    with_anchor: bool = False


class ScoreBatchFn(beam.DoFn):
    """Scores batches against the anchor and, given one, a head whose score then decides; the
    ``carried`` columns (``transforms/carried.py``) follow in each row."""

    def __init__(
        self, choices: ScoreChoices = ScoreChoices(), carried: Sequence = (), provenance: str = "use"
    ):
        self.choices, self.carried, self.provenance = choices, list(carried), provenance
        self.scored = Metrics.counter("anchorscan", "images_scored")
        self.suspects = Metrics.counter("anchorscan", "images_suspect")
        self.resampled = Metrics.counter("anchorscan", RESAMPLED)

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
        choices = self.choices
        scores = anchor.assess(vectors, choices.combine, choices.statistical, choices.channels)
        scores["anchor_score"] = scores["score"]
        if head is not None:
            scores["score"] = head.decision(vectors)
            if choices.with_anchor:
                scores["score"] = scores["score"] + max_log_bayes_factor(scores["anchor_score"])
            scores["is_suspect"] = scores["score"] > 0
        # A damaged anchor or head must not turn into rows that look scored (p = 0.5, NaN).
        valid = np.isfinite(scores["score"]) & np.isfinite(scores["anchor_score"])
        self.scored.inc(int(valid.sum()))
        for i, (meta, (_, positions)) in enumerate(finite):
            if not valid[i]:
                yield beam.pvalue.TaggedOutput(
                    ERRORS,
                    error_row(
                        meta.uri,
                        "score",
                        "the score is not finite: the anchor or head holds values that "
                        "do not score (check it with `anchorscan info`)",
                    ),
                )
                continue
            resampled = pixels_resampled(meta.carried)
            self.resampled.inc(int(resampled))
            row = score_row(meta, scores, i, positions, head_id, anchor_id, resampled)
            yield {**row, **self._declared(meta, row), **carried_row(meta.carried, self.carried)}

    def _declared(self, meta, row: dict) -> dict:
        """The provenance columns of a row; with ``provenance="use"``, ``is_suspect`` set where
        the file declares an AI origin. Counted apart: statistical suspects, declared AI, and
        each declared kind."""
        declared = combined(meta.provenance, sidecar_provenance(meta.carried.get("exif")))
        if declared.kind:
            Metrics.counter("anchorscan", f"provenance_{declared.kind}").inc()
        decides = declared.declares_ai and self.provenance == "use"
        if decides:
            Metrics.counter("anchorscan", "images_declared_ai").inc()
        elif row["is_suspect"]:
            self.suspects.inc()
        return {
            "is_suspect": row["is_suspect"] or decides,
            "provenance": declared.kind,
            "provenance_source": declared.source,
            "provenance_signer": declared.signer,
        }


def load_anchor(uri: str) -> tuple[Anchor, dict]:
    limit_blas_threads()  # the anchor's eigendecompositions run beside torch's threads
    return anchor_file.anchor_from_bytes(read_checked_file(uri), uri)


def head_id(head, data: bytes) -> str:
    return f"{head.kind}:{hashlib.sha256(data).hexdigest()[:16]}"


def load_head(uri: str, with_anchor: bool = False) -> tuple:
    data = read_checked_file(uri)
    head = head_from_bytes(data, uri)
    return head, head_id(head, data) + ("+anchor" if with_anchor else "")


class ScoreFeatures(beam.PTransform):
    """(ImageMeta, (vector, positions)) -> score rows and error rows; the anchor (and head) files
    are read once into side inputs."""

    def __init__(
        self,
        anchor_uri: str,
        choices: ScoreChoices = ScoreChoices(),
        head_uri: str | None = None,
        carried: Sequence = (),
        max_batch_size: int = 256,
        provenance: str = "use",
    ):
        super().__init__()
        self.anchor_uri, self.choices, self.head_uri = anchor_uri, choices, head_uri
        self.carried, self.max_batch_size, self.provenance = carried, max_batch_size, provenance

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
                | "LoadHead" >> beam.Map(load_head, self.choices.with_anchor)
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
                ScoreBatchFn(self.choices, self.carried, self.provenance),
                anchor,
                anchor_id,
                *head_inputs,
            ).with_outputs(ERRORS, main="scores")
        )
        return outputs.scores, outputs[ERRORS]


def reused_row(record_and_row, carried: Sequence = ()) -> dict:
    """The earlier score row of content scanned before, under this record's URI and with what
    this record's metadata says (the columns it carries, whether it was resized before storage:
    the same bytes may be stored as another crawl's resize) (``--skip_scored``)."""
    record, row = record_and_row
    if row["is_suspect"]:  # the summary's suspects are the table's, reused rows included
        Metrics.counter("anchorscan", "images_suspect").inc()
    resampled = pixels_resampled(record.carried)
    Metrics.counter("anchorscan", RESAMPLED).inc(int(resampled))
    return {
        **row,
        "uri": record.uri,
        "pixels_resampled": resampled,
        **carried_row(record.carried, list(carried)),
    }
