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
from anchorscan.anchors.calibration import fisher_log10, upper_tail_log_pvalues
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


CONFIG = AnchorConfig(channels=("semantic", "forensic"), combine="fisher", calibration_fraction=0.2)


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


@pytest.fixture(scope="module")
def poisoning():
    """An anchor, real images to update it with, and a generator it ranks above real photos but
    mostly misses (AUROC about 0.82 at the start, along the forensic channel)."""
    generator = unit(DS + DM, DS + DM + 1)
    base = fit_by_hash(SPEC, *real(300, 1, "a"), AnchorConfig(calibration_fraction=0.25))
    test = np.vstack([real(1000, 6, "t")[1], fake(1000, 7, generator, 3.0)])[:, :D]
    return base, generator, test


def three_rounds(base, generator, fraction: float, update):
    anchor, admitted, given = base, 0, 0
    for number in range(3):
        reals = real(40, 100 + number, f"r{number}")[1]
        n_fake = round(fraction / (1 - fraction) * len(reals))
        rows = np.vstack([reals, fake(n_fake, 200 + number, generator, 3.0)]) if n_fake else reals
        anchor, count = update(anchor, rows)
        admitted, given = admitted + count, given + len(rows)
    return anchor, admitted / given


def guarded(anchor, rows):
    updated, test = guarded_update(anchor, rows)
    return updated or anchor, test.admitted


def unguarded(anchor, rows):
    return update_by_hash(
        anchor, [f"u/{i}-{len(rows)}-{anchor.moments.n}" for i in range(len(rows))], rows
    ), len(rows)


def test_poisoned_rounds_move_the_auroc_little_and_a_clean_stream_is_learned_from(poisoning):
    """Three rounds of 40 real images with 0, 30 or 60 % fakes of a generator the anchor mostly
    misses: the guard holds the AUROC near the clean stream's, where trusting the rounds loses
    far more, and the false-positive rate on real photos stays the fit's (none of the rounds'
    images joins the calibration)."""
    base, generator, test = poisoning
    labels = np.r_[np.zeros(1000), np.ones(1000)]

    def measured(anchor):
        scores = anchor.assess(test)
        return auroc(labels, scores["score"]), scores["is_suspect"][:1000].mean()

    clean, admitted = three_rounds(base, generator, 0.0, guarded)
    assert admitted > 0.8  # most of a clean stream is learned from (measured 0.93)
    clean_auroc, clean_fpr = measured(clean)
    for fraction in (0.3, 0.6):
        guarded_auroc, guarded_fpr = measured(three_rounds(base, generator, fraction, guarded)[0])
        trusted_auroc, _ = measured(three_rounds(base, generator, fraction, unguarded)[0])
        # measured: 0.020 and 0.043 below the clean stream's, against 0.077 and 0.191 trusted
        assert clean_auroc - guarded_auroc < 0.5 * (clean_auroc - trusted_auroc)
        assert clean_auroc - guarded_auroc < 0.06
        # the calibration is the fit's: within two binomial deviations of 1,000 real photos
        assert abs(guarded_fpr - clean_fpr) < 2 * math.sqrt(clean_fpr * (1 - clean_fpr) / 1000) + 1e-9


def test_untrusted_images_keep_the_fits_calibration_and_count_at_most_their_share(poisoning):
    from anchorscan.anchors.updating import ROUND_SHARE

    base, _, _ = poisoning
    after, test = guarded_update(base, real(2000, 2, "big")[1])
    assert test.admitted > 1500 and not test.refused
    assert np.array_equal(after.calibration_rows.keys, base.calibration_rows.keys)
    assert after.n_calibration == base.n_calibration
    assert after.moments.n == base.moments.n + math.floor(ROUND_SHARE * base.moments.n)


def test_a_round_mostly_of_fakes_is_refused_whole(poisoning):
    """With the per-image check off (--admit none) or loose (--admit fpr), the round test is what
    stands between a batch of fakes and the anchor (at the default admission it rarely has to:
    the fakes it would see are refused one by one)."""
    base, generator, _ = poisoning
    # 40 fakes in 50 (60 behind --admit fpr): at the alarms' 10 % share the primary's p-value
    # counts for 80 % of the budget, so a real photo's combined p-value lands in the band less
    # often than the test assumes (it stays valid, with less power than at 5 %: 35 of 50 fakes
    # gave p = 0.023 there, 0.004 at 5 %)
    rows = np.vstack([real(10, 40, "r")[1], fake(40, 41, generator, 3.0)])
    updated, test = guarded_update(base, rows, admit="none")
    assert updated is None and test.refused and test.near > test.expected
    assert guarded_update(base, fake(60, 41, generator, 3.0), admit="fpr")[1].refused
    assert "do not look like real photos as a batch" in test.reason() and "--trusted" in test.reason()


def test_the_round_tests_false_refusals_on_clean_rounds():
    """Clean rounds of 30 real images against 16 anchors whose calibration holds 20-100 images:
    the beta-binomial test refuses about ROUND_ALPHA of them (the binomial one, taking the
    calibration as exact, would refuse 2-4 times as many)."""
    from anchorscan.anchors import updating

    refused = rounds = 0
    for fraction in (0.1, 0.25):
        for seed in range(8):
            anchor = fit_by_hash(
                SPEC, *real(300, 1000 + seed, f"a{seed}"), AnchorConfig(calibration_fraction=fraction)
            )
            threshold = updating.admission_threshold(anchor.config)
            for number in range(40):
                keep, near, _ = updating.admission(
                    anchor, real(30, 5000 + 100 * seed + number, "r")[1], threshold
                )
                refused += updating.round_test(int(keep.sum()), int(near.sum()), anchor, threshold).refused
                rounds += 1
    # measured 1.7 % of 640; the bound is ROUND_ALPHA plus four binomial deviations of 640 rounds,
    # as the calibration's exponential tail and its discreteness make the test only nearly exact
    assert refused / rounds < updating.ROUND_ALPHA + 4 * math.sqrt(updating.ROUND_ALPHA / rounds)


def fisher(*log_p):
    return fisher_log10(np.stack(log_p, axis=1))


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
