"""The anchor's maths (docs/METHOD.md §4-5) against independent oracles: scikit-learn's OAS,
exact inverses, eigendecompositions, scipy's combined p-values and KS tests."""

import numpy as np
import pytest
from scipy import stats
from sklearn.covariance import OAS, oas
from sklearn.metrics import roc_auc_score

from anchorscan.anchors.anchor import (
    Anchor,
    AnchorConfig,
    AnchorModel,
    Spectrum,
    oas_shrinkage,
    shrunk_covariance,
)
from anchorscan.anchors.calibration import (
    fisher_log10,
    holds_out,
    sketch,
    tippett_log10,
    upper_tail_log_pvalues,
)
from anchorscan.anchors.stats import Moments
from helpers import fit_synthetic_anchor, synthetic_spec, with_forensic


def spec(ds, dm):
    return synthetic_spec(ds, dm)


def joint_gaussian(ds, dm, seed=0):
    """(mean, Sigma, rng) of [s ; m] with m = s W + noise: m strongly correlated with s."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(ds, ds))
    sigma_ss = a @ a.T / ds + 0.5 * np.eye(ds)
    w = rng.normal(size=(ds, dm))
    b = rng.normal(size=(dm, dm))
    noise = b @ b.T / dm + 0.1 * np.eye(dm)
    sigma = np.block([[sigma_ss, sigma_ss @ w], [w.T @ sigma_ss, w.T @ sigma_ss @ w + noise]])
    return rng.normal(size=ds + dm) * 3, sigma, rng


def sample(ds, dm, n, seed=0):
    mean, sigma, rng = joint_gaussian(ds, dm, seed)
    return rng.multivariate_normal(mean, sigma, size=n)


def test_oas_shrinkage_matches_sklearn():
    data = sample(6, 14, n=60, seed=1)
    centred = data - data.mean(axis=0)
    _, expected = oas(data)
    assert oas_shrinkage(centred.T @ centred / len(data), len(data)) == pytest.approx(expected, rel=1e-12)


def test_shrunk_covariance_is_oas_of_the_correlation_rescaled():
    rng = np.random.default_rng(2)
    data = sample(5, 10, n=40, seed=2) * rng.uniform(0.01, 100.0, size=15)  # unequal scales
    shrunk, shrinkage = shrunk_covariance(Moments.of(data))
    standardised = (data - data.mean(0)) / data.std(0)  # ddof=0: sklearn's emp_cov = correlation
    reference = OAS().fit(standardised)
    assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-10)
    assert 0.0 < shrinkage <= 1.0
    scale = data.std(0, ddof=1)  # Moments' covariance uses n - 1
    np.testing.assert_allclose(shrunk / np.outer(scale, scale), reference.covariance_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.diag(shrunk), np.var(data, 0, ddof=1), rtol=1e-10)


def test_decoupled_residual_is_uncorrelated_with_semantic_part():
    ds, dm = 6, 10
    data = sample(ds, dm, n=20000, seed=3)
    model = AnchorModel.fit(Moments.of(data), ds)
    s, m = data[:, :ds] - model.mean[:ds], data[:, ds:] - model.mean[ds:]
    residual = m - s @ model.regression
    cross = np.corrcoef(np.hstack([s, residual]), rowvar=False)[:ds, ds:]
    raw = np.corrcoef(np.hstack([s, m]), rowvar=False)[:ds, ds:]
    assert np.abs(cross).max() < 0.05
    assert np.abs(raw).max() > 0.5


def test_spectrum_distances_equal_closed_form():
    rng = np.random.default_rng(4)
    basis, _ = np.linalg.qr(rng.normal(size=(15, 15)))
    covariance = basis @ np.diag(2.0 ** -np.arange(15)) @ basis.T
    spectrum = Spectrum.fit(covariance, 0.9, max_rank=100)
    values, vectors = np.linalg.eigh(covariance)
    values, vectors = values[::-1], vectors[:, ::-1]
    share = np.cumsum(values) / values.sum()
    k = next(j + 1 for j in range(15) if share[j] >= 0.9)
    assert spectrum.k == k
    residuals = rng.normal(size=(30, 15))
    t2, spe = spectrum.distances(residuals)
    kept = vectors[:, :k]
    np.testing.assert_allclose(t2, ((residuals @ kept) ** 2 / values[:k]).sum(1), rtol=1e-9)
    tail = residuals - residuals @ kept @ kept.T
    np.testing.assert_allclose(spe, (tail**2).sum(1) / values[k:].mean(), rtol=1e-8)


def test_spectrum_rank_is_capped_and_tail_is_mean_of_the_rest():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(12, 12))
    covariance = a @ a.T
    spectrum = Spectrum.fit(covariance, 0.9999, max_rank=3)
    values = np.linalg.eigvalsh(covariance)[::-1]
    assert spectrum.k == 3
    np.testing.assert_allclose(spectrum.eigenvalues, values[:3], rtol=1e-10)
    assert spectrum.tau == pytest.approx(values[3:].mean(), rel=1e-10)


def test_semantic_and_statistical_distances_equal_exact_inverse_oracle():
    ds, dm = 7, 9
    data = sample(ds, dm, n=300, seed=6)
    moments = Moments.of(data)
    model = AnchorModel.fit(moments, ds, explained_variance=0.9)
    sigma, _ = shrunk_covariance(moments)
    precision_ss = np.linalg.inv(sigma[:ds, :ds])
    features = sample(ds, dm, n=25, seed=7)
    centred = features - moments.mean
    s, m = centred[:, :ds], centred[:, ds:]
    distances = model.distances(features)
    # the semantic distance is the largest standardised deviation (§4.2), from the rows themselves
    scale = data[:, :ds].std(axis=0, ddof=1)
    np.testing.assert_allclose(distances["semantic"], np.abs(s / scale).max(axis=1), rtol=1e-9)
    regression = precision_ss @ sigma[:ds, ds:]
    schur = sigma[ds:, ds:] - sigma[ds:, :ds] @ regression
    oracle = Spectrum.fit(schur, 0.9, max_rank=299).distances(m - s @ regression)
    np.testing.assert_allclose(distances["statistical"], oracle[0] + oracle[1], rtol=1e-8)
    np.testing.assert_allclose(distances["t2"] + distances["spe"], distances["statistical"])


def test_fit_with_fewer_rows_than_dimensions():
    ds, dm, n = 30, 50, 20
    data = sample(ds, dm, n=n + 10, seed=8)
    anchor = fit_synthetic_anchor(spec(ds, dm), with_forensic(data), n)
    model = anchor.model
    assert model.decoupled.k <= n - 1 and model.raw.k <= n - 1
    assert 0.0 < model.shrinkage <= 1.0 and anchor.summary["shrinkage"] == model.shrinkage
    assert np.isfinite(model.decoupled.tau) and model.decoupled.tau > 0
    scores = anchor.assess(with_forensic(sample(ds, dm, n=10, seed=9)))
    for name in ("semantic", "statistical", "statistical_raw", "forensic", "score"):
        assert np.all(np.isfinite(scores[name])) and np.all(scores[name] >= 0)


def test_semantic_distance_at_a_quarter_as_many_images_as_features_equals_the_rows_oracle():
    # n = d_s / 4, the moments merged from two parts as update and federation merge them; the
    # oracle reads the rows with numpy, no moments. 1e-9: Chan's merge against a two-pass
    # variance, both in float64.
    ds, dm, n = 160, 12, 40
    rows = sample(ds, dm, n=n + 25, seed=30)
    moments = Moments.of(rows[:15]).merge(Moments.of(rows[15:n]))
    model = AnchorModel.fit(moments, ds)
    unseen = rows[n:, :ds]
    oracle = np.abs((unseen - rows[:n, :ds].mean(axis=0)) / rows[:n, :ds].std(axis=0, ddof=1)).max(axis=1)
    np.testing.assert_allclose(model.distances(rows[n:])["semantic"], oracle, rtol=1e-9)


def test_semantic_channel_finds_content_off_in_a_few_features_with_fewer_images_than_features():
    # The content-level fake of issue 26 at n = d_s / 4: real-like everywhere but in 3 of 160
    # semantic features, 8 standard deviations off: nearly all flagged on the semantic channel
    # alone, unseen real images near the rate.
    ds, dm, n, n_cal, n_test = 160, 12, 40, 200, 400
    rng = np.random.default_rng(31)
    rows = with_forensic(sample(ds, dm, n=n + n_cal + 2 * n_test, seed=31))
    anchor = fit_synthetic_anchor(spec(ds, dm), rows[: n + n_cal], n)
    real, fake = rows[n + n_cal : n + n_cal + n_test], rows[n + n_cal + n_test :].copy()
    scale = np.sqrt(np.diag(anchor.moments.covariance()))[:ds]
    for row in fake:
        off = rng.choice(ds, size=3, replace=False)
        row[off] += 8 * scale[off] * rng.choice([-1, 1], size=3)
    flagged = lambda rows: anchor.assess(rows)["p_semantic"] < 0.01  # noqa: E731
    assert flagged(fake).mean() >= 0.9
    # 0.01 nominal; 4 binomial standard errors of 400 unseen images, plus the calibration's own
    # sampling error at 200 held-out images (one standard error of a 1 % quantile: 0.7 %)
    assert flagged(real).mean() <= 0.01 + 4 * np.sqrt(0.01 * 0.99 / n_test) + 0.007


@pytest.fixture(scope="module")
def calibrated():
    ds, dm = 8, 12
    mean, sigma, rng = joint_gaussian(ds, dm, seed=10)
    draw = lambda n: with_forensic(rng.multivariate_normal(mean, sigma, size=n), seed=n)  # noqa: E731
    anchor = fit_synthetic_anchor(spec(ds, dm), np.vstack([draw(6000), draw(2000)]), 6000)
    return anchor, draw, np.sqrt(np.diag(sigma)), ds


def test_pvalues_are_uniform_and_suspect_rate_matches_fpr(calibrated):
    anchor, draw, _, _ = calibrated
    scores = anchor.assess(draw(2000))
    for name in ("p_semantic", "p_statistical", "p_forensic"):
        assert stats.kstest(scores[name], "uniform").statistic < 0.06, name
    fpr = anchor.config.fpr
    assert abs(scores["is_suspect"].mean() - fpr) <= 4 * np.sqrt(fpr * (1 - fpr) / 2000)


@pytest.mark.parametrize("change", ["shift", "scale"])
def test_shifted_statistics_score_much_higher(calibrated, change):
    anchor, draw, std, ds = calibrated
    real, fake = draw(1000), draw(1000)
    statistical = slice(ds, len(std))
    if change == "shift":
        fake[:, statistical] += 4 * std[ds:]
    else:
        mean = anchor.moments.mean[ds:]
        fake[:, statistical] = mean + 3 * (fake[:, statistical] - mean)
    channels = ("semantic", "statistical")  # the channel under test, and one that must not hide it
    real_scores, fake_scores = (
        anchor.assess(real, channels=channels)["score"],
        anchor.assess(fake, channels=channels),
    )
    labels = np.r_[np.zeros(1000), np.ones(1000)]
    assert roc_auc_score(labels, np.r_[real_scores, fake_scores["score"]]) > 0.95
    assert fake_scores["is_suspect"].mean() > 0.5


def test_fisher_matches_scipy():
    rng = np.random.default_rng(11)
    for k in (2, 3):
        pvalues = 10.0 ** -rng.uniform(0, 30, size=(50, k))
        expected = [-np.log10(stats.combine_pvalues(row, method="fisher").pvalue) for row in pvalues]
        np.testing.assert_allclose(fisher_log10(np.log(pvalues)), expected, rtol=1e-9, atol=1e-12)


def test_fisher_stays_finite_and_monotone_for_tiny_pvalues():
    pvalues = 10.0 ** -np.linspace(10, 290, 50)
    pairs = np.stack([pvalues, np.full_like(pvalues, 1e-200)], axis=1)
    scores = fisher_log10(np.log(pairs))
    assert np.all(np.isfinite(scores)) and np.all(np.diff(scores) > 0)
    half = -np.log(pairs).sum(1)  # chi-square with 4 dof: sf = exp(-h) (1 + h)
    np.testing.assert_allclose(scores, (half - np.log1p(half)) / np.log(10), rtol=1e-12)


def test_tippett_matches_closed_form():
    rng = np.random.default_rng(12)
    for k in (2, 3):
        pvalues = rng.uniform(1e-6, 1, size=(50, k))
        expected = -np.log10(1 - (1 - pvalues.min(1)) ** k)
        np.testing.assert_allclose(tippett_log10(np.log(pvalues)), expected, rtol=1e-6)


@pytest.fixture(scope="module")
def chi2_sketch():
    values = np.random.default_rng(13).chisquare(10, 2000)
    return sketch(values), len(values)


def upper_tail_pvalues(values, quantiles, n):
    return np.exp(upper_tail_log_pvalues(values, quantiles, n))


def test_upper_tail_pvalues_are_monotone_bounded_and_continuous(chi2_sketch):
    quantiles, n = chi2_sketch
    grid = np.linspace(quantiles[0] - 1, 3 * quantiles[-1], 200001)
    p = upper_tail_pvalues(grid, quantiles, n)
    assert np.all(np.diff(p) <= 0)
    assert np.all((p > 0) & (p <= 1)) and p[0] == 1.0
    assert np.abs(np.diff(p)).max() < 2e-3  # no jump, at the tail threshold or elsewhere
    threshold = np.quantile(quantiles, 0.9)  # the tail starts at the 90th percentile
    around = upper_tail_pvalues(threshold + np.array([-1e-9, 1e-9]), quantiles, n)
    np.testing.assert_allclose(around, 0.1, atol=1e-6)
    above = quantiles[-1] + np.linspace(0, 5 * (quantiles[-1] - quantiles[0]), 100)
    assert np.all(np.diff(upper_tail_pvalues(above, quantiles, n)) < 0)


def test_upper_tail_pvalues_match_empirical_tail_inside_the_body(chi2_sketch):
    quantiles, n = chi2_sketch
    for level in (0.2, 0.5, 0.8):
        value = np.quantile(quantiles, 1 - level)
        assert upper_tail_pvalues(value, quantiles, n) == pytest.approx(level, abs=2e-3)


def test_few_calibration_images_give_continuous_mid_rank_pvalues():
    # Ten images make a step-shaped sketch; a step CDF would move a p-value by a whole rank
    # when features differ in their last bits (as batching on CPU makes them).
    values = np.sort(np.random.default_rng(3).gamma(4.0, size=10)) * 10
    quantiles, n = sketch(values), len(values)
    p_at = upper_tail_pvalues(values, quantiles, n)
    median = np.median(values)
    body = values <= median  # ten images: the exponential tail starts at the median
    ranks = np.arange(1, n + 1)
    expected = np.where(ranks == 1, 1.0, 1 - (ranks - 0.5) / n)  # Hazen's plotting positions
    np.testing.assert_allclose(p_at[body], expected[body], atol=1e-3)  # the sketch has 1001 points
    for value in values:
        nudged = upper_tail_pvalues(value * (1 + np.array([-1e-9, 1e-9])), quantiles, n)
        assert abs(nudged[0] - nudged[1]) < 1e-6
    grid = np.linspace(values[0] - 5, values[-1] * 3, 100001)
    p = upper_tail_pvalues(grid, quantiles, n)
    assert np.all(np.diff(p) <= 0) and np.abs(np.diff(p)).max() < 1e-3


def test_pvalues_stay_positive_and_ranked_far_beyond_calibration(chi2_sketch):
    quantiles, n = chi2_sketch
    far = quantiles[-1] * np.array([10.0, 100.0, 1000.0])
    log_p = upper_tail_log_pvalues(far, quantiles, n)
    assert np.all(np.isfinite(log_p)) and np.all(np.diff(log_p) < 0), log_p
    scores = fisher_log10(np.stack([log_p, np.zeros(3)], axis=1))
    assert np.all(np.isfinite(scores)) and np.all(np.diff(scores) > 0), scores


def test_holds_out_is_deterministic_with_the_right_fraction():
    uris = [f"gs://bucket/images/{i:06d}.jpg" for i in range(20000)]
    first = np.array([holds_out(uri, 0.1) for uri in uris])
    assert np.array_equal(first, [holds_out(uri, 0.1) for uri in uris])
    assert abs(first.mean() - 0.1) < 4 * np.sqrt(0.1 * 0.9 / 20000)


def test_holds_out_keeps_a_group_on_one_side():
    uris = [f"gs://bucket/photo{i:04d}_crop{j}.jpg" for i in range(2000) for j in range(5)]
    sides = np.array([holds_out(uri, 0.3, group=r"photo(\d+)_") for uri in uris]).reshape(2000, 5)
    assert np.all(sides.all(1) | ~sides.any(1))
    assert abs(sides[:, 0].mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 2000)
    ungrouped = np.array([holds_out(uri, 0.3) for uri in uris]).reshape(2000, 5)
    assert not np.all(ungrouped.all(1) | ~ungrouped.any(1))  # the regex is what groups them


def test_max_log_bayes_factor_is_the_sellke_bayarri_berger_bound():
    from anchorscan.anchors.calibration import max_log_bayes_factor

    pvalues = np.array([0.9, 1 / np.e, 0.3, 0.05, 1e-3, 1e-12, 1e-200])
    expected = [-np.log(-np.e * p * np.log(p)) if p < 1 / np.e else 0.0 for p in pvalues]
    np.testing.assert_allclose(max_log_bayes_factor(-np.log10(pvalues)), expected, atol=1e-9)
    scores = np.linspace(0, 400, 4001)
    assert np.all(np.diff(max_log_bayes_factor(scores)) >= 0) and max_log_bayes_factor(scores).min() == 0


# --- the alarms rule (docs/METHOD.md §5.4) ------------------------------------------------------


def test_alarms_rule_is_the_weighted_bonferroni_of_the_primary_and_the_fired_alarms():
    from anchorscan.anchors.calibration import alarms_log10

    fpr, share = 0.01, 0.05
    p = np.array([[0.02, 0.5, 0.9], [0.02, 0.0004, 0.9], [0.3, 0.5, 0.00001], [1.0, 1.0, 1.0]])
    expected = [
        0.02 / 0.9,  # no alarm fires: the primary, weighted
        min(0.02 / 0.9, 0.0004 / 0.05),  # the first alarm fires (0.0004 <= 0.05 * 0.01)
        0.00001 / 0.05,
        1.0,
    ]
    np.testing.assert_allclose(10 ** -alarms_log10(np.log(p), fpr, share), expected, rtol=1e-12)


@pytest.mark.parametrize("dependence", ["independent", "equal", "opposite"])
def test_alarms_rule_keeps_its_false_positive_rate_whatever_the_dependence(dependence):
    # Monte Carlo under the null: each channel's p-value uniform, jointly independent, equal or
    # anti-correlated. Weighted Bonferroni bounds the rate by fpr under any dependence; 200,000
    # draws put the estimate's standard error at 0.02 percentage points, the margin 3 of those.
    from anchorscan.anchors.calibration import alarms_log10

    rng = np.random.default_rng(5)
    u = rng.uniform(size=(200_000, 3))
    if dependence == "equal":
        u = np.repeat(u[:, :1], 3, axis=1)
    elif dependence == "opposite":
        u[:, 1] = 1.0 - u[:, 0]
    fpr = 0.01
    rate = np.mean(alarms_log10(np.log(u), fpr, 0.05) > -np.log10(fpr))
    assert rate <= fpr + 3 * np.sqrt(fpr * (1 - fpr) / len(u))


def test_an_uninformative_alarm_cannot_drag_the_primary_channels_auroc_down():
    # The bound of §5.4: an alarm changes the ranking only where it fires, on at most
    # share * fpr of real images, so the AUROC falls by at most that much below the primary's.
    from sklearn.metrics import roc_auc_score

    from anchorscan.anchors.calibration import alarms_log10

    rng = np.random.default_rng(6)
    n = 20_000
    primary = np.r_[rng.uniform(size=n), rng.beta(0.3, 1.0, size=n)]  # fakes: small p
    noise = rng.uniform(size=(2 * n, 2))  # two alarms that carry nothing
    labels = np.r_[np.zeros(n), np.ones(n)]
    alone = roc_auc_score(labels, -np.log(primary))
    combined = roc_auc_score(labels, alarms_log10(np.log(np.c_[primary, noise]), 0.01, 0.05))
    assert combined >= alone - 2 * 0.05 * 0.01 - 1e-3  # 1e-3: ties the AUROC estimate breaks


def test_alarms_name_what_fired():
    spec = synthetic_spec(6, 4)
    rows = with_forensic(sample(6, 4, n=400, seed=21))
    anchor = fit_synthetic_anchor(spec, rows, 300, AnchorConfig(calibration_fraction=0.25))
    far_content, far_pixels = rows[:1].copy(), rows[:1].copy()
    far_content[0, :6] += 1e3  # the backbone's channels see it (the residual moves with s)
    far_pixels[0, spec.d_backbone :] += 1e3  # only the forensic channel sees it
    result = anchor.assess(np.vstack([rows[300:310], far_content, far_pixels]))
    assert result["component"][-2] in ("semantic", "statistical") and result["component"][-1] == "forensic"
    assert result["is_suspect"][-2:].all()
    assert set(result["component"][:-2]) <= {"forensic", "semantic", "statistical"}


def test_alarms_stay_silent_at_softness_levels_the_held_out_images_do_not_hold():
    """A photo far in content fires the semantic alarm at the sharp level, which the held-out
    images hold; at a level they do not hold (a soft photo's) the alarm says nothing and only
    the forensic channel decides. The p-values are reported either way."""
    from anchorscan.anchors.forensic import ForensicModel

    spec = synthetic_spec(6, 4)
    rows = with_forensic(sample(6, 4, n=400, seed=21))
    fitted = rows[:300, spec.d_backbone :]
    soft = fitted + 50.0  # a level far from every held-out image's pixels
    forensic = ForensicModel(("sharp", "blur1.0"), [Moments.of(fitted), Moments.of(soft)])
    anchor = Anchor.fit(spec, Moments.of(rows[:300, : spec.d_backbone]), forensic, rows[300:])
    assert anchor.alarm_levels.tolist() == [True, False]
    far_content = np.vstack([rows[300:301], rows[300:301]])
    far_content[:, :6] += 1e3
    far_content[1, spec.d_backbone :] += 50.0  # the same content, at the soft level
    result = anchor.assess(far_content)
    assert result["softness"].tolist() == ["sharp", "blur1.0"]
    assert result["p_semantic"][1] == result["p_semantic"][0] < 1e-6  # reported alike
    assert result["is_suspect"].tolist() == [True, False]
    assert result["component"].tolist() == [result["component"][0], "forensic"]
    assert result["component"][0] in ("semantic", "statistical")
    # Fisher's and Tippett's rules are not gated
    assert anchor.assess(far_content, combine="tippett")["is_suspect"].all()


def test_content_alarms_are_calibrated_per_softness_level_on_softened_held_out_copies():
    """Where the anchor keeps the held-out images' softened copies, an alarm at a soft level is
    calibrated on the real copies at that level (docs/METHOD.md §5.4): if softening moves real
    photos far in semantic space, an image at that level just as far is not flagged, and one
    farther is (by the semantic alarm); at the sharp level the same shift is flagged."""
    from anchorscan.anchors.calibration import CalibrationRows
    from anchorscan.anchors.forensic import ForensicModel

    spec = synthetic_spec(6, 4)
    rows = with_forensic(sample(6, 4, n=400, seed=21))
    fitted, held = rows[:300], rows[300:]
    scale = fitted[:, :6].std(axis=0)
    soft_pixels = fitted[:, spec.d_backbone :] + 50.0
    forensic = ForensicModel(
        ("sharp", "blur1.0"), [Moments.of(fitted[:, spec.d_backbone :]), Moments.of(soft_pixels)]
    )
    copies = held.copy()
    copies[:, :6] += 30.0 * scale  # softening moves every real photo 30 sd in content
    copies[:, spec.d_backbone :] += 50.0
    keys = np.arange(len(held))
    calibration = CalibrationRows(keys, held, CalibrationRows(keys, copies))
    moments = Moments.of(fitted[:, : spec.d_backbone])
    per_level = AnchorConfig(alarm_calibration="per_level")
    anchor = Anchor.uncalibrated(spec, moments, forensic, per_level).calibrated_on(calibration)
    assert sorted(anchor.level_calibration) == [0, 1] and anchor.alarm_levels.all()
    assert anchor.level_calibration[1][1] == len(held)  # each photo once at its level
    assert anchor.summary["level_calibration"] == {"sharp": len(held), "blur1.0": len(held)}
    # the default keeps round 4's rule whatever the anchor keeps: silent where no held-out photo is
    default = Anchor.uncalibrated(spec, moments, forensic, AnchorConfig()).calibrated_on(calibration)
    assert default.level_calibration is None and default.alarm_levels.tolist() == [True, False]

    probe = np.vstack([rows[:1]] * 3)  # a fitted photo: near the mean in content and pixels
    probe[:, spec.d_backbone :] += 50.0  # all three at the soft level
    probe[0, :6] += 30.0 * scale  # as far as the softened real copies
    probe[1, :6] += 300.0 * scale  # ten times farther: p from the level's tail model (ranks stop at 1/101)
    sharp = rows[:1].copy()
    sharp[0, :6] += 30.0 * scale  # the first one's content at the sharp level
    result = anchor.assess(np.vstack([probe[:2], sharp]))
    assert result["softness"].tolist() == ["blur1.0", "blur1.0", "sharp"]
    assert (
        result["p_semantic"][0] > 0.01 and result["p_semantic"][1] < 1e-6 and result["p_semantic"][2] < 1e-6
    )
    assert result["is_suspect"].tolist() == [False, True, True]
    assert result["component"][1] in ("semantic", "statistical")
    assert not default.assess(probe[1:2])["is_suspect"][0]  # silent there: the forensic channel decides


def test_the_hold_out_each_channel_needs_to_decide_on_measured_ranks():
    from anchorscan.anchors.calibration import decision_rates, hold_out_note, smallest_hold_out

    # the smallest empirical p-value of n held-out images is 1 / (n + 1)
    assert [smallest_hold_out(rate) for rate in (0.01, 0.0005, 0.5)] == [99, 1999, 1]
    channels = ("forensic", "semantic", "statistical")
    rates = decision_rates(channels, "alarms", 0.01, 0.25)
    assert rates == pytest.approx({"forensic": 0.005, "semantic": 0.0025, "statistical": 0.0025})
    assert sum(rates.values()) == pytest.approx(0.01)  # Bonferroni: the budget, split
    tippett = decision_rates(channels, "tippett", 0.01, 0.25)["semantic"]
    assert 1 - (1 - tippett) ** 3 == pytest.approx(0.01)
    assert decision_rates(channels, "fisher", 0.01, 0.25) == {}  # Fisher pools: none alone
    assert hold_out_note(399, channels, "alarms", 0.01, 0.25) == ""
    note = hold_out_note(398, channels, "alarms", 0.01, 0.25)
    assert "semantic at p < 0.0025 needs 399" in note and "forensic" not in note
    assert hold_out_note(99, ("forensic",), "fisher", 0.01, 0.25) == ""
    assert "combined at p < 0.01 needs 99" in hold_out_note(98, ("forensic",), "fisher", 0.01, 0.25)
