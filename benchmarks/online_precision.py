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
from scipy.linalg import solve_triangular
from scipy.linalg.blas import dsymm, dsymv, dsyr, dsyrk

from anchorscan.anchors.anchor import AnchorModel, feature_scale, shrunk_covariance
from anchorscan.anchors.forensic import ForensicModel
from anchorscan.anchors.stats import BufferedMoments, Moments


def chan_factor(moments, rows: np.ndarray) -> np.ndarray:
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


class _Location:
    """What Chan's factor needs of moments: the count and the mean."""

    __slots__ = ("mean", "n")

    def __init__(self, n, mean):
        self.n, self.mean = n, mean


class FrozenPrecision:
    """``(M2 + K)^-1`` for a fixed ``K``, kept through updates ``M2 += U^T U`` by Woodbury:
    ``(A + U^T U)^-1 = G - G U^T (I + U G U^T)^-1 U G`` (Sherman-Morrison for one row).

    Only the upper triangle is updated (BLAS syr/syrk in place on a Fortran-ordered matrix): an
    update is memory-bound, and this touches half the matrix once and allocates nothing of
    size d x d. ``inverse`` mirrors it when read."""

    def __init__(self, m2: np.ndarray, frozen: np.ndarray):
        self.frozen = frozen
        inverse = np.linalg.inv(m2 + frozen)
        self._upper = np.asfortranarray((inverse + inverse.T) / 2)

    @property
    def inverse(self) -> np.ndarray:
        return np.triu(self._upper) + np.triu(self._upper, 1).T

    def add(self, factor: np.ndarray, weight: float = 1.0) -> None:
        """``M2 <- weight * M2 + U^T U``, with ``K <- weight * K`` (a forgetting factor discounts
        the frozen part along with the data)."""
        if weight != 1.0:
            self._upper /= weight
            self.frozen = self.frozen * weight
        if len(factor) == 1:
            projected = dsymv(1.0, self._upper, factor[0])  # G u
            dsyr(-1.0 / (1.0 + factor[0] @ projected), projected, a=self._upper, overwrite_a=1)
            return
        projected = dsymm(1.0, self._upper, np.asfortranarray(factor.T))  # G U^T, (d, k)
        cholesky = np.linalg.cholesky(np.eye(len(factor)) + factor @ projected)
        scaled = solve_triangular(cholesky, projected.T, lower=True).T  # G U^T L^-T
        dsyrk(-1.0, np.asfortranarray(scaled), beta=1.0, c=self._upper, overwrite_c=1)

    def quadratic(self, centred: np.ndarray) -> np.ndarray:
        return np.einsum("ij,jk,ik->i", centred, self.inverse, centred)

    def residual(self, m2: np.ndarray, probe: np.ndarray) -> float:
        """``|G (M2 + K) v - v| / |v|``: how far the followed inverse is from exact, in O(d^2)."""
        product = dsymv(1.0, self._upper, m2 @ probe + self.frozen @ probe)
        return float(np.linalg.norm(product - probe) / np.linalg.norm(probe))


def ppca_covariance(spectrum, dim: int) -> np.ndarray:
    """The PPCA covariance a ``Spectrum`` scores with: kept eigenpairs, ``tau`` elsewhere."""
    kept = spectrum.components
    return (kept * spectrum.eigenvalues) @ kept.T + spectrum.tau * (np.eye(dim) - kept @ kept.T)


