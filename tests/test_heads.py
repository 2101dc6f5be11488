"""UnivFD's heads (docs/METHOD.md §6) against brute force and scikit-learn, merge orders of the
per-class moments, the head file, and refusal of other features."""

import itertools
import json

import numpy as np
import pytest
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score as auroc
from sklearn.neighbors import NearestNeighbors

import anchorscan.anchors.heads as heads
from anchorscan.anchors.heads import (
    HeadFileError,
    LinearProbeHead,
    LogisticHead,
    NearestNeighbourHead,
    head_from_bytes,
)
from anchorscan.anchors.spec import FeatureSpec, IncompatibleAnchorError
from anchorscan.anchors.stats import Moments
from helpers import synthetic_spec

DS, DM = 8, 4

_structure = np.random.default_rng(100)
# a well-conditioned covariance (scales 0.5..2, random rotation) away from the origin
MIXING = np.diag(np.linspace(0.5, 2.0, DS)) @ np.linalg.qr(_structure.normal(size=(DS, DS)))[0]
OFFSET = 3 * _structure.normal(size=DS)
DIRECTION = _structure.normal(size=DS)
DIRECTION /= np.linalg.norm(DIRECTION)


def spec(**changes):
    return synthetic_spec(DS, DM, d_forensic=0, **changes)  # heads never read the forensic part


