"""Online updates of the scoring precision (docs/METHOD.md §9.1): the statistics update exactly
by Chan's merge; the inverse the distances need follows each added batch by Woodbury in
O(d^2 k) instead of being derived again in O(d^3), with the data-dependent parts of the
derivation (OAS shrinkage, the PPCA spectrum's truncation) frozen between exact refreshes.

At a refresh every channel's scoring covariance is written as ``a (M2 + K)`` with
``a = (1 - rho) / (n - 1)`` and ``K`` a frozen symmetric matrix on the scale of ``M2``:
``K = Sigma_score / a - M2``. For the backbone part ``Sigma_score`` is the OAS-shrunk covariance
with the decoupled PPCA spectrum's correction added to its statistical block (so its Schur
complement is the PPCA covariance and ``z^T Sigma_score^-1 z = D_sem + D_stat`` exactly); for the
raw variant the same on ``Sigma_mm`` alone; for a forensic level the plain covariance and its
ridge. Between refreshes ``M2`` grows by Chan's rank-(k + 1) factor and ``(M2 + K)^-1`` follows
by Woodbury; ``a`` follows ``n``.
"""
from __future__ import annotations

import numpy as np

from anchorscan.anchors.anchor import AnchorModel, oas_shrinkage, shrunk_covariance
from anchorscan.anchors.forensic import ForensicModel
from anchorscan.anchors.stats import Moments


def chan_factor(moments: Moments, rows: np.ndarray) -> np.ndarray:
    """U with ``M2(moments + rows) = M2(moments) + U^T U``: the rows about their own mean and
    the weighted shift of the means (Chan's merge, docs/METHOD.md §3.1); (k + 1, d), or (1, d)
    for one row."""
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    k = len(rows)
    batch_mean = rows.mean(axis=0)
    shift = (batch_mean - moments.mean) * np.sqrt(moments.n * k / (moments.n + k))
    if k == 1:
        return shift[None]
    return np.vstack([rows - batch_mean, shift[None]])


class FrozenPrecision:
    """``(M2 + K)^-1`` for a fixed ``K``, kept through updates ``M2 += U^T U`` by Woodbury:
    ``(A + U^T U)^-1 = G - G U^T (I + U G U^T)^-1 U G`` (Sherman-Morrison for one row)."""

    def __init__(self, m2: np.ndarray, frozen: np.ndarray):
        self.frozen = frozen
        self.inverse = np.linalg.inv(m2 + frozen)
        self.inverse = (self.inverse + self.inverse.T) / 2

    def add(self, factor: np.ndarray, weight: float = 1.0) -> None:
        """``M2 <- weight * M2 + U^T U``, with ``K <- weight * K`` (a forgetting factor discounts
        the frozen part along with the data)."""
        if weight != 1.0:
            self.inverse /= weight
            self.frozen = self.frozen * weight
        projected = self.inverse @ factor.T  # G U^T, (d, k)
        core = np.eye(len(factor)) + factor @ projected
        self.inverse -= projected @ np.linalg.solve(core, projected.T)

    def quadratic(self, centred: np.ndarray) -> np.ndarray:
        return np.einsum("ij,jk,ik->i", centred, self.inverse, centred)

    def residual(self, m2: np.ndarray, probe: np.ndarray) -> float:
        """``|G (M2 + K) v - v| / |v|``: how far the followed inverse is from exact, in O(d^2)."""
        return float(np.linalg.norm(self.inverse @ (m2 @ probe + self.frozen @ probe) - probe)
                     / np.linalg.norm(probe))


def ppca_covariance(spectrum, dim: int) -> np.ndarray:
    """The PPCA covariance a ``Spectrum`` scores with: kept eigenpairs, ``tau`` elsewhere."""
    kept = spectrum.components
    return (kept * spectrum.eigenvalues) @ kept.T + spectrum.tau * (np.eye(dim) - kept @ kept.T)


