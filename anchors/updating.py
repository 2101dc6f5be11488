"""Absorbing more real images, or a flagged generator, into an anchor (docs/METHOD.md §9): every
named sufficient statistic (``Anchor.statistics``) is merged by Chan's update, the same code as
the CombineFn's merge, whatever the channel; the models are derived again from the merged
statistics and calibrated again on the held-out real images the anchor keeps (joined, for
trusted images, by the new ones). No channel has code of its own here.

The poisoning guard (§9.2) for images not marked trusted, in three parts: an image enters only
if the current anchor does not flag it (``admitted``); a round whose admitted images pile up just
above the threshold, as missed fakes do and real photos do not, is refused whole
(``round_test``); and a round counts at most ``ROUND_SHARE`` of the anchor's real images
(``bounded``). Untrusted images never join the calibration hold-out: the threshold stays the
fit's real photos', whatever a round brings."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy.stats import betabinom

from anchorscan.anchors import channels
from anchorscan.anchors.anchor import Anchor, AnchorConfig
from anchorscan.anchors.anchor_file import statistics_id
from anchorscan.anchors.calibration import MIN_CALIBRATION, NUM_QUANTILES, CalibrationRows
from anchorscan.anchors.errors import NotEnoughImagesError, UsageError
from anchorscan.anchors.statistics import Statistics
from anchorscan.anchors.stats import Moments
from anchorscan.anchors.validation import check_moments


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
            if forgetting != 1.0 and not name.startswith(channels.FLAG_STATISTIC)
            else moments.copy()
        )
        with np.errstate(over="ignore", invalid="ignore"):  # recalibrated() refuses an overflow
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
    for name, moments in statistics.items():  # a merge of finite numbers can overflow
        check_moments(
            f"the merged statistic {name}",
            moments.n,
            moments.mean,
            moments.m2,
            moments.dim,
            ValueError,
            False,
        )
    rows = CalibrationRows.merged(parts)
    result = anchor.with_statistics(statistics, lineage).calibrated_on(rows, num_quantiles)
    if not all(np.isfinite(sketch).all() for sketch in result.calibration.values()):
        raise ValueError("the statistics give distances that are not finite (NaN or infinity)")
    return result


def child_lineage(anchor: Anchor, forgetting: float = 1.0) -> tuple[str, ...]:
    """The lineage of an anchor made from ``anchor`` by adding images: its own plus its
    statistics id. Forgetting breaks "parent + added images" (a delta could no longer be
    subtracted), so it starts afresh."""
    if forgetting != 1.0:
        return ()
    return anchor.lineage + (statistics_id(anchor.statistics()),)


# An untrusted image enters only with a p-value of at least this against the current anchor:
# within the central 90 % of the held-out real photos. A round of real photos loses a tenth of
# its images; fakes the anchor misses lie mostly in that tail (docs/QUALITY.md, *Poisoning*).
DEFAULT_ADMIT = "0.1"
# An untrusted round counts at most this share of the anchor's real images: any number of
# rounds of poison the other checks miss makes at most 1 - 1 / 1.1^r of the statistics after r
# rounds (27 % after three), whatever their size.
ROUND_SHARE = 0.1
# The round test's false-refusal rate on rounds of real photos like the anchor's held-out ones.
ROUND_ALPHA = 0.01
# The band of the round test: the lowest third of the p-values an admitted image can have.
# Real photos put a third of their admitted images there; fakes the anchor ranks above real
# photos (an AUROC above 0.5), even those it misses, more.
BAND_SHARE = 1 / 3


def updated(anchor: Anchor, additions: Statistics, forgetting: float = 1.0, trusted: bool = True) -> Anchor:
    """``anchor`` with more real images: their named statistics (``backbone``,
    ``forensic.<level>``) merged in, calibrated again with their held-out rows. Untrusted
    (``trusted=False``): no held-out rows join the calibration, and the round counts at most
    ROUND_SHARE of the anchor's real images (``bounded``)."""
    moments = additions.moments
    if not trusted:
        moments = bounded(moments, ROUND_SHARE * anchor.moments.n * forgetting)
    return recalibrated(
        anchor,
        merged_statistics(anchor.statistics(), moments, forgetting),
        additions.held_out if trusted else None,
        child_lineage(anchor, forgetting),
    )


