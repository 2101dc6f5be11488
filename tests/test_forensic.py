"""The forensic channel (docs/METHOD.md §8) against independent oracles: direct convolutions for
the spectral energies, explicit least squares for the predictors, scipy's Mahalanobis distance
for the mixture; merge orders; invariance to where the crop falls; the bundled demo images."""

from __future__ import annotations

import glob
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.signal import convolve2d
from scipy.spatial.distance import mahalanobis
from sklearn.metrics import roc_auc_score

from anchorscan.anchors.forensic import ForensicModel
from anchorscan.anchors.models import forensic
from anchorscan.anchors.models.forensic import (
    EPS,
    FEATURE_NAMES,
    GramAccumulator,
    ResidualFeatures,
    luma,
    predictor_digest,
    residual_kernels,
    shipped_predictor,
    soften,
    taper_window,
)
from anchorscan.anchors.softness import LEVEL_SETS
from anchorscan.anchors.stats import Moments
from helpers import sample_photos

DEMO = Path(__file__).parents[1] / "demo" / "data"


def photo_crops(size=96, count=6, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    crops = []
    for photo in itertools.islice(itertools.cycle(sample_photos().values()), count):
        top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        crops.append(photo[top : top + size, left : left + size])
    return np.stack(crops)


def test_profile_energies_equal_direct_convolutions():
    crops = photo_crops()
    features = ResidualFeatures()(torch.from_numpy(crops)).numpy()
    kernels = residual_kernels(shipped_predictor())
    window = taper_window(*crops.shape[1:3]).numpy()
    for image, row in zip(crops, features):
        x = luma(torch.from_numpy(image[None]))[0].numpy() * window
        for index, name in enumerate(forensic.PREDICTORS):
            energies = [(convolve2d(x, kernel, mode="full") ** 2).sum() for kernel in kernels[name]]
            expected = np.log(np.mean(energies) / (window**2).sum() + EPS)
            # float32 FFTs of 128 x 128 against float64 convolutions: about 1e-5 relative
            assert row[index] == pytest.approx(expected, abs=2e-4), name


def test_tiles_pool_their_residual_energies_then_take_the_logs():
    tiles = photo_crops(size=96, count=5)
    features = ResidualFeatures()
    alone = features(torch.from_numpy(tiles)).numpy().astype(np.float64)
    owners = torch.tensor([0, 0, 0, 1, 1])
    pooled = features(torch.from_numpy(tiles), owners).numpy()
    profile = len(forensic.PREDICTORS)
    for image, members in ((0, [0, 1, 2]), (1, [3, 4])):
        energies = np.exp(alone[members, :profile]) - EPS
        expected = np.log(energies.mean(0) + EPS)
        # float32 features: the energies come back from their logs to about 1e-6 relative
        np.testing.assert_allclose(pooled[image, :profile], expected, atol=1e-5)
        assert not np.allclose(pooled[image, :profile], alone[members, :profile].mean(0), atol=1e-3)
    # one crop per image is the crop's own features, bit for bit; a crop pooled with itself too
    assert np.array_equal(
        features(torch.from_numpy(tiles), torch.arange(5)).numpy(), alone.astype(np.float32)
    )
    twice = features(torch.from_numpy(tiles[[2, 2]]), torch.tensor([0, 0])).numpy()
    np.testing.assert_allclose(twice[0], alone[2], rtol=1e-6)  # a mean of two equal float32 sums


def _design(x: np.ndarray, neighbours: np.ndarray, targets: np.ndarray):
    """The explicit least-squares problem over every pixel of the zero-padded windowed luma."""
    columns = [convolve2d(x, kernel[::-1, ::-1], mode="full").ravel() for kernel in neighbours]
    return np.stack(columns, 1), np.stack(
        [convolve2d(x, k[::-1, ::-1], mode="full").ravel() for k in targets], 1
    )


@pytest.mark.parametrize("name", ["e0", "x01"])
def test_predictors_are_the_least_squares_fit_over_every_pixel(name):
    crops = photo_crops(size=64, count=4)
    ridge = 1e-4
    weights = GramAccumulator().add(torch.from_numpy(crops)).solve(ridge)[name]
    neighbours, targets = forensic.predictor_elements()[name]
    window = taper_window(64, 64).numpy()
    gram_xx, gram_xy = 0.0, 0.0
    for image in crops:
        x = luma(torch.from_numpy(image[None]))[0].numpy().astype(np.float64) * window
        design, target = _design(x, neighbours, targets)
        scale = (window**2).sum() * len(crops)
        gram_xx = gram_xx + design.T @ design / scale
        gram_xy = gram_xy + design.T @ target / scale
    q = len(neighbours)
    expected = np.linalg.solve(gram_xx + ridge * np.trace(gram_xx) / q * np.eye(q), gram_xy).T
    # the accumulator's autocorrelations come from float32 FFTs
    np.testing.assert_allclose(weights, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_the_gram_accumulator_merges_in_any_order():
    crops = torch.from_numpy(photo_crops(size=64, count=6))
    parts = [GramAccumulator().add(crops[i : i + 2]) for i in range(0, 6, 2)]
    whole = GramAccumulator().add(crops)
    for order in itertools.permutations(range(3)):
        merged = GramAccumulator()
        for i in order:
            merged.merge(parts[i])
        assert merged.n == whole.n
        np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-9)  # float64 sums of the same terms


def test_the_shipped_predictor_is_named_by_its_digest():
    weights = shipped_predictor()
    assert ResidualFeatures().digest == predictor_digest(weights)
    assert {name: weights[name].shape for name in forensic.PREDICTORS} == {
        "e0": (1, 48),
        "e1": (1, 48),
        "e2": (1, 48),
        "x01": (4, 16),
        "x12": (4, 16),
        "x02": (16, 16),
    }


def upscaled(crops: np.ndarray, factor: int = 2) -> np.ndarray:
    small = [
        Image.fromarray(c).resize((c.shape[1] // factor, c.shape[0] // factor), Image.BOX) for c in crops
    ]
    return np.stack([np.asarray(s.resize((crops.shape[2], crops.shape[1]), Image.BICUBIC)) for s in small])


def test_an_upscale_leaves_a_grid_that_the_spreads_see_wherever_the_crop_falls():
    # x2: the S1 residual's energy differs between the pixel classes mod 2 (the grid the
    # upsampler filled in); a shift only permutes the classes.
    crops = photo_crops(size=200, count=8)
    features = ResidualFeatures()
    spread = FEATURE_NAMES.index("spread_e1_mod2")
    real = features(torch.from_numpy(crops[:, :192, :192])).numpy()[:, spread]
    up = upscaled(crops)
    for offset in range(4):
        shifted = features(torch.from_numpy(up[:, offset : offset + 192, offset : offset + 192])).numpy()[
            :, spread
        ]
        assert shifted.min() > 2 * real.max(), offset


def test_the_mixture_scores_like_scipy_and_picks_the_closest_level():
    rng = np.random.default_rng(0)
    levels = [
        Moments.of(rng.normal(loc=3 * j, scale=1 + j, size=(200, 4)) @ rng.normal(size=(4, 4)))
        for j in range(3)
    ]
    model = ForensicModel(("sharp", "blur1.0", "upscale2x"), levels)
    rows = rng.normal(scale=4, size=(25, 4))
    distances, chosen = model.distances(rows)
    for row, distance, level in zip(rows, distances, chosen):
        per_level = []
        for moments in levels:
            covariance = moments.covariance()
            covariance += ForensicModel.RIDGE * np.trace(covariance) / 4 * np.eye(4)
            per_level.append(mahalanobis(row, moments.mean, np.linalg.inv(covariance)) ** 2)
        assert distance == pytest.approx(min(per_level), rel=1e-9)
        assert level == int(np.argmin(per_level))


def test_levels_side_by_side_split_into_the_per_level_gaussians():
    rng = np.random.default_rng(1)
    side_by_side = rng.normal(size=(300, 3 * 5))
    model = ForensicModel.from_levels(("sharp", "blur0.4", "blur0.8"), Moments.of(side_by_side))
    for j, moments in enumerate(model.moments):
        expected = Moments.of(side_by_side[:, 5 * j : 5 * (j + 1)])
        np.testing.assert_allclose(moments.mean, expected.mean, rtol=1e-12)
        np.testing.assert_allclose(moments.m2, expected.m2, rtol=1e-9)


def test_soften_keeps_the_shape_and_blurs_more_with_sigma():
    crops = torch.from_numpy(photo_crops(size=64, count=2))
    energies = []
    for name, how in LEVEL_SETS["softness_path"]:
        soft = soften(crops, how)
        assert soft.shape == crops.shape and soft.dtype == torch.uint8, name
        energies.append(float(torch.diff(soft.float(), dim=2).pow(2).mean()))
    blurs = energies[1:7]
    assert energies[0] > blurs[0] and all(a > b for a, b in itertools.pairwise(blurs))


def demo_crops(folder: str, offset: int, size: int = 216) -> torch.Tensor:
    paths = sorted(glob.glob(str(DEMO / folder / "*.png")))
    assert paths, folder
    return torch.from_numpy(
        np.stack(
            [
                np.asarray(Image.open(p).convert("RGB"))[offset : offset + size, offset : offset + size]
                for p in paths
            ]
        )
    )


@pytest.fixture(scope="module")
def demo_model():
    features = ResidualFeatures()
    real = demo_crops("fit/real", 0)
    levels = LEVEL_SETS["softness_path"]
    joint = Moments.of(np.hstack([features(soften(real, how)).numpy() for _, how in levels]))
    return features, ForensicModel.from_levels(tuple(name for name, _ in levels), joint)


@pytest.mark.parametrize("generator", ["realcugan", "waifu2x"])
def test_auroc_does_not_depend_on_where_the_crop_falls(demo_model, generator):
    # The bar: shifting the crops by 1, 2 or 3 px moves the AUROC by at most 0.02.
    features, model = demo_model
    aurocs = []
    for offset in range(4):
        real = model.distances(features(demo_crops("scan/real", offset)).numpy())[0]
        fake = model.distances(features(demo_crops(f"scan/{generator}", offset)).numpy())[0]
        aurocs.append(roc_auc_score(np.r_[np.zeros(len(real)), np.ones(len(fake))], np.r_[real, fake]))
    assert aurocs[0] > 0.8  # the channel sees these upscalers at all
    assert max(aurocs) - min(aurocs) <= 0.02, aurocs


@pytest.mark.parametrize("sigma", [0.4, 1.0, 1.5])
def test_gaussian_blur_matches_a_direct_convolution(sigma):
    # Oracle: numpy's reflect padding (the border sample not repeated) and the same taps, row
    # then column, in float64. The product rounds float32 sums to uint8, so a value at a
    # rounding tie may land one gray level away: allowed on at most 1e-4 of the pixels.
    from anchorscan.anchors.models.forensic import gaussian_blur

    pixels = np.random.default_rng(3).integers(0, 256, size=(2, 40, 56, 3), dtype=np.uint8)
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    x = np.pad(
        pixels.astype(np.float64), ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect"
    )
    rows = sum(w * x[:, :, i : i + pixels.shape[2]] for i, w in enumerate(taps))
    both = sum(w * rows[:, i : i + pixels.shape[1]] for i, w in enumerate(taps))
    expected = np.clip(np.round(both), 0, 255)
    actual = gaussian_blur(torch.from_numpy(pixels), sigma).numpy().astype(np.float64)
    difference = np.abs(actual - expected)
    assert difference.max() <= 1 and np.mean(difference > 0) <= 1e-4