def sample(n_real, n_fake, seed, shift=2.0):
    """Real vs generated features: the fakes' semantic part is shifted by ``shift`` Mahalanobis
    units; the statistical part is noise the heads must ignore."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_real, dtype=int), np.ones(n_fake, dtype=int)]
    whitened = rng.normal(size=(len(labels), DS)) + shift * np.outer(labels, DIRECTION)
    statistical = 50 * rng.normal(size=(len(labels), DM))
    return np.hstack([OFFSET + whitened @ MIXING, statistical]), labels


def fit_head(kind, features, labels):
    if kind == "nn":
        return NearestNeighbourHead.fit(spec(), features, labels, k=3)
    if kind == "lda":
        return LinearProbeHead.fit_from_rows(spec(), features, labels)
    return LogisticHead.fit(spec(), features, labels, C=10.0)


KINDS = ["nn", "lda", "logistic"]


@pytest.fixture(scope="module")
def training():
    return sample(600, 400, seed=0)


@pytest.fixture(scope="module")
def queries():
    return sample(100, 100, seed=1)[0]


@pytest.fixture(scope="module", params=KINDS)
def head(request, training):
    return fit_head(request.param, *training)


def unit(rows):
    return rows / np.sqrt((rows**2).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("k", [1, 3])
def test_nn_matches_a_brute_force_loop(training, queries, k):
    features, labels = training
    head = NearestNeighbourHead.fit(spec(), features, labels, k=k)
    reals, fakes = features[labels == 0, :DS], features[labels == 1, :DS]

    def mean_top_k_cosine(query, bank):
        cosines = [query @ row / (np.linalg.norm(query) * np.linalg.norm(row)) for row in bank]
        return np.mean(sorted(cosines)[-k:])

    some = queries[::8]  # a Python loop per pair: keep it short
    expected = [mean_top_k_cosine(q, fakes) - mean_top_k_cosine(q, reals) for q in some[:, :DS]]
    np.testing.assert_allclose(head.decision(some), expected, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_nn_matches_sklearn_cosine_neighbours(training, queries, k):
    features, labels = training
    head = NearestNeighbourHead.fit(spec(), features, labels, k=k)
    distances = {
        label: NearestNeighbors(n_neighbors=k, metric="cosine")
        .fit(features[labels == label, :DS])
        .kneighbors(queries[:, :DS])[0]
        for label in (0, 1)
    }
    # cosine distance is 1 - similarity
    expected = distances[0].mean(axis=1) - distances[1].mean(axis=1)
    np.testing.assert_allclose(head.decision(queries), expected, atol=1e-5)
    if k == 1:
        np.testing.assert_array_equal(head.predict(queries), distances[1][:, 0] < distances[0][:, 0])


def test_nn_scores_in_blocks_as_in_one_product(training, queries, monkeypatch):
    head = NearestNeighbourHead.fit(spec(), *training, k=3)
    whole = head.decision(queries)
    monkeypatch.setattr(heads, "SIMILARITY_BLOCK", 7 * len(head.fake_bank))
    # BLAS picks other kernels for other shapes, so float32 dot products of unit vectors of
    # length DS may differ by a few DS * eps; the score is a difference of two such means.
    tolerance = 4 * DS * np.finfo(np.float32).eps
    np.testing.assert_allclose(head.decision(queries), whole, rtol=0, atol=tolerance)


def test_nn_refuses_k_larger_than_a_bank(training):
    features, labels = training
    five_reals = slice(595, None)
    assert NearestNeighbourHead.fit(spec(), features[five_reals], labels[five_reals], k=5).k == 5
    with pytest.raises(ValueError, match="k must be"):
        NearestNeighbourHead.fit(spec(), features[five_reals], labels[five_reals], k=6)


def test_lda_matches_sklearn_direction_and_decisions():
    features, labels = sample(3000, 1500, seed=2)
    head = LinearProbeHead.fit_from_rows(spec(), features, labels)
    assert head.shrinkage < 0.01  # n >> d: the comparison with unshrunk LDA holds
    sklearn_lda = LinearDiscriminantAnalysis(solver="lsqr").fit(features[:, :DS], labels)
    direction = sklearn_lda.coef_[0]
    cosine = direction @ head.weights / (np.linalg.norm(direction) * np.linalg.norm(head.weights))
    assert cosine > 0.999
    test_features, test_labels = sample(500, 500, seed=3)
    expected = sklearn_lda.decision_function(test_features[:, :DS])  # also log-odds with priors
    actual = head.decision(test_features)
    assert np.mean((actual > 0) == (expected > 0)) >= 0.99
    assert np.abs(actual - expected).max() < 0.05 * expected.std()
    assert 0.5 < np.mean(head.predict(test_features) == test_labels) < 1.0  # classes overlap


def test_lda_without_shrinkage_is_sklearn_lda_on_the_unbiased_pooled_covariance(monkeypatch):
    features, labels = sample(30, 20, seed=6)  # few rows: the n - 2 of the pooled estimate shows
    monkeypatch.setattr(heads, "shrunk_covariance", lambda moments: (moments.covariance(), 0.0))
    head = LinearProbeHead.fit_from_rows(spec(), features, labels)
    sklearn_lda = LinearDiscriminantAnalysis(solver="lsqr").fit(features[:, :DS], labels)
    # scikit-learn pools the biased class covariances (divides by n, not n - 2)
    n = len(labels)
    np.testing.assert_allclose(head.weights, sklearn_lda.coef_[0] * (n - 2) / n, rtol=1e-8)
    prior_log_odds = np.log(20 / 30)
    assert head.bias - prior_log_odds == pytest.approx(
        (sklearn_lda.intercept_[0] - prior_log_odds) * (n - 2) / n, rel=1e-8
    )


def assert_same_lda(actual, expected):
    np.testing.assert_allclose(actual.weights, expected.weights, rtol=1e-9)
    assert actual.bias == pytest.approx(expected.bias, rel=1e-9)
    assert actual.shrinkage == pytest.approx(expected.shrinkage, rel=1e-9)
    assert actual.counts == expected.counts


def merged(parts):
    total = Moments(parts[0].dim)
    for part in parts:
        total.merge(part)
    return total


def test_lda_from_moments_merged_in_any_order_is_the_same_head(training):
    features, labels = training
    reference = LinearProbeHead.fit_from_rows(spec(), features, labels)
    chunks = {
        label: [Moments.of(rows) for rows in np.array_split(features[labels == label], 4)] for label in (0, 1)
    }
    orders = [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)]
    for order_real, order_fake in itertools.product(orders, orders):
        real = merged([chunks[0][i] for i in order_real])
        fake = merged([chunks[1][i] for i in order_fake])
        assert_same_lda(LinearProbeHead.fit(spec(), real, fake), reference)
    # a tree of merges, as a combiner with fanout makes them
    tree = [merged([merged(chunks[label][:2]), merged(chunks[label][2:])]) for label in (0, 1)]
    assert_same_lda(LinearProbeHead.fit(spec(), *tree), reference)


def test_lda_takes_moments_of_the_features_or_of_their_semantic_part(training):
    features, labels = training
    full = [Moments.of(features[labels == label]) for label in (0, 1)]
    semantic = [Moments.of(features[labels == label, :DS]) for label in (0, 1)]
    assert_same_lda(LinearProbeHead.fit(spec(), *full), LinearProbeHead.fit(spec(), *semantic))
    with pytest.raises(ValueError, match="neither"):
        LinearProbeHead.fit(spec(), Moments.of(features[:, :5]), full[1])


def test_lda_log_odds_at_the_class_midpoint_are_the_log_prior_odds(training):
    features, labels = training
    head = LinearProbeHead.fit_from_rows(spec(), features, labels)
    midpoint = (features[labels == 0].mean(axis=0) + features[labels == 1].mean(axis=0)) / 2
    assert head.decision(midpoint)[0] == pytest.approx(np.log(np.mean(labels) / np.mean(1 - labels)))


def test_logistic_matches_sklearn_fitted_directly(training, queries):
    features, labels = training
    head = LogisticHead.fit(spec(), features, labels, C=10.0)
    rows = unit(features[:, :DS])
    order = np.argsort(labels, kind="stable")  # the head sees reals first, then fakes
    model = LogisticRegression(C=10.0, max_iter=1000).fit(rows[order], labels[order])
    np.testing.assert_allclose(head.coef, model.coef_[0], rtol=1e-5)
    np.testing.assert_allclose(
        head.decision(queries), model.decision_function(unit(queries[:, :DS])), atol=1e-5
    )


@pytest.mark.parametrize("kind", KINDS)
def test_every_head_separates_shifted_gaussians(kind):
    head = fit_head(kind, *sample(600, 400, seed=4, shift=4.0))
    test_features, test_labels = sample(300, 300, seed=5, shift=4.0)
    assert auroc(test_labels, head.decision(test_features)) > 0.95


def test_round_trip_gives_identical_scores(head, queries):
    loaded = head_from_bytes(head.to_bytes())
    assert type(loaded) is type(head) and loaded.kind == head.kind
    assert loaded.spec == head.spec and loaded.counts == head.counts
    np.testing.assert_array_equal(loaded.decision(queries), head.decision(queries))
    assert loaded._parameters() == head._parameters()


def test_metadata_records_kind_spec_and_counts(head):
    data = head.to_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    metadata = json.loads(header["__metadata__"][heads.METADATA_KEY])
    assert metadata["kind"] == head.kind and metadata["format_version"] == heads.FORMAT_VERSION
    assert FeatureSpec.from_dict(metadata) == spec()
    assert metadata["counts"] == head.counts
    assert sum(head.counts.values()) == 1000


def test_tampered_metadata_is_refused(training):
    data = NearestNeighbourHead.fit(spec(), *training, k=3).to_bytes()
    tampered = data.replace(b'\\"k\\": 3', b'\\"k\\": 1')
    assert tampered != data and len(tampered) == len(data)
    with pytest.raises(HeadFileError, match="checksum"):
        head_from_bytes(tampered)


@pytest.mark.parametrize("field, value", [("backbone", "clip-vit-l14"), ("weights_sha256", "f" * 64)])
def test_head_refuses_features_of_another_spec(head, queries, field, value):
    with pytest.raises(IncompatibleAnchorError, match=f"{field}:"):
        head.decision(queries, spec(**{field: value}))
    with pytest.raises(IncompatibleAnchorError):
        head.predict(queries, spec(**{field: value}))
    np.testing.assert_array_equal(head.decision(queries, spec()), head.decision(queries))


def test_head_refuses_features_of_another_width(head, queries):
    with pytest.raises(ValueError, match="feature spec expects rows of 12"):
        head.decision(queries[:, :DS])


@pytest.mark.parametrize("kind", KINDS)
def test_fitting_needs_both_classes(kind, training):
    features, labels = training
    with pytest.raises(ValueError, match="real and fake"):
        fit_head(kind, features[labels == 0], labels[labels == 0])


def test_lda_on_every_channel_reads_the_whole_row():
    features, labels = sample(600, 400, seed=6)
    features[labels == 1, DS:] += 40.0  # the fakes also differ outside the semantic part
    head = LinearProbeHead.fit_from_rows(spec(), features, labels, parts="all")
    assert head.weights.shape == (DS + DM,)
    loaded = head_from_bytes(head.to_bytes())
    assert loaded.parts == "all"
    queries, _ = sample(50, 50, seed=7)
    np.testing.assert_allclose(loaded.decision(queries), head.decision(queries), rtol=1e-12)
    semantic_only = LinearProbeHead.fit_from_rows(spec(), features, labels)
    test_features, test_labels = sample(300, 300, seed=8)
    test_features[test_labels == 1, DS:] += 40.0
    assert auroc(test_labels, head.decision(test_features)) > auroc(
        test_labels, semantic_only.decision(test_features)
    )
