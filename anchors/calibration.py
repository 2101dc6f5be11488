"""Turning distances into p-values against real images.

A calibration is a quantile sketch of one distance on held-out real images (``q[j]`` is the
``j / (Q - 1)`` quantile) and the number of images behind it. Inside the body of the
distribution the p-value is the empirical upper tail; beyond a high quantile the tail is modelled
as exponential (peaks over threshold, scale = mean excess), so p-values stay continuous, never
reach zero, and images far outside the calibration range are still ranked. The tail starts at
the 90th percentile, lower when few images back the sketch, so that at least ``MIN_TAIL_POINTS``
of them estimate its scale.
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np

NUM_QUANTILES = 1001  # points of each calibration sketch
TAIL_FRACTION = 0.1
MIN_TAIL_POINTS = 10


def sketch(values: np.ndarray, num_quantiles: int = NUM_QUANTILES) -> np.ndarray:
    """Exact quantile sketch of ``values`` (the held-out real images' distances: at most
    MAX_CALIBRATION_ROWS of them, so exact is cheap)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("cannot calibrate on no values")
    return np.quantile(values, np.linspace(0.0, 1.0, num_quantiles), method="inverted_cdf")


def tail_fraction(n_calibration: int) -> float:
    return float(np.clip(MIN_TAIL_POINTS / max(n_calibration, 1), TAIL_FRACTION, 0.5))


def _body_cdf(quantiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sketch's distinct values and a piecewise-linear CDF through them. A run of equal
    sketch points (few calibration images, or ties) gets the middle of its probabilities, the
    first and last runs their outer ends: the CDF is continuous and strictly increasing, so
    features that differ in the last float bits never move a p-value by a whole rank."""
    probabilities = np.linspace(0.0, 1.0, quantiles.size)
    unique, first, counts = np.unique(quantiles, return_index=True, return_counts=True)
    cdf = (probabilities[first] + probabilities[first + counts - 1]) / 2
    cdf[0], cdf[-1] = 0.0, 1.0
    return unique, cdf


def upper_tail_log_pvalues(values: np.ndarray, quantiles: np.ndarray, n_calibration: int) -> np.ndarray:
    """log P(X >= value) for X drawn like the calibration images; in log space so that images
    far beyond the calibration range keep distinct, finite scores."""
    values = np.asarray(values, dtype=np.float64)
    quantiles = np.sort(np.asarray(quantiles, dtype=np.float64))
    unique, cdf = _body_cdf(quantiles)
    fraction = tail_fraction(n_calibration)
    threshold = float(np.interp(1.0 - fraction, cdf, unique))
    excess = quantiles[quantiles > threshold] - threshold
    spread = unique[-1] - unique[0]
    scale = max(float(excess.mean()) if excess.size else 0.0, 1e-3 * spread, 1e-12 * max(1.0, abs(threshold)))

    body = 1.0 - np.interp(values, unique, cdf, left=0.0)
    log_tail = math.log(fraction) - np.maximum(values - threshold, 0.0) / scale
    # The body is at least ``fraction`` up to the threshold; the floor only keeps log() quiet
    # where the tail is used instead.
    return np.where(values > threshold, log_tail, np.log(np.maximum(body, fraction)))


def fisher_log10(log_pvalues: np.ndarray) -> np.ndarray:
    """-log10 of Fisher's combined p-value of the log p-values on the last axis (chi-square with
    2k degrees of freedom, closed-form survival function for even degrees of freedom).
    Hand-written: scipy's ``combine_pvalues`` takes p itself, which underflows for far outliers."""
    log_pvalues = np.minimum(np.asarray(log_pvalues, dtype=np.float64), 0.0)
    half_stat = -log_pvalues.sum(axis=-1)  # X / 2 with X = -2 sum log p
    k = log_pvalues.shape[-1]
    log_half = np.log(np.maximum(half_stat, 1e-300))
    terms = np.stack([i * log_half - math.lgamma(i + 1) for i in range(k)], axis=-1)
    log_sf = -half_stat + np.logaddexp.reduce(terms, axis=-1)
    return np.maximum(-log_sf, 0.0) / math.log(10)


