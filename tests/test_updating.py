"""Updating an anchor with more real images, the poisoning guard, and flagged generators
(docs/METHOD.md §9.2-9.3), in memory on synthetic features with a known structure."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score as auroc

from anchorscan.anchors.anchor import FLAG_PREFIX, AnchorConfig
from anchorscan.anchors.anchor_file import anchor_from_bytes, anchor_to_bytes
from anchorscan.anchors.calibration import COMBINERS, upper_tail_log_pvalues
from anchorscan.anchors.stats import Moments
from anchorscan.anchors.updating import flagged
from helpers import fit_by_hash, guarded_update, leveled_rows, synthetic_spec, update_by_hash

DS, DM, P = 5, 7, 3
SPEC = synthetic_spec(DS, DM, P)
D = SPEC.dim
MIXING = np.random.default_rng(42).normal(size=(D, D)) + 3 * np.eye(D)
FLOATS = (
    "score",
    "p_semantic",
    "p_statistical",
    "p_forensic",
    "semantic",
    "statistical",
    "t2",
    "spe",
    "statistical_raw",
    "forensic",
)


def real(n: int, seed: int, prefix: str) -> tuple[list[str], np.ndarray]:
    rows = 2.0 + np.random.default_rng(seed).normal(size=(n, D)) @ MIXING
    return [f"{prefix}/{i}.jpg" for i in range(n)], leveled_rows(rows, SPEC, seed)


def fake(n: int, seed: int, direction: np.ndarray, size: float) -> np.ndarray:
    rows = 2.0 + (np.random.default_rng(seed).normal(size=(n, D)) + size * direction) @ MIXING
    return leveled_rows(rows, SPEC, seed)


def unit(*indices) -> np.ndarray:
    vector = np.zeros(D)
    vector[list(indices)] = 1.0
    return vector / np.linalg.norm(vector)


def assert_same_scores(a, b, features, rtol):
    left, right = a.assess(features), b.assess(features)
    for name in FLOATS:
        assert np.allclose(left[name], right[name], rtol=rtol, atol=1e-300), name
    assert np.array_equal(left["softness"], right["softness"])
    assert np.array_equal(left["is_suspect"], right["is_suspect"])


CONFIG = AnchorConfig(channels=("semantic", "forensic"), calibration_fraction=0.2)


def test_fit_then_update_scores_like_fitting_on_both():
    uris_a, rows_a = real(600, 1, "a")
    uris_b, rows_b = real(500, 2, "b")
    union = fit_by_hash(SPEC, uris_a + uris_b, np.vstack([rows_a, rows_b]), CONFIG)
    updated = update_by_hash(fit_by_hash(SPEC, uris_a, rows_a, CONFIG), uris_b, rows_b)
    assert updated.moments.n == union.moments.n and updated.n_calibration == union.n_calibration
    assert np.array_equal(updated.calibration_rows.keys, union.calibration_rows.keys)
    features = np.vstack([real(50, 3, "c")[1], fake(50, 4, unit(0, 1), 3.0)])[:, :D]
    # the same statistics merged in another order: float64 rounding, amplified by the
    # eigendecompositions; 1e-6 relative is the bound, measured about 1e-11
    assert_same_scores(updated, union, features, rtol=1e-6)
    # and through the file: the written statistics are the exact ones
    reloaded, metadata = anchor_from_bytes(anchor_to_bytes(updated))
    assert_same_scores(reloaded, union, features, rtol=1e-6)
    assert len(metadata["lineage"]) == 1


def test_update_with_a_forgetting_factor_discounts_the_old_images_and_starts_a_new_lineage():
    uris_a, rows_a = real(600, 1, "a")
    uris_b, rows_b = real(500, 2, "b")
    anchor = fit_by_hash(SPEC, uris_a, rows_a, CONFIG)
    forgetful = update_by_hash(anchor, uris_b, rows_b, forgetting=0.5)
    plain = update_by_hash(anchor, uris_b, rows_b)
    fitted_b = plain.moments.n - anchor.moments.n
    assert forgetful.moments.n == pytest.approx(0.5 * anchor.moments.n + fitted_b)
    assert forgetful.lineage == () and len(plain.lineage) == 1


def test_poisoning_guard_keeps_auroc_where_an_unguarded_update_loses_it():
    """20 % fakes in an update's "real" images: the guard admits only what the current anchor
    does not flag."""
    generator = unit(DS + DM, DS + DM + 1)  # pixels: the forensic channel's direction
    uris_a, rows_a = real(400, 1, "a")
    base = fit_by_hash(SPEC, uris_a, rows_a, AnchorConfig(calibration_fraction=0.2))
    uris_b, rows_b = real(400, 2, "b")
    fakes = fake(100, 5, generator, 6.0)
    poisoned_uris = uris_b + [f"fake/{i}.png" for i in range(100)]
    poisoned = np.vstack([rows_b, fakes])

    test = np.vstack([real(300, 6, "t")[1], fake(300, 7, generator, 6.0)])[:, :D]
    labels = np.r_[np.zeros(300), np.ones(300)]

    def detector_auroc(anchor):
        return auroc(labels, anchor.assess(test)["score"])

    clean = detector_auroc(guarded_update(base, rows_b)[0])
    guarded_anchor, _ = guarded_update(base, poisoned)
    guarded = detector_auroc(guarded_anchor)
    unguarded = detector_auroc(update_by_hash(base, poisoned_uris, poisoned))
    assert abs(guarded - clean) <= 0.02
    assert clean - unguarded > 0.02
    assert guarded_anchor.moments.n < base.moments.n + 400  # some images were refused


def fisher(*log_p):
    return COMBINERS["fisher"](np.stack(log_p, axis=1))


def test_without_flagged_generators_the_score_is_the_channels_combination():
    uris, rows = real(600, 1, "a")
    anchor = fit_by_hash(SPEC, uris, rows, CONFIG)
    features = np.vstack([real(40, 3, "c")[1], fake(40, 4, unit(2), 3.0)])[:, :D]
    scores = anchor.assess(features)
    log_p = {
        name: upper_tail_log_pvalues(scores[name], anchor.calibration[name], anchor.n_calibration)
        for name in ("semantic", "forensic")
    }
    assert np.array_equal(scores["score"], fisher(log_p["semantic"], log_p["forensic"]))
    assert np.all(scores["p_flagged"] == 1.0)
    smaller = np.where(log_p["semantic"] <= log_p["forensic"], "semantic", "forensic")
    assert np.array_equal(scores["component"], smaller)


@pytest.fixture(scope="module")
def flag_setup():
    uris, rows = real(800, 1, "a")
    anchor = fit_by_hash(SPEC, uris, rows, AnchorConfig(calibration_fraction=0.2))
    # "new": a small shift along a low-variance direction of the real images, which the
    # one-class distance barely sees; "old": a large shift the forensic channel catches
    return anchor, unit(DS + DM + 2, 1), unit(DS + DM, DS + DM + 1)


@pytest.mark.parametrize("n_flagged", [10, 30])
def test_flagging_a_few_images_raises_that_generators_auroc_and_not_the_others(flag_setup, n_flagged):
    anchor, new, old = flag_setup
    examples = fake(n_flagged, 10, new, 3.0)[:, :D]
    with_flag = flagged(anchor, "newgen", Moments.of(examples))
    reals = real(400, 11, "t")[1][:, :D]
    unseen_new, unseen_old = fake(400, 12, new, 3.0)[:, :D], fake(400, 13, old, 2.5)[:, :D]
    labels = np.r_[np.zeros(400), np.ones(400)]

    def generator_auroc(a, fakes):
        return auroc(labels, a.assess(np.vstack([reals, fakes]))["score"])

    before_new, after_new = generator_auroc(anchor, unseen_new), generator_auroc(with_flag, unseen_new)
    before_old, after_old = generator_auroc(anchor, unseen_old), generator_auroc(with_flag, unseen_old)
    assert after_new > before_new + 0.04  # measured 0.05-0.07
    assert after_old >= before_old - 0.01
    scored = with_flag.assess(unseen_new)
    suspects = scored["is_suspect"]
    assert suspects.any() and (scored["component"][suspects] == FLAG_PREFIX + "newgen").mean() > 0.5
    assert np.all(scored["p_flagged"] <= 1.0)


def test_flagged_suspect_rate_on_real_images_stays_near_fpr(flag_setup):
    anchor, new, _ = flag_setup
    with_flag = flagged(anchor, "newgen", Moments.of(fake(20, 10, new, 3.0)[:, :D]))
    rate = with_flag.assess(real(4000, 21, "t")[1][:, :D])["is_suspect"].mean()
    fpr = anchor.config.fpr
    # the components' p-values come from the held-out real images (160 of them here), so the
    # rate is fpr up to the sampling error of that calibration: a few binomial deviations
    assert rate < fpr + 4 * math.sqrt(fpr * (1 - fpr) / 160)


def test_flag_statistics_are_stored_merged_and_named(flag_setup):
    anchor, new, _ = flag_setup
    first, second = fake(12, 30, new, 3.0)[:, :D], fake(8, 31, new, 3.0)[:, :D]
    twice = flagged(flagged(anchor, "newgen", Moments.of(first)), "newgen", Moments.of(second))
    once = flagged(anchor, "newgen", Moments.of(np.vstack([first, second])))
    assert twice.flagged["newgen"].n == 20
    assert np.allclose(twice.flagged["newgen"].m2, once.flagged["newgen"].m2, rtol=1e-10)
    reloaded, metadata = anchor_from_bytes(anchor_to_bytes(twice))
    assert metadata["flagged"] == {"newgen": 20} and set(reloaded.flagged) == {"newgen"}
    features = fake(30, 32, new, 3.0)[:, :D]
    assert np.array_equal(reloaded.assess(features)["score"], twice.assess(features)["score"])
    with pytest.raises(ValueError, match="generator name"):
        flagged(anchor, "../evil", Moments.of(first))
    with pytest.raises(ValueError, match="at least 2 images"):
        flagged(anchor, "one", Moments.of(first[:1]))


def test_update_keeps_flagged_generators_and_their_calibration():
    uris, rows = real(600, 1, "a")
    anchor = flagged(fit_by_hash(SPEC, uris, rows, CONFIG), "g", Moments.of(fake(15, 2, unit(3), 1.0)[:, :D]))
    uris_b, rows_b = real(200, 3, "b")
    after = update_by_hash(anchor, uris_b, rows_b)
    assert after.flagged["g"] == anchor.flagged["g"]
    assert set(after.calibration) == set(anchor.calibration) and after.n_calibration > anchor.n_calibration


def test_admit_accepts_fpr_none_or_a_pvalue():
    from anchorscan.anchors.updating import admission_threshold

    anchor = fit_by_hash(SPEC, *real(300, 1, "a"), CONFIG)
    assert admission_threshold(anchor.config, "fpr") == anchor.config.fpr
    assert admission_threshold(anchor.config, "none") is None
    assert admission_threshold(anchor.config, "0.001") == 0.001
    with pytest.raises(ValueError, match="--admit"):
        admission_threshold(anchor.config, "2")


def test_config_records_the_hold_out_rule():
    config = dataclasses.asdict(AnchorConfig(calibration_fraction=0.25, calibration_group="x"))
    assert AnchorConfig(**config).calibration_group == "x"
    with pytest.raises(ValueError, match="calibration_fraction"):
        AnchorConfig(calibration_fraction=1.0)