class OnlineAnchorModel:
    """The anchor's backbone distances (semantic, decoupled and raw statistical) and forensic
    distance, followed through added real images; an exact refresh every ``refresh_every``
    updates, or sooner when a cheap check sees drift: the OAS ridge of the current moments
    (O(d^2)) more than ``ridge_drift`` away from the frozen one, ``n`` grown by more than
    ``max_growth``, or a probe vector showing the followed inverse off by more than
    ``tolerance``. ``forgetting`` < 1 discounts the old statistics at each update."""

    def __init__(self, moments: Moments, forensic: ForensicModel, d_semantic: int,
                 explained_variance: float = 0.95, refresh_every: int = 256,
                 max_growth: float = 0.1, ridge_drift: float = 0.05, tolerance: float = 1e-8,
                 forgetting: float = 1.0):
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        self.moments, self.levels = moments.copy(), [level.copy() for level in forensic.moments]
        self.level_names = forensic.level_names
        self.d_semantic, self.explained_variance = d_semantic, explained_variance
        self.refresh_every, self.max_growth, self.ridge_drift = refresh_every, max_growth, ridge_drift
        self.tolerance, self.forgetting = tolerance, forgetting
        self._probe = np.random.default_rng(0).normal(size=moments.dim)
        self.refreshes = 0
        self.refresh()

    def refresh(self) -> None:
        """Derive everything again from the exact statistics (O(d^3))."""
        moments, s, m = self.moments, slice(0, self.d_semantic), slice(self.d_semantic, self.moments.dim)
        model = AnchorModel.fit(moments, self.d_semantic, self.explained_variance)
        sigma, rho = shrunk_covariance(moments)
        if rho >= 1.0:
            raise ValueError("the shrinkage is total (too few images for their dimension): an "
                             "online update has no data-driven covariance to follow; refit")
        self.rho = rho
        scale = (1.0 - rho) / (moments.n - 1)
        regression = model.regression
        schur = sigma[m, m] - sigma[s, m].T @ regression
        d_m = moments.dim - self.d_semantic
        scoring = sigma.copy()
        scoring[m, m] += ppca_covariance(model.decoupled, d_m) - schur
        raw = ppca_covariance(model.raw, d_m)
        self._full = FrozenPrecision(moments.m2, scoring / scale - moments.m2)
        self._semantic = FrozenPrecision(moments.m2[s, s], sigma[s, s] / scale - moments.m2[s, s])
        self._raw = FrozenPrecision(moments.m2[m, m], raw / scale - moments.m2[m, m])
        self._forensic = []
        for level in self.levels:
            ridge = ForensicModel.RIDGE * np.trace(level.m2) / level.dim
            self._forensic.append(FrozenPrecision(level.m2, ridge * np.eye(level.dim)))
        self._frozen_ridge = rho / (1.0 - rho) * (moments.n - 1)
        self._n_at_refresh, self.updates = moments.n, 0
        self.refreshes += 1

    def _stale(self) -> str | None:
        """Why a refresh is due now, or None."""
        if self.updates >= self.refresh_every:
            return "updates"
        if self.moments.n > (1.0 + self.max_growth) * self._n_at_refresh:
            return "growth"
        covariance = self.moments.covariance()
        scale = np.sqrt(np.maximum(np.diag(covariance), 1e-300))
        rho = oas_shrinkage(covariance / np.outer(scale, scale), self.moments.n)
        ridge = rho / max(1.0 - rho, 1e-300) * (self.moments.n - 1)
        if abs(ridge - self._frozen_ridge) > self.ridge_drift * max(self._frozen_ridge, 1e-300):
            return "shrinkage"
        if self._full.residual(self.moments.m2, self._probe) > self.tolerance:
            return "rounding"
        return None

    def add(self, backbone_rows: np.ndarray, forensic_rows: np.ndarray | None = None) -> str | None:
        """Adds real images: backbone parts (k, d) and, optionally, their forensic features at
        every level side by side (k, L * p). Returns why it refreshed, or None."""
        backbone_rows = np.atleast_2d(np.asarray(backbone_rows, dtype=np.float64))
        weight, s, m = self.forgetting, slice(0, self.d_semantic), slice(self.d_semantic, None)
        base = self.moments.scaled(weight) if weight != 1.0 else self.moments
        factor = chan_factor(base, backbone_rows)
        self._full.add(factor, weight)
        self._semantic.add(factor[:, s], weight)
        self._raw.add(factor[:, m], weight)
        self.moments = base.add_batch(backbone_rows)
        if forensic_rows is not None:
            forensic_rows = np.atleast_2d(np.asarray(forensic_rows, dtype=np.float64))
            width = self.levels[0].dim
            for j, (level, precision) in enumerate(zip(self.levels, self._forensic)):
                block = forensic_rows[:, j * width:(j + 1) * width]
                base = level.scaled(weight) if weight != 1.0 else level
                precision.add(chan_factor(base, block), weight)
                self.levels[j] = base.add_batch(block)
        self.updates += 1
        reason = self._stale()
        if reason:
            self.refresh()
        return reason

    def distances(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """semantic, statistical (decoupled, t2 + spe), statistical_raw and forensic for
        (b, d_backbone + p) rows, as the anchor's models would give them with the shrinkage and
        the PPCA truncation of the last refresh."""
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        d = self.moments.dim
        centred = features[:, :d] - self.moments.mean
        scale = (1.0 - self.rho) / (self.moments.n - 1)
        full = self._full.quadratic(centred) / scale
        semantic = self._semantic.quadratic(centred[:, :self.d_semantic]) / scale
        raw = self._raw.quadratic(centred[:, self.d_semantic:]) / scale
        forensic = np.stack([precision.quadratic(features[:, d:] - level.mean) * (level.n - 1)
                             for level, precision in zip(self.levels, self._forensic)], axis=1)
        return {"semantic": semantic, "statistical": full - semantic, "statistical_raw": raw,
                "forensic": forensic.min(axis=1)}
