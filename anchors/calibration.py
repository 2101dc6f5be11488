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

TAIL_FRACTION = 0.1
MIN_TAIL_POINTS = 10


def sketch(values: np.ndarray, num_quantiles: int = 1001) -> np.ndarray:
    """Exact quantile sketch of ``values``; the pipeline builds the same with Beam's
    ApproximateQuantiles."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("cannot calibrate on no values")
    return np.quantile(values, np.linspace(0.0, 1.0, num_quantiles), method="inverted_cdf")


def tail_fraction(n_calibration: int) -> float:
    return float(np.clip(MIN_TAIL_POINTS / max(n_calibration, 1), TAIL_FRACTION, 0.5))


def upper_tail_pvalues(values: np.ndarray, quantiles: np.ndarray, n_calibration: int) -> np.ndarray:
    """P(X >= value) for X drawn like the calibration images."""
    values = np.asarray(values, dtype=np.float64)
    quantiles = np.sort(np.asarray(quantiles, dtype=np.float64))
    probabilities = np.linspace(0.0, 1.0, quantiles.size)
    fraction = tail_fraction(n_calibration)
    threshold = float(np.interp(1.0 - fraction, probabilities, quantiles))
    excess = quantiles[quantiles > threshold] - threshold
    spread = quantiles[-1] - quantiles[0]
    scale = max(float(excess.mean()) if excess.size else 0.0, 1e-3 * spread,
                1e-12 * max(1.0, abs(threshold)))

    # Duplicated sketch points (few calibration images) make a step CDF: keep its right limit.
    unique, last = np.unique(quantiles[::-1], return_index=True)
    cdf = probabilities[::-1][last]
    body = 1.0 - np.interp(values, unique, cdf, left=0.0, right=1.0)
    tail = fraction * np.exp(-np.maximum(values - threshold, 0.0) / scale)
    return np.clip(np.where(values > threshold, tail, np.maximum(body, fraction)), 0.0, 1.0)


def fisher_log10(pvalues: np.ndarray) -> np.ndarray:
    """-log10 of Fisher's combined p-value over the last axis (chi-square, 2k degrees of freedom).

    Computed in log space with the closed-form survival function for even degrees of freedom,
    so that extreme p-values keep their order instead of underflowing to zero.
    """
    pvalues = np.clip(np.asarray(pvalues, dtype=np.float64), 1e-300, 1.0)
    half_stat = -np.log(pvalues).sum(axis=-1)  # X / 2 with X = -2 sum log p
    k = pvalues.shape[-1]
    terms = np.stack([i * np.log(np.maximum(half_stat, 1e-300)) - math.lgamma(i + 1)
                      for i in range(k)], axis=-1)
    log_sf = -half_stat + np.logaddexp.reduce(terms, axis=-1)
    return -np.minimum(log_sf, 0.0) / math.log(10)


def tippett_log10(pvalues: np.ndarray) -> np.ndarray:
    """-log10 of Tippett's (minimum) combined p-value: 1 - (1 - min p)^k."""
    pvalues = np.clip(np.asarray(pvalues, dtype=np.float64), 1e-300, 1.0)
    k = pvalues.shape[-1]
    combined = -np.expm1(k * np.log1p(-np.minimum(pvalues.min(axis=-1), 1.0 - 1e-16)))
    return -np.log10(np.maximum(combined, pvalues.min(axis=-1)))


COMBINERS = {"fisher": fisher_log10, "tippett": tippett_log10}


def holds_out(uri: str, fraction: float, group: str | None = None) -> bool:
    """Whether ``uri`` belongs to the calibration slice: a stable hash, the same on every worker.

    ``group`` is a regular expression whose first match (its first group, if it has one) is
    hashed instead of the whole URI, so that related files - crops of one photo, frames of one
    video - land on the same side and calibration images are really unseen."""
    key = uri
    if group:
        match = re.search(group, uri)
        if match:
            key = match.group(1) if match.groups() else match.group(0)
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return bucket < fraction * 2 ** 64
