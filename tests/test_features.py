"""Feature extraction: moments against a numpy reference, attention, projection, the real backbone."""

from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
import pytest
import torch

from anchorscan.anchors.images.decode import DecodeError, decode_and_crop
from anchorscan.anchors.models.backbones import load_backbone, zscore_softmax_attention
from anchorscan.anchors.models.features import (
    SIGMA_EPS,
    FeatureExtractor,
    resample_weights,
    seeded_projection,
    spatial_statistics,
)


def test_spatial_statistics_match_numpy():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)
    weights = rng.random((2, 3, 4)).astype(np.float32)
    weights /= weights.sum(axis=(1, 2), keepdims=True)
    mean, log_sigma = spatial_statistics(torch.from_numpy(tokens), torch.from_numpy(weights))
    for b in range(2):
        flat, w = tokens[b].reshape(5, -1).astype(np.float64), weights[b].reshape(-1)
        expected_mean = flat @ w
        expected_var = ((flat - expected_mean[:, None]) ** 2) @ w
        np.testing.assert_allclose(mean[b], expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(log_sigma[b], 0.5 * np.log(expected_var + SIGMA_EPS), rtol=1e-4)


def test_attention_weights_sum_to_one_on_every_grid():
    activations = torch.randn(3, 8, 7, 7)
    attention = zscore_softmax_attention(activations)
    torch.testing.assert_close(attention.sum(dim=(1, 2)), torch.ones(3))
    for size in [(14, 14), (28, 28), (7, 7)]:
        torch.testing.assert_close(resample_weights(attention, size).sum(dim=(1, 2)), torch.ones(3))


def test_zscored_attention_is_spread_over_many_positions():
    # Activation norms spread over tens of units: a raw softmax puts the weight on one position.
    generator = torch.Generator().manual_seed(0)
    norms = 20 + 5 * torch.randn(1, 1, 7, 7, generator=generator)
    activations = norms * torch.nn.functional.normalize(torch.randn(1, 64, 7, 7, generator=generator), dim=1)
    raw = (activations.norm(dim=1).flatten(1)).softmax(dim=1)
    zscored = zscore_softmax_attention(activations).flatten(1)
    assert 1 / (raw**2).sum() < 3
    assert 1 / (zscored**2).sum() > 10


def test_projection_is_orthonormal_and_seeded():
    projection = seeded_projection(50, 20, seed=3)
    np.testing.assert_allclose(projection.T @ projection, np.eye(20), atol=1e-5)
    np.testing.assert_array_equal(projection, seeded_projection(50, 20, seed=3))
    assert not np.allclose(projection, seeded_projection(50, 20, seed=4))


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor(load_backbone())


def test_default_backbone_features(extractor):
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8))
    features = extractor(pixels)
    assert features.vectors.shape == (3, extractor.spec.dim) == (3, 1280 + 768 + 10)
    assert np.isfinite(features.vectors).all()
    assert ((features.attention_positions >= 1) & (features.attention_positions <= 49)).all()
    # One image's features do not depend on the rest of its batch.
    alone = extractor(pixels[:1]).vectors[0]
    np.testing.assert_allclose(alone, features.vectors[0], rtol=1e-4, atol=1e-4)


def test_spec_names_backbone_weights_and_layout(extractor):
    spec = extractor.spec
    assert spec.backbone == "efficientnet-lite0" and len(spec.weights_sha256) == 64
    assert spec.layout["d_semantic"] == 1280 and spec.layout["d_statistical"] == 768
    assert spec.digest() == FeatureExtractor(load_backbone()).spec.digest()
    assert spec.digest() != FeatureExtractor(load_backbone(attention="uniform")).spec.digest()


def test_crop_is_native_resolution_centre(tmp_path):
    from io import BytesIO

    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    buffer = BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    crop = decode_and_crop(buffer.getvalue(), 224)
    np.testing.assert_array_equal(crop.pixels, image[38:262, 88:312])
    assert (crop.width, crop.height, crop.preprocess) == (400, 300, "center_crop")


def test_pixel_limit_is_a_decode_error():
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (300, 300)).save(buffer, format="PNG")
    with pytest.raises(DecodeError, match="over the limit"):
        decode_and_crop(buffer.getvalue(), 224, max_pixels=300 * 299)


def test_onnxruntime_gives_the_features_of_torch():
    onnx = FeatureExtractor(load_backbone(), runtime="onnxruntime")
    eager = FeatureExtractor(load_backbone(), runtime="torch")
    for batch in (1, 5):
        pixels = torch.from_numpy(
            np.random.default_rng(batch).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
        )
        a, b = onnx(pixels), eager(pixels)
        np.testing.assert_allclose(a.vectors, b.vectors, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a.attention_positions, b.attention_positions, rtol=1e-4)


def test_an_extractor_built_again_reuses_the_export_of_the_same_features_only(monkeypatch):
    exports, export = [], torch.onnx.export

    def counted(*args, **kwargs):
        exports.append(1)
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counted)
    pixels = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8))
    first = FeatureExtractor(load_backbone(), runtime="onnxruntime", projection_seed=11)
    again = FeatureExtractor(load_backbone(), runtime="onnxruntime", projection_seed=11)
    assert len(exports) == 1
    np.testing.assert_array_equal(first(pixels).vectors, again(pixels).vectors)
    # another projection is another graph: exported again, never the last one's bytes
    other = FeatureExtractor(load_backbone(), runtime="onnxruntime", projection_seed=12)
    eager = FeatureExtractor(load_backbone(), runtime="torch", projection_seed=12)
    assert len(exports) == 2
    np.testing.assert_allclose(other(pixels).vectors, eager(pixels).vectors, rtol=1e-4, atol=1e-4)


