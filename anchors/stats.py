"""Mergeable first and second moments: the sufficient statistics of the anchor.

The accumulator keeps ``(n, mean, M2)`` in float64 with ``M2 = sum (z - mean)(z - mean)^T``.
Batches and partial accumulators are combined with Chan et al.'s pairwise update, which stays
accurate when the mean is large against the spread (raw sums ``sum z z^T`` do not).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg.blas import dsyrk


class Moments:
    """Count, mean and centred scatter matrix of a stream of d-dimensional rows."""

    __slots__ = ("m2", "mean", "n")
    n: float  # a count; a weight after forgetting

    def __init__(self, dim: int):
        self.n = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros((dim, dim), dtype=np.float64)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @classmethod
    def from_arrays(cls, n: float, mean: np.ndarray, m2: np.ndarray) -> Moments:
        moments = cls(mean.shape[0])
        moments.n = int(n) if float(n).is_integer() else float(n)  # a weight after forgetting
        moments.mean = np.asarray(mean, dtype=np.float64).copy()
        moments.m2 = np.asarray(m2, dtype=np.float64).copy()
        return moments

    @classmethod
    def _wrap(cls, n: int, mean: np.ndarray, m2: np.ndarray) -> Moments:
        """Takes ownership of the arrays: no copies and no d x d allocation."""
        moments = cls.__new__(cls)
        moments.n, moments.mean, moments.m2 = n, mean, m2
        return moments

    @classmethod
    def of(cls, rows: np.ndarray) -> Moments:
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
        moments = cls(rows.shape[1])
        moments.add_batch(rows)
        return moments

    def add_batch(self, rows: np.ndarray) -> Moments:
        """Adds a (b, d) batch with one matrix product."""
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
        if rows.shape[0] == 0:
            return self
        if rows.shape[1] != self.dim:
            raise ValueError(f"rows have {rows.shape[1]} features, the accumulator {self.dim}")
        batch_mean = rows.mean(axis=0)
        centred = rows - batch_mean
        return self._merge_parts(rows.shape[0], batch_mean, centred.T @ centred)

    def merge(self, other: Moments) -> Moments:
        """Chan's pairwise merge of ``other`` into this accumulator."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dimension {other.dim} into {self.dim}")
        return self._merge_parts(other.n, other.mean, other.m2)

    def _merge_parts(self, n_b: float, mean_b: np.ndarray, m2_b: np.ndarray) -> Moments:
        if n_b == 0:
            return self
        if self.n == 0:
            self.n, self.mean, self.m2 = n_b, mean_b.copy(), m2_b.copy()
            return self
        n = self.n + n_b
        delta = mean_b - self.mean
        self.m2 += m2_b
        self.m2 += np.outer(delta, delta) * (self.n * n_b / n)  # exactly symmetric
        self.mean += delta * (n_b / n)
        self.n = n
        return self

    def scaled(self, weight: float) -> Moments:
        """These moments counted ``weight`` times (0 < weight <= 1: a forgetting factor's
        discount of old rows; n becomes a weight, docs/METHOD.md §9.1)."""
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"a forgetting weight must be in (0, 1], got {weight}")
        return Moments.from_arrays(self.n * weight, self.mean, self.m2 * weight)

    def covariance(self, ddof: int = 1) -> np.ndarray:
        if self.n <= ddof:
            raise ValueError(f"need more than {ddof} rows for a covariance, have {self.n}")
        return self.m2 / (self.n - ddof)

    def copy(self) -> Moments:
        return Moments.from_arrays(self.n, self.mean, self.m2)

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, Moments)
            and self.n == other.n
            and np.array_equal(self.mean, other.mean)
            and np.array_equal(self.m2, other.m2)
        )

    def __repr__(self) -> str:
        return f"Moments(n={self.n}, dim={self.dim})"

    def __getstate__(self):
        return self.n, self.mean, self.m2

    def __setstate__(self, state):
        self.n, self.mean, self.m2 = state


class BufferedMoments:
    """Moments that take single rows: rows are buffered, and each full buffer is added with one
    symmetric rank-k update (BLAS syrk, in place) to a scatter about a fixed reference point,
    the first buffer's mean. Shifting by a point near the mean keeps the update exact to
    rounding without centring each batch; the Chan merge into ``moments`` happens only when the
    moments are read (``flush``), not per buffer."""

    __slots__ = (
        "_buffer",
        "_count",
        "_reference",
        "_scatter",
        "_shifted_sum",
        "batch_size",
        "moments",
    )

    def __init__(self, dim: int, batch_size: int = 256):
        self.moments = Moments(dim)
        self.batch_size = batch_size
        self._buffer: list[np.ndarray] = []
        self._reset_pending()

    def _reset_pending(self) -> None:
        self._count = 0  # rows in the pending scatter; none: no reference point yet
        self._reference: np.ndarray | None = None
        self._shifted_sum = np.zeros(self.moments.dim)
        self._scatter: np.ndarray | None = None  # upper triangle only, Fortran order for syrk

    def add(self, row: np.ndarray) -> BufferedMoments:
        self._buffer.append(np.asarray(row, dtype=np.float64))
        if len(self._buffer) >= self.batch_size:
            self._add_buffer()
        return self

    def _add_buffer(self) -> None:
        rows = np.stack(self._buffer)
        self._buffer = []
        if rows.shape[1] != self.moments.dim:
            raise ValueError(f"rows have {rows.shape[1]} features, the accumulator {self.moments.dim}")
        if not self._count:
            self._reference = rows.mean(axis=0)
        shifted = rows - self._reference
        self._shifted_sum += shifted.sum(axis=0)
        # shifted.T is Fortran-ordered, so syrk reads it without a copy.
        self._scatter = (
            dsyrk(1.0, shifted.T)
            if not self._count
            else dsyrk(1.0, shifted.T, beta=1.0, c=self._scatter, overwrite_c=1)
        )
        self._count += rows.shape[0]

    def _pending(self) -> Moments | None:
        """The rows in the pending scatter as moments, leaving the scatter as it is."""
        if not self._count:
            return None
        offset = self._shifted_sum / self._count
        scatter = self._scatter  # upper triangle; the lower one is zero
        assert scatter is not None and self._reference is not None  # set with the first buffer
        m2 = scatter + scatter.T
        np.fill_diagonal(m2, scatter.diagonal())
        scaled = offset * np.sqrt(self._count)
        m2 -= np.outer(scaled, scaled)  # exactly symmetric
        return Moments._wrap(self._count, self._reference + offset, m2)

    def flush(self) -> Moments:
        """Everything added so far, merged into ``moments``."""
        if self._buffer:
            self._add_buffer()
        pending = self._pending()
        if pending is not None:
            self.moments = pending if self.moments.n == 0 else self.moments.merge(pending)
            self._reset_pending()
        return self.moments

    def value(self) -> Moments:
        """Everything added so far, as ``flush`` gives it, leaving this accumulator as it is
        (Beam lets a combiner mutate only the first accumulator of a merge)."""
        if not self._buffer and not self._count:
            return self.moments
        clone = BufferedMoments.__new__(BufferedMoments)
        clone.moments, clone.batch_size, clone._buffer = (
            self.moments.copy(),
            self.batch_size,
            list(self._buffer),
        )
        clone._count, clone._reference = self._count, self._reference
        clone._shifted_sum = self._shifted_sum.copy()
        clone._scatter = None if self._scatter is None else self._scatter.copy(order="F")
        return clone.flush()

    def __getstate__(self):
        return self.flush(), self.batch_size

    def __setstate__(self, state):
        self.moments, self.batch_size = state
        self._buffer = []
        self._reset_pending()
