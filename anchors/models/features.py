"""Feature vectors of a crop: z = [semantic ; R (mu_l ; log sigma_l)_l ; forensic], the first two
from one forward pass of the backbone (docs/METHOD.md §2), the last from the pixels
(``forensic``, docs/METHOD.md §8)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anchorscan.anchors.forensic import TILING
from anchorscan.anchors.models.forensic import FEATURE_NAMES as FORENSIC_FEATURES
from anchorscan.anchors.models.forensic import ResidualFeatures, soften
from anchorscan.anchors.spec import FeatureSpec

SIGMA_EPS = 1e-6
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
PRECISIONS = tuple(AUTOCAST_DTYPES)
RUNTIMES = ("auto", "torch", "onnxruntime")


@functools.lru_cache(maxsize=4)
def seeded_projection(raw_dim: int, out_dim: int, seed: int) -> np.ndarray:
    """A fixed orthonormal (raw_dim, out_dim) projection: the same seed gives the same matrix
    (computed once per process; read-only)."""
    gaussian = np.random.default_rng(seed).standard_normal((raw_dim, out_dim))
    q, r = np.linalg.qr(gaussian)
    projection = (q * np.sign(np.diag(r))).astype(np.float32)
    projection.flags.writeable = False
    return projection


def resample_weights(attention: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Attention (B, h, w) moved to another grid, still summing to 1 per image."""
    if tuple(attention.shape[1:]) != tuple(size):
        attention = F.interpolate(attention[:, None], size=size, mode="bilinear", align_corners=False)[
            :, 0
        ].clamp_min(0)
    return attention / attention.sum(dim=(1, 2), keepdim=True)


