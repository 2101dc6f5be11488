"""Numbers that cross a trust boundary - the anchor, head and delta files another run, another
site or another person wrote - are checked where they enter, so that a damaged or forged file is
refused with a sentence instead of scoring every image NaN (docs/METHOD.md §9.5).

A checksum holds for any file its writer meant to write: it proves the bytes are intact, not
that the numbers make sense. The loaders check them here: every value finite; counts positive
and below 2**53 (where float64 counts exactly), whole numbers where the file says they are
image counts; each scatter matrix M2 symmetric and positive semi-definite within the tolerances
below; every shape the one the feature spec implies. Each check raises the loader's own error
class (a ``UserError``: exit status 2) naming the file and the statistic."""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np

T = TypeVar("T")

MAX_COUNT = 2**53  # float64 holds every whole number below this exactly
# Symmetry within 1e-9 of the largest entry: Chan's merge keeps M2 exactly symmetric and a
# delta's subtraction symmetrises it, so anything looser is not rounding.
SYMMETRY_TOLERANCE = 1e-9
# Smallest eigenvalue at least -1e-9 of the trace: an exact M2 is positive semi-definite, and
# rounding in Chan's merge or a delta's subtraction (amplified by n_total / n_added) stays
# orders of magnitude below this for any count ratio under 10^6 (docs/METHOD.md §9.5).
PSD_TOLERANCE = 1e-9


def check(condition: bool, error: type[Exception], message: str) -> None:
    if not condition:
        raise error(message)


def present(value: T | None, error: type[Exception], message: str) -> T:
    """``value``, which must be there."""
    if value is None:
        raise error(message)
    return value


def check_count(name: str, n, error: type[Exception], whole: bool = True, minimum: float = 0) -> float:
    """A count (or, where ``whole`` is False, a weight after forgetting or down-weighting):
    a number, finite, positive, at least ``minimum``, below 2**53."""
    check(
        isinstance(n, (int, float)) and not isinstance(n, bool),
        error,
        f"{name}: the count {n!r} is not a number",
    )
    check(
        math.isfinite(n) and 0 < n < MAX_COUNT and n >= minimum,
        error,
        f"{name}: the count {n!r} is out of range (a positive number of images below 2**53"
        + (f", at least {minimum:g}" if minimum else "")
        + ")",
    )
    check(
        not whole or float(n).is_integer(), error, f"{name}: the count {n!r} is not a whole number of images"
    )
    return n


def check_array(
    name: str, array: np.ndarray, shape: tuple[int | None, ...], error: type[Exception], finite: bool = True
) -> np.ndarray:
    """``array`` has ``shape`` (None: any length on that axis) and, with ``finite``, holds no
    NaN or infinity."""
    check(
        array.ndim == len(shape)
        and all(want is None or have == want for have, want in zip(array.shape, shape)),
        error,
        f"{name}: shape {tuple(array.shape)}, expected {tuple('any' if s is None else s for s in shape)}",
    )
    if finite:
        check(
            np.issubdtype(array.dtype, np.number) and bool(np.isfinite(array).all()),
            error,
            f"{name}: holds values that are not finite numbers (NaN or infinity)",
        )
    return array


def check_scatter(name: str, m2: np.ndarray, error: type[Exception]) -> None:
    """M2 symmetric within SYMMETRY_TOLERANCE of its largest entry and positive semi-definite:
    its smallest eigenvalue at least -PSD_TOLERANCE * trace, tested by a Cholesky factorisation of
    M2 + PSD_TOLERANCE * trace * I (a third of an eigendecomposition's cost)."""
    largest = float(np.abs(m2).max()) if m2.size else 0.0
    asymmetry = float(np.abs(m2 - m2.T).max()) if m2.size else 0.0
    check(
        asymmetry <= SYMMETRY_TOLERANCE * largest,
        error,
        f"{name}: M2 is not symmetric (entries differ by {asymmetry:.3g} from their mirror, "
        f"more than {SYMMETRY_TOLERANCE:g} of the largest entry)",
    )
    diagonal = np.diag(m2)
    trace = float(diagonal.sum())
    # Rounding leaves a delta's subtracted diagonal a few ulps of the trace below zero, never more.
    check(
        bool((diagonal >= -PSD_TOLERANCE * max(trace, 0.0)).all()),
        error,
        f"{name}: M2 has a negative diagonal entry ({diagonal.min():.3g}, below -{PSD_TOLERANCE:g} x "
        f"its trace {trace:.3g}): no scatter matrix does",
    )
    if trace == 0.0:  # identical rows: M2 must be zero
        check(largest == 0.0, error, f"{name}: M2 has a zero trace but non-zero entries")
        return
    shifted = (m2 + m2.T) / 2 + PSD_TOLERANCE * trace * np.eye(len(m2))
    try:
        np.linalg.cholesky(shifted)
    except np.linalg.LinAlgError:
        smallest = float(np.linalg.eigvalsh((m2 + m2.T) / 2)[0])
        raise error(
            f"{name}: M2 is not positive semi-definite (smallest eigenvalue {smallest:.3g}, below "
            f"-{PSD_TOLERANCE:g} x its trace {trace:.3g}): no set of images has these moments"
        ) from None


def check_moments(
    name: str, n, mean: np.ndarray, m2: np.ndarray, dim: int, error: type[Exception], whole: bool = True
) -> None:
    """One named statistic ``(n, mean, M2)`` of ``dim`` features (see the module's docstring)."""
    check_count(name, n, error, whole)
    check_array(f"{name} mean", mean, (dim,), error)
    check_array(f"{name} M2", m2, (dim, dim), error)
    check_scatter(name, m2, error)


def field(metadata: dict, key: str, kinds, error: type[Exception], what: str):
    """``metadata[key]``, refused when missing or not of ``kinds``."""
    check(isinstance(metadata, dict) and key in metadata, error, f"{what}: metadata lacks {key!r}")
    value = metadata[key]
    check(
        isinstance(value, kinds) and not (isinstance(value, bool) and bool not in _tuple(kinds)),
        error,
        f"{what}: metadata {key!r} is {value!r}, not a {_names(kinds)}",
    )
    return value


def _tuple(kinds) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _names(kinds) -> str:
    return " or ".join(kind.__name__ for kind in _tuple(kinds))


def distinct_names(metadata: dict, key: str, error: type[Exception], what: str) -> list[str]:
    """``metadata[key]``: a non-empty list of distinct strings."""
    names = field(metadata, key, list, error, what)
    check(
        bool(names) and all(isinstance(name, str) for name in names) and len(set(names)) == len(names),
        error,
        f"{what}: {key} {names!r} are not distinct names",
    )
    return names