def test_forensic_features_run_on_one_thread_and_leave_the_thread_count(extractor, monkeypatch):
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8))
    module, threads_seen = extractor.forensic, []

    def recording(batch, owners=None):
        threads_seen.append(torch.get_num_threads())
        return module(batch, owners)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with torch.inference_mode():
            threaded = module(pixels).numpy()  # the same module on the caller's threads
        monkeypatch.setattr(extractor, "forensic", recording)
        features = extractor.forensic_features(pixels)
        assert threads_seen == [1] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    # float32 FFT sums split over threads differ in order only: last bits of log energies
    np.testing.assert_allclose(features, threaded, rtol=1e-5, atol=1e-5)


def test_concurrent_forensic_passes_restore_the_callers_thread_count(extractor, monkeypatch):
    """Workers in one process (Beam's multi-threaded runner) share torch's thread count: two
    passes that overlapped would save each other's 1 and leave it behind."""
    pixels = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    module, inside, second_entered = extractor.forensic, [], threading.Event()

    def slow_pass(batch, owners=None):
        inside.append(1)
        if len(inside) == 1:  # give the other thread every chance to enter meanwhile
            second_entered.wait(0.5)
        else:
            second_entered.set()
        result = module(batch, owners)
        overlapped = len(inside) > 1
        inside.pop()
        assert not overlapped
        return result

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        monkeypatch.setattr(extractor, "forensic", slow_pass)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: extractor.forensic_features(pixels), range(2)))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_softness_levels_are_simulated_on_a_deterministic_sample_of_a_large_fit():
    import collections

    from anchorscan.transforms.inference import SOFTENED_IMAGES, softening_chosen

    Meta = collections.namedtuple("Meta", "uri")
    small = [Meta(f"s/{i}.jpg") for i in range(SOFTENED_IMAGES)]
    assert all(softening_chosen(meta, len(small)) for meta in small)
    assert all(softening_chosen(meta, None) for meta in small[:10])  # a stream: total unknown
    large = [Meta(f"l/{i}.jpg") for i in range(20 * SOFTENED_IMAGES)]
    chosen = [softening_chosen(meta, len(large)) for meta in large]
    # A hash sample: its size is binomial(20,000, 1/20), sd 31: within 4 sd of the target.
    assert abs(sum(chosen) - SOFTENED_IMAGES) < 4 * np.sqrt(SOFTENED_IMAGES * 0.95)
    assert chosen == [softening_chosen(meta, len(large)) for meta in large]  # the same every run


def test_unsampled_rows_get_nan_levels_and_sampled_rows_the_full_computation():
    from anchorscan.anchors.models.features import BackboneConfig
    from anchorscan.anchors.softness import softened

    extractor = BackboneConfig("efficientnet-lite0", runtime="torch").build()
    pixels = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8))
    levels = softened("softness_path")
    full = extractor.forensic_features(pixels, levels)
    part = extractor.forensic_features(pixels, levels, np.array([True, False, True]))
    width = extractor.spec.d_forensic
    np.testing.assert_array_equal(part[:, :width], full[:, :width])  # the sharp level: every row
    assert np.isnan(part[1, width:]).all() and not np.isnan(part[[0, 2]]).any()
    # The same crops, batched otherwise: equal up to float32 summation order.
    np.testing.assert_allclose(part[[0, 2]], full[[0, 2]], rtol=1e-5, atol=1e-5)


def test_the_model_handler_pools_each_images_tiles_and_embeds_its_centre_crop():
    from anchorscan.anchors.models.features import BackboneConfig
    from anchorscan.anchors.models.forensic import soften
    from anchorscan.anchors.softness import softened
    from anchorscan.transforms.inference import SOFTEN, SOFTEN_AND_EMBED, FeatureModelHandler

    config = BackboneConfig("efficientnet-lite0", runtime="torch")
    extractor = config.build()
    rng = np.random.default_rng(5)
    large, small = (rng.integers(0, 256, (count, 224, 224, 3), dtype=np.uint8) for count in (5, 1))
    levels = softened("softness_path")[:2]
    handler = FeatureModelHandler(config, softened=levels)
    batch = [(large, SOFTEN), (small, 0), (small, SOFTEN_AND_EMBED)]
    (large_row, _), (small_row, _), (held_row, _) = handler.run_inference(batch, extractor)
    d, width = extractor.spec.d_backbone, extractor.spec.d_forensic
    centres = torch.from_numpy(np.stack([large[0], small[0]]))
    np.testing.assert_allclose(
        large_row[:d], extractor.backbone_features(centres)[0][0], rtol=1e-5, atol=1e-5
    )
    alone = extractor.forensic_features(torch.from_numpy(large), levels, owners=np.zeros(5, np.int64))[0]
    np.testing.assert_array_equal(large_row[d:], alone)  # the softened levels pooled over the tiles too
    assert not np.allclose(large_row[d : d + width], extractor.forensic_features(centres[:1])[0])
    np.testing.assert_array_equal(small_row[d : d + width], extractor.forensic_features(centres[1:])[0])
    assert np.isnan(small_row[d + width :]).all()  # not chosen for softening
    # a held-out image: its softened copies' backbone features after the rest, one per level
    assert len(large_row) == len(small_row) == d + (1 + len(levels)) * width
    np.testing.assert_array_equal(held_row[: len(small_row)][: d + width], small_row[: d + width])
    copies = held_row[d + (1 + len(levels)) * width :].reshape(len(levels), d)
    for copy, how in zip(copies, levels):
        expected = extractor.backbone_features(soften(centres[1:], how))[0][0]
        np.testing.assert_allclose(copy, expected, rtol=1e-5, atol=1e-5)  # batched alike but for float sums