def tippett_log10(log_pvalues: np.ndarray) -> np.ndarray:
    """-log10 of Tippett's (minimum) combined p-value, 1 - (1 - min p)^k."""
    log_pvalues = np.minimum(np.asarray(log_pvalues, dtype=np.float64), 0.0)
    k = log_pvalues.shape[-1]
    log_min = log_pvalues.min(axis=-1)
    p_min = np.exp(log_min)
    with np.errstate(divide="ignore"):
        exact = np.log(-np.expm1(k * np.log1p(-np.minimum(p_min, 1.0 - 1e-16))))
    # For tiny p the exact form rounds to zero; 1 - (1 - p)^k = k p to first order.
    log_combined = np.where(p_min > 1e-8, exact, math.log(k) + log_min)
    return -log_combined / math.log(10)


def alarms_log10(log_pvalues: np.ndarray, fpr: float, share: float) -> np.ndarray:
    """-log10 of the alarms rule's p-value (docs/METHOD.md §5.4): the first column is the primary
    channel, the others alarms. Weighted Bonferroni: the primary channel spends ``1 - m share``
    of the false-positive budget ``fpr`` and each of the ``m`` alarms ``share`` of it; an alarm
    joins only where it fires on its own (``p <= share * fpr``). Valid under any dependence
    between channels; where no alarm fires, the score ranks as the primary channel's."""
    log_pvalues = np.minimum(np.atleast_2d(np.asarray(log_pvalues, dtype=np.float64)), 0.0)
    return -alarm_terms(log_pvalues, fpr, share).min(axis=1).clip(max=0.0) / math.log(10)


def alarm_terms(log_pvalues: np.ndarray, fpr: float, share: float) -> np.ndarray:
    """Each channel's weighted log p-value under the alarms rule (+inf for an alarm that did not
    fire): the smallest is the combined one, and its column is what fired."""
    primary, alarms = log_pvalues[:, :1], log_pvalues[:, 1:]
    weight = 1.0 - alarms.shape[1] * share
    fired = alarms <= math.log(share * fpr)
    return np.hstack([primary - math.log(weight), np.where(fired, alarms - math.log(share), np.inf)])


def max_log_bayes_factor(score: np.ndarray) -> np.ndarray:
    """The most evidence against "real" that a p-value can carry, as a natural-log Bayes factor:
    -ln(-e p ln p) for p < 1/e, else 0 (Sellke, Bayarri and Berger 2001). ``score`` is
    -log10 p, the anchor's score; the result adds to a head's log-odds, combining the two."""
    log_p = -np.asarray(score, dtype=np.float64) * math.log(10)
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = -(1.0 + log_p + np.log(-log_p))
    return np.where(log_p < -1.0, bound, 0.0)


COMBINERS = ("alarms", "fisher", "tippett")


def combined_log10(log_pvalues: np.ndarray, rule: str, fpr: float, share: float) -> np.ndarray:
    """-log10 of the combined p-value of the channels' log p-values (columns) by ``rule``."""
    if rule == "alarms":
        return alarms_log10(log_pvalues, fpr, share)
    return fisher_log10(log_pvalues) if rule == "fisher" else tippett_log10(log_pvalues)


def holds_out(uri: str, fraction: float, group: str | None = None, phash: str = "") -> bool:
    """Whether ``uri`` belongs to the calibration slice: a stable hash, the same on every worker.

    ``group`` is a regular expression whose first match (its first group, if it has one) is
    hashed instead of the whole URI, so that related files - crops of one photo, frames of one
    video - land on the same side and calibration images are really unseen. Without one, the
    picture's perceptual hash (``phash``, where given) is hashed: re-encodes and resizes of one
    photo, which scraped corpora hold many of, land on the same side (docs/METHOD.md §5.1)."""
    key = f"phash:{phash}" if phash else uri
    if group:
        match = re.search(group, uri)
        if match:
            key = match.group(1) if match.groups() else match.group(0)
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return bucket < fraction * 2**64