def bounded(additions: dict[str, Moments], cap: float) -> dict[str, Moments]:
    """``additions`` counted as at most ``cap`` images (a whole number): every statistic's
    count set to it and its M2 scaled alike, the means unchanged, so the round weighs in the
    merge as that many images of its own distribution would."""
    n = channels.real_count(additions)
    k = max(1, math.floor(cap))
    if n <= k:
        return additions
    return {
        name: Moments.from_arrays(k, moments.mean, moments.m2 * (k / moments.n))
        for name, moments in additions.items()
    }


@dataclasses.dataclass(frozen=True)
class RoundTest:
    """The guard's test of a round as a batch (docs/METHOD.md §9.2). Real photos' p-values
    against the anchor are uniform, so of those admitted (p >= low) a share ``(high - low) / (1 -
    low)`` falls in the band [low, high); fakes the anchor misses but ranks above real photos
    are enriched there.
    ``near`` of ``admitted`` images fell in the band; ``p_value`` is the chance of that many or
    more from real photos, beta-binomial because the anchor's p-values come from
    ``n_calibration`` held-out images (the band's true share among real photos is itself
    uncertain, Beta-distributed, and shared by the whole round)."""

    admitted: int
    near: int
    low: float
    high: float
    expected: float
    p_value: float

    @property
    def refused(self) -> bool:
        return self.p_value < ROUND_ALPHA

    def reason(self) -> str:
        return (
            f"the round's admitted images do not look like real photos as a batch: {self.near} of "
            f"{self.admitted} have p-values in [{self.low:g}, {self.high:g}), where real photos would "
            f"put about {self.expected:.1f} (beta-binomial test, p = {self.p_value:.2g} < {ROUND_ALPHA:g}); "
            "nothing was merged. If these images are real photos, update with --trusted"
        )


def near_band(threshold: float | None) -> tuple[float, float]:
    """[low, high): from the admission threshold (0 without one) the lowest BAND_SHARE of the
    p-values above it."""
    low = threshold or 0.0
    return low, low + BAND_SHARE * (1.0 - low)


def round_test(admitted: int, near: int, anchor: Anchor, threshold: float | None) -> RoundTest:
    """The test of a round whose ``admitted`` images put ``near`` in the band (``near_band``)."""
    low, high = near_band(threshold)
    share = (high - low) / (1.0 - low)
    if admitted == 0:
        return RoundTest(0, 0, low, high, 0.0, 1.0)
    # Of the n_calibration + 1 gaps between held-out images' p-values, the band's share among
    # admitted real photos is Beta((high - low)(n + 1), (1 - high)(n + 1)).
    n = anchor.n_calibration + 1
    p_value = float(betabinom.sf(near - 1, admitted, (high - low) * n, (1.0 - high) * n))
    return RoundTest(admitted, near, low, high, share * admitted, p_value)


def flagged(anchor: Anchor, generator: str, images: Moments) -> Anchor:
    """``anchor`` with ``images`` (moments of their scoring features, spec.dim wide) added to
    the flagged generator ``generator``, calibrated again on the kept held-out rows."""
    if images.dim != anchor.spec.dim:
        raise ValueError(f"flagged images have {images.dim} features, the anchor's {anchor.spec.dim}")
    statistics = merged_statistics(anchor.statistics(), {channels.flag_statistic(generator): images})
    return recalibrated(anchor, statistics, None, child_lineage(anchor))


def admission_threshold(config: AnchorConfig, admit: str = DEFAULT_ADMIT) -> float | None:
    """``--admit``: a p-value in (0, 1) (DEFAULT_ADMIT by default), 'fpr' (the anchor's own
    false-positive rate: admit what it does not flag), or 'none' (admit everything)."""
    if admit == "none":
        return None
    p = config.fpr if admit == "fpr" else float(admit)
    if not 0.0 < p < 1.0:
        raise UsageError(f"--admit must be 'fpr', 'none' or a p-value in (0, 1), got {admit!r}")
    return p


def admission(
    anchor: Anchor, features: np.ndarray, threshold: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(admitted, near, scores) of each image: whether the guard lets it in (its combined
    p-value against the current anchor at least ``threshold``, its score at most -log10 of it;
    every image without one), whether it is an admitted image in the round test's band
    (``near_band``), and its score."""
    scores = anchor.assess(np.atleast_2d(features)[:, : anchor.spec.dim])["score"]
    _, high = near_band(threshold)
    keep = scores <= -math.log10(threshold) if threshold is not None else np.ones(len(scores), dtype=bool)
    return keep, keep & (scores > -math.log10(high)), scores
