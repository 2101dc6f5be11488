"""Absorbing more real images, or a flagged generator, into an anchor (docs/METHOD.md §9): every
named sufficient statistic (``Anchor.statistics``) is merged by Chan's update, the same code as
the CombineFn's merge, whatever the channel; the models are derived again from the merged
statistics and calibrated again on the held-out real images the anchor keeps, joined by the new
ones. No channel has code of its own here."""

from __future__ import annotations

import math

import numpy as np

from anchorscan.anchors.anchor import Anchor, AnchorConfig
from anchorscan.anchors.anchor_file import statistics_id
from anchorscan.anchors.calibration import MIN_CALIBRATION, NUM_QUANTILES, CalibrationRows
from anchorscan.anchors.errors import NotEnoughImagesError, UsageError
from anchorscan.anchors.statistics import Statistics
from anchorscan.anchors.stats import Moments


def merged_statistics(
    base: dict[str, Moments], additions: dict[str, Moments], forgetting: float = 1.0
) -> dict[str, Moments]:
    """Each named statistic of ``base`` (discounted by ``forgetting``) merged with the
    same-named one of ``additions``; names only in ``additions`` (a newly flagged generator)
    are taken as they are. Flagged generators are never discounted: they are labels, not a
    drifting corpus."""
    merged = {}
    for name, moments in base.items():
        start = (
            moments.scaled(forgetting)
            if forgetting != 1.0 and not name.startswith("flag.")
            else moments.copy()
        )
        merged[name] = start.merge(additions[name]) if name in additions else start
    for name, moments in additions.items():
        if name not in merged:
            merged[name] = moments.copy()
    return merged


def recalibrated(
    anchor: Anchor,
    statistics: dict[str, Moments],
    held_out: CalibrationRows | None,
    lineage: tuple[str, ...],
    num_quantiles: int = NUM_QUANTILES,
) -> Anchor:
    """An anchor on ``statistics``, calibrated on the kept held-out rows and ``held_out``."""
    parts = [rows for rows in (anchor.calibration_rows, held_out) if rows is not None and len(rows)]
    if not parts or sum(len(rows) for rows in parts) < MIN_CALIBRATION:
        raise NotEnoughImagesError(
            f"need at least {MIN_CALIBRATION} held-out real images to calibrate; the "
            "anchor keeps none (fitted by an older anchorscan?): fit it again"
        )
    rows = CalibrationRows.merged(parts)
    return anchor.with_statistics(statistics, lineage).calibrated_on(rows, num_quantiles)


def child_lineage(anchor: Anchor, forgetting: float = 1.0) -> tuple[str, ...]:
    """The lineage of an anchor made from ``anchor`` by adding images: its own plus its
    statistics id. Forgetting breaks "parent + added images" (a delta could no longer be
    subtracted), so it starts afresh."""
    if forgetting != 1.0:
        return ()
    return anchor.lineage + (statistics_id(anchor.statistics()),)


def updated(anchor: Anchor, additions: Statistics, forgetting: float = 1.0) -> Anchor:
    """``anchor`` with more real images: their named statistics (``backbone``,
    ``forensic.<level>``) merged in, calibrated again with their held-out rows."""
    return recalibrated(
        anchor,
        merged_statistics(anchor.statistics(), additions.moments, forgetting),
        additions.held_out,
        child_lineage(anchor, forgetting),
    )


def flagged(anchor: Anchor, generator: str, images: Moments) -> Anchor:
    """``anchor`` with ``images`` (moments of their scoring features, spec.dim wide) added to
    the flagged generator ``generator``, calibrated again on the kept held-out rows."""
    if images.dim != anchor.spec.dim:
        raise ValueError(f"flagged images have {images.dim} features, the anchor's {anchor.spec.dim}")
    statistics = merged_statistics(anchor.statistics(), {f"flag.{generator}": images})
    return recalibrated(anchor, statistics, None, child_lineage(anchor))


def admission_threshold(config: AnchorConfig, admit: str) -> float | None:
    """``--admit``: 'fpr' (the anchor's own false-positive rate: admit what it does not flag),
    a p-value in (0, 1), or 'none' (admit everything)."""
    if admit == "none":
        return None
    p = config.fpr if admit == "fpr" else float(admit)
    if not 0.0 < p < 1.0:
        raise UsageError(f"--admit must be 'fpr', 'none' or a p-value in (0, 1), got {admit!r}")
    return p


def admitted(anchor: Anchor, features: np.ndarray, threshold: float | None) -> np.ndarray:
    """Which images the poisoning guard lets in: the current anchor's combined p-value is at
    least ``threshold`` (its score at most -log10 threshold); all of them without one."""
    if threshold is None:
        return np.ones(len(features), dtype=bool)
    return anchor.assess(np.atleast_2d(features)[:, : anchor.spec.dim])["score"] <= -math.log10(threshold)
