"""Online updates of the scoring precision (docs/METHOD.md §9.1) against exact inverses and the
exact re-derivation of the anchor's models."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

from anchorscan.anchors.anchor import AnchorModel
from anchorscan.anchors.forensic import ForensicModel

# The online precision is measured, not used by a command (docs/METHOD.md §9.1): it lives with
# the benchmarks that show what it would save.
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
from online_precision import FrozenPrecision, OnlineAnchorModel, chan_factor

from anchorscan.anchors.stats import Moments

DS, DM, P = 12, 20, 4
D = DS + DM


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(3)
    mixing = rng.normal(size=(D + P, D + P))
    return 4.0 + rng.normal(size=(4000, D + P)) @ mixing


def online(rows, n, **policy):
    forensic = ForensicModel(("sharp",), [Moments.of(rows[:n, D:])])
    return OnlineAnchorModel(Moments.of(rows[:n, :D]), forensic, DS, **policy)


NEVER = {"refresh_every": 10**9, "max_growth": 1e9, "ridge_drift": 1e9, "tolerance": 1e9}


def exact_distances(rows, n, features):
    model = AnchorModel.fit(Moments.of(rows[:n, :D]), DS)
    result = model.distances(features[:, :D])
    result["forensic"] = ForensicModel(("sharp",), [Moments.of(rows[:n, D:])]).distances(features[:, D:])[0]
    return result


@pytest.mark.parametrize("k", [1, 7])
def test_woodbury_follows_the_exact_inverse_and_chan_factor_the_merge(rows, k):
    moments = Moments.of(rows[:300, :D])
    frozen = np.diag(np.linspace(1.0, 5.0, D))
    precision = FrozenPrecision(moments.m2, frozen)
    batch = rows[300 : 300 + k, :D]
    factor = chan_factor(moments, batch)
    assert factor.shape == (1 if k == 1 else k + 1, D)
    precision.add(factor)
    moments.add_batch(batch)
    # Chan's merge as a factor: M2 grows by exactly U^T U (numpy's two-pass moments as oracle)
    assert np.allclose(moments.m2, Moments.of(rows[: 300 + k, :D]).m2, rtol=1e-12, atol=1e-9)
    exact = np.linalg.inv(moments.m2 + frozen)
    assert np.abs(precision.inverse - exact).max() <= 1e-10 * np.abs(exact).max()


def test_precision_matches_the_exact_inverse_after_1000_rank_one_updates(rows):
    moments = Moments.of(rows[:200, :D])
    frozen = 3.0 * np.eye(D)
    precision = FrozenPrecision(moments.m2, frozen)
    for row in rows[200:1200, :D]:
        precision.add(chan_factor(moments, row[None]))
        moments.add_batch(row[None])
    exact = np.linalg.inv(moments.m2 + frozen)
    # float64 rounding accumulates over 1,000 Sherman-Morrison steps; measured about 1e-13
    assert np.abs(precision.inverse - exact).max() <= 1e-9 * np.abs(exact).max()
    assert precision.residual(moments.m2, np.ones(D)) < 1e-9


def test_right_after_a_refresh_the_distances_are_the_anchors(rows):
    features = rows[3000:3200]
    model = online(rows, 1000, **NEVER)
    ours, exact = model.distances(features), exact_distances(rows, 1000, features)
    for name in ("semantic", "statistical", "statistical_raw", "forensic"):
        # one inverse against eigendecompositions of the same matrices: rounding only
        assert np.allclose(ours[name], exact[name], rtol=1e-8), name


def test_frozen_shrinkage_and_truncation_stay_close_and_a_refresh_is_exact(rows):
    """The stated approximation (§9.1): 10 % more images with the shrinkage and the PPCA
    truncation frozen move the statistical distances by about 1 % (median), 10 % at most on
    these data; the semantic distance, each feature's spread alone (§4.2), stays exact."""
    features = rows[3000:3200]
    model = online(rows, 1000, **NEVER)
    for start in range(1000, 1100, 10):
        model.add(rows[start : start + 10, :D], rows[start : start + 10, D:])
    assert np.allclose(model.moments.m2, Moments.of(rows[:1100, :D]).m2, rtol=1e-10, atol=1e-8)
    ours, exact = model.distances(features), exact_distances(rows, 1100, features)
    assert np.allclose(ours["semantic"], exact["semantic"], rtol=1e-8)  # rounding only
    for name in ("statistical", "statistical_raw"):
        relative = np.abs(ours[name] - exact[name]) / exact[name]
        assert np.median(relative) < 0.02 and relative.max() < 0.15, name
        assert np.median(relative) > 1e-6, name  # it is an approximation: frozen parts do matter
    model.refresh()
    refreshed = model.distances(features)
    for name in ("semantic", "statistical", "statistical_raw", "forensic"):
        assert np.allclose(refreshed[name], exact[name], rtol=1e-8), name


def test_refresh_policy(rows):
    model = online(rows, 1000, refresh_every=5, max_growth=1e9, ridge_drift=1e9, tolerance=1e9)
    reasons = [model.add(rows[i : i + 1, :D]) for i in range(1000, 1010)]
    assert reasons == [None] * 4 + ["updates"] + [None] * 4 + ["updates"]
    model = online(rows, 1000, refresh_every=10**9, max_growth=0.05, ridge_drift=1e9, tolerance=1e9)
    assert model.add(rows[1000:1040, :D]) is None
    assert model.add(rows[1040:1060, :D]) == "growth"  # 1060 > 1.05 * 1000
    model = online(
        rows, 1000, refresh_every=10**9, max_growth=1e9, ridge_drift=1e-6, tolerance=1e9, check_every=2
    )
    assert model.add(rows[1000:1050, :D]) is None  # the O(d^2) checks wait for their turn
    assert model.add(rows[1050:1100, :D]) == "shrinkage"  # OAS's ridge moves with n


def test_forgetting_factor_weights_the_old_statistics(rows):
    model = online(rows, 500, forgetting=0.5, **NEVER)
    model.add(rows[500:600, :D], rows[500:600, D:])
    weights = np.r_[np.full(500, 0.5), np.ones(100)]
    mean = np.average(rows[:600, :D], axis=0, weights=weights)
    centred = rows[:600, :D] - mean
    assert model.moments.n == pytest.approx(350)
    assert np.allclose(model.moments.mean, mean, rtol=1e-12)
    assert np.allclose(model.moments.m2, (centred * weights[:, None]).T @ centred, rtol=1e-10)
    # the frozen part is discounted with the data, so the followed inverse stays exact for it
    exact = np.linalg.inv(model.moments.m2 + model._full.frozen)
    assert np.abs(model._full.inverse - exact).max() <= 1e-9 * np.abs(exact).max()
