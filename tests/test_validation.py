"""The checks every number crossing a trust boundary passes (anchors/validation.py), against
independent oracles: numpy's eigenvalues for positive semi-definiteness, plain comparisons for
the rest."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anchorscan.anchors.validation import (
    MAX_COUNT,
    PSD_TOLERANCE,
    check_array,
    check_count,
    check_moments,
    check_scatter,
)


class Refused(ValueError):
    pass


def scatter_with_smallest_eigenvalue(d: int, smallest: float, seed: int = 0) -> np.ndarray:
    """A symmetric d x d matrix whose eigenvalues are 1..d-1 and ``smallest`` (times its trace
    before that one is added), in a random orthonormal basis."""
    basis, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    eigenvalues = np.arange(1.0, d)
    values = np.r_[smallest * eigenvalues.sum(), eigenvalues]
    matrix = (basis * values) @ basis.T
    return (matrix + matrix.T) / 2


@pytest.mark.parametrize("d", [2, 12, 200])
def test_the_psd_check_agrees_with_the_eigenvalues(d):
    # Eigenvalues at 1/2 and at twice the tolerance (relative to the trace) on either side:
    # numpy's eigvalsh says which side each matrix is on, the check must agree.
    for relative in (0.0, -0.5 * PSD_TOLERANCE, -2 * PSD_TOLERANCE, -1e-3, 1e-3):
        matrix = scatter_with_smallest_eigenvalue(d, relative)
        smallest, trace = np.linalg.eigvalsh(matrix)[0], np.trace(matrix)
        expected_ok = smallest >= -PSD_TOLERANCE * trace
        if expected_ok:
            check_scatter("M2", matrix, Refused)
        else:
            with pytest.raises(Refused, match="not positive semi-definite"):
                check_scatter("M2", matrix, Refused)


def test_a_rank_deficient_scatter_of_real_rows_passes():
    # fewer rows than dimensions: most eigenvalues are zero up to rounding
    rows = np.random.default_rng(1).normal(size=(20, 300)) * 50 + 1e3
    centred = rows - rows.mean(axis=0)
    check_scatter("M2", centred.T @ centred, Refused)


def test_asymmetry_negative_diagonals_and_zero_scatters():
    matrix = scatter_with_smallest_eigenvalue(5, 0.0)
    skewed = matrix.copy()
    skewed[0, 1] += 1e-6 * np.abs(matrix).max()  # 1000 times the symmetry tolerance
    with pytest.raises(Refused, match="not symmetric"):
        check_scatter("M2", skewed, Refused)
    negative = matrix.copy()
    negative[2, 2] = -1.0
    with pytest.raises(Refused, match="negative diagonal"):
        check_scatter("M2", negative, Refused)
    check_scatter("M2", np.zeros((4, 4)), Refused)  # identical rows
    off = np.zeros((4, 4))
    off[0, 1] = off[1, 0] = 1.0
    with pytest.raises(Refused):
        check_scatter("M2", off, Refused)


@pytest.mark.parametrize(
    "n, whole, ok",
    [
        (64, True, True),
        (64.0, True, True),
        (64.5, False, True),
        (0.25, False, True),
        (64.5, True, False),
        (0, True, False),
        (-5, True, False),
        (MAX_COUNT, True, False),
        (1e308, True, False),
        (math.inf, True, False),
        (math.nan, False, False),
        ("12", True, False),
        (True, True, False),
        (None, True, False),
    ],
)
def test_counts(n, whole, ok):
    if ok:
        assert check_count("backbone", n, Refused, whole) == n
    else:
        with pytest.raises(Refused, match="backbone"):
            check_count("backbone", n, Refused, whole)


def test_arrays_need_their_shape_and_finite_numbers():
    check_array("mean", np.zeros(3), (3,), Refused)
    check_array("rows", np.zeros((7, 3)), (None, 3), Refused)
    for bad in (
        np.zeros(4),
        np.zeros((3, 1)),
        np.array([0.0, np.nan, 1.0]),
        np.array([np.inf, 0, 0]),
        np.array(["a", "b", "c"]),
    ):
        with pytest.raises(Refused):
            check_array("mean", bad, (3,), Refused)


def test_moments_name_what_is_wrong():
    rows = np.random.default_rng(2).normal(size=(30, 4))
    centred = rows - rows.mean(axis=0)
    check_moments("forensic.sharp", 30, rows.mean(axis=0), centred.T @ centred, 4, Refused)
    with pytest.raises(Refused, match=r"forensic\.sharp mean: shape \(4,\), expected \(5,\)"):
        check_moments("forensic.sharp", 30, rows.mean(axis=0), centred.T @ centred, 5, Refused)
    with pytest.raises(Refused, match=r"forensic\.sharp M2: shape \(4, 3\)"):
        check_moments("forensic.sharp", 30, rows.mean(axis=0), (centred.T @ centred)[:, :3], 4, Refused)