def spatial_statistics(token_map: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-weighted mean and log standard deviation per channel of a (B, C, H, W) map."""
    tokens = token_map.float().flatten(2)  # (B, C, N)
    w = weights.flatten(1)[:, None, :]  # (B, 1, N)
    mean = (tokens * w).sum(dim=2)
    variance = (((tokens - mean[:, :, None]) ** 2) * w).sum(dim=2)
    return mean, 0.5 * torch.log(variance + SIGMA_EPS)


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Everything needed to build the same feature extractor on the driver and on workers."""

    name: str
    weights: str | None = None
    attention: str | None = None  # None: the backbone's default
    resize: str = "none"
    statistical_budget: int = 768
    projection_seed: int = 0
    device: str = "cpu"
    precision: str = "bf16"  # autocast dtype on GPUs: bf16, fp16 or fp32 (none)
    runtime: str = "auto"  # see FeatureExtractor

    @classmethod
    def from_spec(cls, spec: FeatureSpec, **runtime) -> BackboneConfig:
        """The extractor that makes the features ``spec`` describes; ``runtime``: weights,
        device, precision, runtime, which do not change the features."""
        return cls(
            spec.backbone,
            attention=spec.layout["attention"],
            resize=spec.preprocessing["resize"],
            statistical_budget=spec.layout["d_statistical"],
            projection_seed=spec.layout["projection_seed"],
            **runtime,
        )

    def build(self) -> FeatureExtractor:
        from anchorscan.anchors.models.backbones import load_backbone

        backbone = load_backbone(self.name, self.weights, self.attention, self.resize)
        return FeatureExtractor(
            backbone, self.statistical_budget, self.projection_seed, self.device, self.precision, self.runtime
        )


@dataclasses.dataclass
class Features:
    vectors: np.ndarray  # (B, d) float32
    attention_positions: np.ndarray  # (B,) effective number of positions, 1 / sum a_i^2
    # the backbone features of the softened copies of the images ``embed_rows`` marked, each
    # (levels * d_backbone,), in their order (fit time, held-out images: docs/METHOD.md §5.4)
    softened_backbone: np.ndarray | None = None


class FeatureModule(nn.Module):
    """uint8 crops (B, H, W, 3) -> (feature vectors (B, d), effective positions (B,)): the
    whole extraction as one module, so it can also be exported to ONNX."""

    def __init__(self, backbone, projection: np.ndarray | None, autocast_dtype=None):
        super().__init__()
        self.backbone, self.autocast_dtype = backbone, autocast_dtype
        self.register_buffer("projection", None if projection is None else torch.tensor(projection))

    def forward(self, pixels: torch.Tensor):
        # Reduced precision for the backbone only; spatial statistics and projection stay float32.
        with torch.autocast(
            pixels.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            output = self.backbone(pixels.permute(0, 3, 1, 2))
        parts: list[torch.Tensor] = []
        for token_map in output.token_maps:
            weights = resample_weights(output.attention, token_map.shape[2:])
            parts.extend(spatial_statistics(token_map, weights))
        statistical = torch.cat(parts, dim=1)
        projection = self.projection
        if isinstance(projection, torch.Tensor):
            statistical = statistical @ projection
        vectors = torch.cat([output.semantic.float(), statistical], dim=1)
        return vectors, 1.0 / (output.attention.flatten(1) ** 2).sum(dim=1)


# The last export's bytes, by what determines them (the features' spec digest and the crop): a
# process that builds the same extractor again (a pipeline run after another, the local runner's
# worker after its driver) skips the second of export's one to two core-seconds.
_LAST_EXPORT: dict[tuple[str, int], bytes] = {}


def onnx_session(module: FeatureModule, crop_size: int, spec_digest: str):
    """The module exported to ONNX and loaded in ONNX Runtime with torch's thread count."""
    import onnxruntime

    key = (spec_digest, crop_size)
    model = _LAST_EXPORT.get(key)
    if model is None:
        buffer = io.BytesIO()
        example = torch.zeros(1, crop_size, crop_size, 3, dtype=torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            torch.onnx.export(
                module,
                (example,),
                buffer,  # type: ignore[arg-type]  # the exporter writes to any binary file object
                input_names=["pixels"],
                output_names=["vectors", "positions"],
                dynamic_axes={"pixels": {0: "batch"}},
                dynamo=False,
            )
        model = buffer.getvalue()
        _LAST_EXPORT.clear()  # one model's bytes at most (tens of MB)
        _LAST_EXPORT[key] = model
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


_ONE_TORCH_THREAD = threading.Lock()


class FeatureExtractor:
    """Backbone + spatial statistics + projection; ``spec`` names everything the features depend on.

    ``runtime``: "torch", "onnxruntime", or "auto" - ONNX Runtime for backbones measured faster
    with it on CPUs (EfficientNet-Lite0: 3.3x, features equal to 1e-5), torch elsewhere."""

    def __init__(
        self,
        backbone,
        statistical_budget: int = 768,
        projection_seed: int = 0,
        device: str = "cpu",
        precision: str = "bf16",
        runtime: str = "auto",
    ):
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, not {precision!r}")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device)
        raw_dim = 2 * sum(backbone.layout["token_channels"])
        self.projection = (
            seeded_projection(raw_dim, statistical_budget, projection_seed)
            if raw_dim > statistical_budget
            else None
        )
        d_statistical = raw_dim if self.projection is None else statistical_budget
        projection_digest = (
            "none" if self.projection is None else hashlib.sha256(self.projection.tobytes()).hexdigest()
        )
        self.forensic = ResidualFeatures()
        layout = dict(
            backbone.layout,
            d_statistical=d_statistical,
            statistical_raw_dim=raw_dim,
            projection_seed=projection_seed,
            projection_sha256=projection_digest,
            sigma_eps=SIGMA_EPS,
            d_forensic=len(FORENSIC_FEATURES),
            forensic_features=list(FORENSIC_FEATURES),
            forensic_predictor_sha256=self.forensic.digest,
            forensic_tiles=TILING,
        )
        self.spec = FeatureSpec(backbone.name, backbone.weights_sha256, backbone.preprocessing, layout)
        # On CPUs autocast was measured slower than float32: it is used on GPUs only.
        autocast_dtype = AUTOCAST_DTYPES[precision] if self.device.type == "cuda" else None
        self.module = FeatureModule(self.backbone, self.projection, autocast_dtype).to(self.device).eval()
        if runtime == "auto":
            runtime = (
                "onnxruntime" if self.device.type == "cpu" and backbone.faster_in_onnxruntime else "torch"
            )
        self.runtime = runtime
        self._session = (
            onnx_session(self.module, backbone.crop_size, self.spec.digest())
            if runtime == "onnxruntime"
            else None
        )

    def backbone_features(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(rows of [semantic ; statistical], effective attention positions) of (B, H, W, 3)
        uint8 crops: one forward pass."""
        if self._session is not None:
            return tuple(self._session.run(None, {"pixels": pixels.numpy()}))
        with torch.inference_mode():
            vectors, positions = self.module(pixels.to(self.device, non_blocking=True))
        return vectors.cpu().numpy(), positions.cpu().numpy()

    def forensic_features(
        self,
        pixels: torch.Tensor,
        softened: tuple = (),
        soften_rows: np.ndarray | None = None,
        owners: np.ndarray | None = None,
    ) -> np.ndarray:
        """The forensic features of the images, then, for each of ``softened`` (fit time: the
        softness levels after "sharp", see ``forensic.SOFTNESS_PATH``), of their crops softened
        so, side by side; only for the images ``soften_rows`` marks (all without it), NaN for
        the others. ``owners``: the image of each crop of ``pixels`` (its tiles, pooled), where
        an image has more than one; else one crop per image. In torch beside the backbone: ONNX
        export has no FFT here."""
        images = len(pixels) if owners is None else int(owners[-1]) + 1 if len(owners) else 0
        rows = np.ones(images, dtype=bool) if soften_rows is None else np.asarray(soften_rows, bool)
        # One thread: its small FFTs gain little from more, and beside decoder processes the
        # other threads' barrier waits cost more cores than they save (docs/BENCHMARKS.md).
        # The count is process-wide: the lock keeps two threads' save and restore from interleaving.
        with _ONE_TORCH_THREAD:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with torch.inference_mode():
                    owner = None if owners is None else torch.from_numpy(np.asarray(owners, np.int64))
                    sharp = self.forensic(pixels, owner).numpy()
                    if not softened:
                        return sharp
                    levels = np.full((images, len(softened) * sharp.shape[1]), np.nan, np.float32)
                    if rows.any():
                        crops = rows if owners is None else rows[owners]
                        chosen = pixels[torch.from_numpy(crops)]
                        # the chosen images' crops, numbered 0 ... among the chosen
                        renumbered = (
                            None if owners is None else torch.from_numpy(np.cumsum(rows)[owners[crops]] - 1)
                        )
                        levels[rows] = torch.cat(
                            [self.forensic(soften(chosen, how), renumbered) for how in softened], 1
                        )
                    return np.concatenate([sharp, levels], axis=1)
            finally:
                torch.set_num_threads(threads)

    def __call__(
        self,
        pixels: torch.Tensor,
        softened: tuple = (),
        soften_rows: np.ndarray | None = None,
        owners: np.ndarray | None = None,
        embed_rows: np.ndarray | None = None,
    ) -> Features:
        """``pixels``: (B, H, W, 3) uint8 crops; with ``owners`` (the image of each crop,
        non-decreasing), each image's crops in a row, its centre crop first and its other tiles
        after. Rows are [semantic ; statistical ; forensic] per image (and the softened copies'
        forensic features, see ``forensic_features``); the backbone sees the centre crops, and
        for the images ``embed_rows`` marks, their centre crops softened to each of ``softened``
        (one forward pass per level: held-out images only, so the cost is bounded)."""
        centres = pixels
        if owners is not None:
            first = np.r_[True, owners[1:] != owners[:-1]] if len(owners) else np.zeros(0, bool)
            centres = pixels[torch.from_numpy(first)]
        vectors, positions = self.backbone_features(centres)
        forensic = self.forensic_features(pixels, softened, soften_rows, owners)
        copies = None
        if softened and embed_rows is not None and np.any(embed_rows):
            chosen = centres[torch.from_numpy(np.asarray(embed_rows, bool))]
            copies = np.concatenate([self.backbone_features(soften(chosen, how))[0] for how in softened], 1)
        return Features(np.concatenate([vectors, forensic], axis=1), positions, copies)