# Held-out images whose features an anchor keeps, so that an update or a merge can score them
# again under the new model (docs/METHOD.md §5.1, §9.2): the ones with the smallest URI keys,
# a uniform sample of the held-out slice that merges exactly (the smallest keys of a union are
# the smallest of the parts' smallest).
MAX_CALIBRATION_ROWS = 4096
# Held-out images whose softened copies an anchor keeps (docs/METHOD.md §5.4): each is nine
# rows, and the alarms' calibration per softness level needs a few hundred, not thousands.
MAX_SOFTENED_ROWS = 256
MIN_CALIBRATION = 5  # fewer held-out images cannot calibrate a p-value
# A lineage entry recording an `anchorscan calibrate` run (when, on how many images, how many
# distinct, forced or not), apart from the statistics ids the rest of a lineage holds.
CALIBRATION_PREFIX = "calibration:"


def smallest_hold_out(rate: float) -> int:
    """The fewest held-out images whose own ranks reach a p-value of ``rate``: the smallest
    empirical p-value of ``n`` of them is ``1 / (n + 1)``. Below, a p-value that small comes
    from the exponential tail model alone (docs/METHOD.md §5.3, §5.4)."""
    return math.ceil(1.0 / rate - 1.0 - 1e-9)


def decision_rates(channels: tuple[str, ...], rule: str, fpr: float, share: float) -> dict[str, float]:
    """The p-value at which each channel alone raises the decision (the combined p below
    ``fpr``): the alarms rule's weighted Bonferroni shares, Tippett's ``1 - (1 - fpr)^(1/k)``;
    Fisher pools, so no channel decides alone (absent)."""
    if rule == "alarms":
        return {c: fpr * (share if i else 1.0 - (len(channels) - 1) * share) for i, c in enumerate(channels)}
    if rule == "tippett":
        return dict.fromkeys(channels, -math.expm1(math.log1p(-fpr) / len(channels)))
    return {}


def hold_out_note(n_calibration: int, channels: tuple[str, ...], rule: str, fpr: float, share: float) -> str:
    """What a hold-out too small for the anchor's rate means, for fit's summary; empty where
    its ranks reach every rate at which a channel decides."""
    rates = decision_rates(channels, rule, fpr, share) or {"combined": fpr}
    short = {c: r for c, r in rates.items() if n_calibration < smallest_hold_out(r)}
    if not short and n_calibration >= smallest_hold_out(fpr):
        return ""
    needs = "; ".join(f"{c} at p < {r:.2g} needs {smallest_hold_out(r)}" for c, r in short.items())
    return (
        f"{n_calibration} held-out images rank p-values down to 1/{n_calibration + 1} only: "
        f"the decision at --fpr {fpr:g} rests on the tail model, not on measured images "
        f"({needs}); hold out more real images (more images, or --calibration_fraction)"
    )


def uri_key(uri: str) -> int:
    """The first 8 bytes of sha256(uri), big-endian: a held-out image's place in the sample."""
    return int.from_bytes(hashlib.sha256(uri.encode()).digest()[:8], "big")


class CalibrationRows:
    """Feature rows of held-out real images with their URI keys, at most ``MAX_CALIBRATION_ROWS``
    (the smallest keys); a key seen twice is one image and is kept once. ``softened``: rows of
    held-out images' softened copies (each row every softness level's full feature row after
    "sharp", side by side), at most ``MAX_SOFTENED_ROWS``, the smallest keys of those that have
    them; None where fitting made none."""

    __slots__ = ("features", "keys", "softened")

    def __init__(self, keys, features, softened: CalibrationRows | None = None):
        self.keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        self.features = np.atleast_2d(np.asarray(features))
        if len(self.keys) != len(self.features):
            raise ValueError(f"{len(self.keys)} keys for {len(self.features)} calibration rows")
        self.softened = softened if softened is not None and len(softened) else None

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def merged(cls, parts, limit: int = MAX_CALIBRATION_ROWS) -> CalibrationRows:
        parts = [part for part in parts if len(part)]
        if not parts:
            raise ValueError("no calibration rows")
        keys = np.concatenate([part.keys for part in parts])
        features = np.concatenate([part.features for part in parts])
        keys, first = np.unique(keys, return_index=True)  # sorted, one row per key
        softened = [part.softened for part in parts if part.softened is not None]
        return cls(
            keys[:limit],
            features[first[:limit]],
            cls.merged(softened, MAX_SOFTENED_ROWS) if softened else None,
        )
