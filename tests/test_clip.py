"""CLIP backbones with random weights of the real architectures (tests never download)."""

from __future__ import annotations

import os
import pathlib
import pickle
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from anchorscan.anchors.models.backbones import (
    CLIP_MODELS,
    ClipVisionBackbone,
    MissingWeightsError,
    build_clip_visual,
    cls_attention,
)
from anchorscan.anchors.models.features import SIGMA_EPS, spatial_statistics
from anchorscan.anchors.models.weights import WeightsError, read_state_dict
from anchorscan.anchors.spec import IncompatibleAnchorError
from helpers import HOLD_OUT_BY_NAME, RUNNER, read_parquet_rows


class _Tower(torch.nn.Module):
    """OpenAI's checkpoints are TorchScript archives of the whole model; the image tower lives
    under ``visual.``."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, x):
        return self.visual(x)


def save_openai_format(visual, path, dtype=torch.float16):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_Tower(visual).eval(), torch.zeros(1, 3, 224, 224), check_trace=False)
        traced = traced.to(dtype)
        torch.jit.save(traced, str(path))
    return str(path)


@pytest.fixture(scope="module")
def b32_weights(tmp_path_factory):
    torch.manual_seed(0)
    visual = build_clip_visual(CLIP_MODELS["clip-vit-b-32"].architecture)
    folder = tmp_path_factory.mktemp("b32")
    return {
        "visual": visual,
        "openai": save_openai_format(visual, folder / "ViT-B-32.pt"),
        "safetensors": _save_safetensors(visual, folder / "open_clip_model.safetensors"),
    }


def _save_safetensors(visual, path):
    save_file({f"visual.{k}": v.contiguous() for k, v in visual.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def b32(b32_weights):
    with pytest.warns(UserWarning, match="not the published digest"):
        return ClipVisionBackbone("clip-vit-b-32", b32_weights["openai"])


def test_openai_archive_is_read_without_unpickling_code(b32_weights):
    tensors = read_state_dict(b32_weights["openai"])
    reference = b32_weights["visual"].state_dict()
    for key, value in reference.items():
        assert torch.equal(tensors[f"visual.{key}"].float(), value.half().float())
    assert tensors["visual.conv1.weight"].dtype == torch.float16


def test_both_weight_formats_give_the_same_features(b32, b32_weights):
    with pytest.warns(UserWarning):
        other = ClipVisionBackbone("clip-vit-b-32", b32_weights["safetensors"])
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        a, b = b32(pixels), other(pixels)
    # The archive holds fp16 weights, like OpenAI's; the safetensors file float32.
    torch.testing.assert_close(a.semantic, b.semantic, rtol=0.05, atol=0.05)
    assert b32.layout["weights"] == "unverified" and b32.weights_sha256 != other.weights_sha256


def test_shapes_and_attention(b32):
    pixels = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        output = b32(pixels)
    assert output.semantic.shape == (3, 512)
    assert [tuple(t.shape) for t in output.token_maps] == [(3, 768, 7, 7)] * 3
    assert output.attention.shape == (3, 7, 7)
    torch.testing.assert_close(output.attention.sum(dim=(1, 2)), torch.ones(3))


def test_cls_attention_matches_the_blocks_own_attention(b32):
    block = b32.visual.transformer.resblocks[-1]
    tokens = torch.randn(2, 50, 768)
    with torch.inference_mode():
        hidden = block.ln_1(tokens)
        _, weights = block.attn(hidden, hidden, hidden, need_weights=True, average_attn_weights=True)
        expected = weights[:, 0, 1:] / weights[:, 0, 1:].sum(dim=1, keepdim=True)
        torch.testing.assert_close(cls_attention(block, tokens), expected, rtol=1e-4, atol=1e-6)


def test_spatial_statistics_of_clip_tokens_match_numpy(b32):
    pixels = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        output = b32(pixels)
    tokens = output.token_maps[-1][0].reshape(768, -1).double().numpy()
    weights = output.attention[0].reshape(-1).double().numpy()
    mean, log_sigma = spatial_statistics(output.token_maps[-1], output.attention)
    expected_mean = tokens @ weights
    expected_var = ((tokens - expected_mean[:, None]) ** 2) @ weights
    np.testing.assert_allclose(mean[0].numpy(), expected_mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        log_sigma[0].numpy(), 0.5 * np.log(expected_var + SIGMA_EPS), rtol=1e-4, atol=1e-4
    )


def test_missing_weights_explain_where_to_get_them():
    with pytest.raises(MissingWeightsError, match=r"--weights.*b8cca3fd"):
        ClipVisionBackbone("clip-vit-l-14")


def test_weights_of_another_architecture_are_refused(b32_weights):
    with pytest.raises(WeightsError, match="not a clip-vit-b-16 checkpoint"):
        ClipVisionBackbone("clip-vit-b-16", b32_weights["safetensors"])


def test_a_pickle_with_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"visual.conv1.weight": Payload()}))
    with pytest.raises(WeightsError, match=r"refused|cannot read"):
        read_state_dict(str(path))


def test_end_to_end_fit_and_score_with_openai_format(b32_weights, real_photos, tmp_path):
    from anchorscan.pipelines import fit, score

    anchor = str(tmp_path / "clip.safetensors")
    common = ["--backbone", "clip-vit-b-32", "--weights", b32_weights["openai"], *RUNNER]
    fit.run(
        [
            "--input",
            str(real_photos),
            "--anchor",
            anchor,
            "--calibration_fraction",
            "0.3",
            *HOLD_OUT_BY_NAME,
            *common,
        ]
    )
    summary = score.run(
        [
            "--input",
            str(real_photos / "*.png"),
            "--anchor",
            anchor,
            "--output",
            str(tmp_path / "scan"),
            "--weights",
            b32_weights["openai"],
            *RUNNER,
        ]
    )
    rows = read_parquet_rows(str(tmp_path / "scan-scores-*.parquet"))
    assert summary["scored"] == len(rows) == len(list(real_photos.glob("*.png")))
    assert all(np.isfinite(row["score"]) for row in rows)

    # The same anchor refuses features made with other weights.
    with pytest.raises(IncompatibleAnchorError, match="weights_sha256"):
        score.run(
            [
                "--input",
                str(real_photos),
                "--anchor",
                anchor,
                "--output",
                str(tmp_path / "other"),
                "--weights",
                b32_weights["safetensors"],
                *RUNNER,
            ]
        )


@pytest.mark.slow
def test_vit_l14_end_to_end_from_an_openai_format_file(real_photos, tmp_path):
    from anchorscan.pipelines import fit, score

    torch.manual_seed(0)
    weights = save_openai_format(
        build_clip_visual(CLIP_MODELS["clip-vit-l-14"].architecture), tmp_path / "ViT-L-14.pt"
    )
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(real_photos.iterdir())[:14]:
        (few / path.name).write_bytes(path.read_bytes())
    anchor = str(tmp_path / "l14.safetensors")
    fit.run(
        [
            "--input",
            str(few),
            "--anchor",
            anchor,
            "--calibration_fraction",
            "0.6",
            *HOLD_OUT_BY_NAME,
            "--backbone",
            "clip-vit-l-14",
            "--weights",
            weights,
            "--batch_size",
            "8",
            *RUNNER,
        ]
    )
    summary = score.run(
        [
            "--input",
            str(few / "*_0.jpg"),
            "--anchor",
            anchor,
            "--weights",
            weights,
            "--output",
            str(tmp_path / "scan"),
            *RUNNER,
        ]
    )
    rows = read_parquet_rows(str(tmp_path / "scan-scores-*.parquet"))
    assert summary["scored"] == len(rows) > 0
    from anchorscan.anchors.anchor_file import read_metadata

    metadata = read_metadata(pathlib.Path(anchor).read_bytes())
    assert metadata["backbone"] == "clip-vit-l-14" and metadata["d_semantic"] == 768
    assert metadata["layout"]["token_blocks"] == [7, 15, 23]