class OnlineAnchorModel:
    """The anchor's backbone distances (semantic, decoupled and raw statistical) and forensic
    distance, followed through added real images; an exact refresh every ``refresh_every``
    updates, or sooner when a cheap check sees drift: ``n`` grown by more than ``max_growth``,
    or, every ``check_every`` updates (O(d^2)), OAS's ridge (from a fixed sample of correlations)
    more than ``ridge_drift`` away from the frozen one or a probe vector showing the followed
    inverse off by more than ``tolerance``. The exact moments buffer rows as ``fit`` does
    (docs/METHOD.md §3.2) and merge them when read. ``forgetting`` < 1 discounts the old
    statistics at each update."""

    def __init__(
        self,
        moments: Moments,
        forensic: ForensicModel,
        d_semantic: int,
        explained_variance: float = 0.95,
        refresh_every: int = 256,
        max_growth: float = 0.1,
        ridge_drift: float = 0.05,
        tolerance: float = 1e-8,
        forgetting: float = 1.0,
        check_every: int = 16,
    ):
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        self._moments = BufferedMoments(moments.dim)
        self._moments.moments = moments.copy()
        self.levels = [level.copy() for level in forensic.moments]
        self.level_names = forensic.level_names
        self.d_semantic, self.explained_variance = d_semantic, explained_variance
        self.refresh_every, self.max_growth, self.ridge_drift = refresh_every, max_growth, ridge_drift
        self.tolerance, self.forgetting, self.check_every = tolerance, forgetting, check_every
        rng = np.random.default_rng(0)
        self._probe = rng.normal(size=moments.dim)
        # OAS's ridge from a fixed sample of correlations: O(1) per check instead of O(d^2)
        pairs = min(4096, moments.dim * (moments.dim - 1) // 2)
        rows, columns = rng.integers(0, moments.dim, size=(2, pairs))
        keep = rows != columns
        self._pairs = rows[keep], columns[keep]
        self.refreshes = 0
        self.refresh()

    @property
    def moments(self) -> Moments:
        """The exact statistics of every image so far (the buffered rows merged in)."""
        return self._moments.flush()

    def refresh(self) -> None:
        """Derive everything again from the exact statistics (O(d^3))."""
        moments, s, m = self.moments, slice(0, self.d_semantic), slice(self.d_semantic, self.moments.dim)
        model = AnchorModel.fit(moments, self.d_semantic, self.explained_variance)
        sigma, rho = shrunk_covariance(moments)
        if rho >= 1.0:
            raise ValueError(
                "the shrinkage is total (too few images for their dimension): an "
                "online update has no data-driven covariance to follow; refit"
            )
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
        self._frozen_ridge = self._sampled_ridge()
        self._n_at_refresh, self.updates = moments.n, 0
        self.refreshes += 1

    def _current_mean(self):
        """(n, mean) of everything added, without merging the buffered rows' scatter: O(d k)."""
        buffered = self._moments
        n, total = buffered.moments.n, buffered.moments.mean * buffered.moments.n
        if buffered._count:
            n += buffered._count
            total = total + buffered._reference * buffered._count + buffered._shifted_sum
        for row in buffered._buffer:
            n += 1
            total = total + row
        return _Location(n, total / n)

    def _sampled_ridge(self) -> float:
        """OAS's ridge on the scale of M2, ``rho / (1 - rho) (n - 1)``, with the mean squared
        correlation estimated from a fixed sample of pairs (the diagonal's are 1)."""
        rows, columns = self._pairs
        m2, d, n = self.moments.m2, self.moments.dim, self.moments.n
        variances = np.maximum(np.diag(m2), 1e-300)
        squared = m2[rows, columns] ** 2 / (variances[rows] * variances[columns])
        alpha = (1.0 + (d - 1) * squared.mean()) / d
        denominator = (n + 1.0) * (alpha - 1.0 / d)
        rho = 1.0 if denominator <= 0 else min((alpha + 1.0) / denominator, 1.0)
        return rho / max(1.0 - rho, 1e-300) * (n - 1)

    def _stale(self) -> str | None:
        """Why a refresh is due now, or None. The O(d^2) checks (which also merge the buffered
        rows into M2) run every ``check_every`` updates."""
        if self.updates >= self.refresh_every:
            return "updates"
        if self._current_mean().n > (1.0 + self.max_growth) * self._n_at_refresh:
            return "growth"
        if self.updates % self.check_every:
            return None
        ridge = self._sampled_ridge()
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
        if weight != 1.0:
            self._moments.flush()
            self._moments.moments = self._moments.moments.scaled(weight)
        factor = chan_factor(self._current_mean(), backbone_rows)
        self._full.add(factor, weight)
        self._semantic.add(factor[:, s], weight)
        self._raw.add(factor[:, m], weight)
        for row in backbone_rows:  # exact moments, merged when read (docs/METHOD.md §3.2)
            self._moments.add(row)
        if forensic_rows is not None:
            forensic_rows = np.atleast_2d(np.asarray(forensic_rows, dtype=np.float64))
            width = self.levels[0].dim
            for j, (level, precision) in enumerate(zip(self.levels, self._forensic)):
                block = forensic_rows[:, j * width : (j + 1) * width]
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
        # the semantic block's quadratic form, to split the decoupled statistical part off the full one
        semantic = self._semantic.quadratic(centred[:, : self.d_semantic]) / scale
        raw = self._raw.quadratic(centred[:, self.d_semantic :]) / scale
        forensic = np.stack(
            [
                precision.quadratic(features[:, d:] - level.mean) * (level.n - 1)
                for level, precision in zip(self.levels, self._forensic)
            ],
            axis=1,
        )
        return {
            # the semantic distance needs each feature's spread only: exact at every update
            "semantic": np.abs(
                centred[:, : self.d_semantic] / feature_scale(self.moments)[: self.d_semantic]
            ).max(axis=1),
            "statistical": full - semantic,
            "statistical_raw": raw,
            "forensic": forensic.min(axis=1),
        }
