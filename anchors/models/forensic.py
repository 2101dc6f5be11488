"""The forensic channel (docs/METHOD.md §8): pixels that are "too predictable", measured without
the backbone.

An upsampler or a generator's last stage leaves fine-scale pixels that linear predictors of
their neighbourhood, or of the coarser scale, predict better than a camera's, and resampling
leaves a grid that a camera does not have. Per image, ten numbers:

- profile (6): log mean squared residual of frozen linear predictors: of each pixel of the luma
  S0 and of its 2x2 and 4x4 box means S1, S2 from its 7x7 neighbours (e0, e1, e2), and of each
  fine sample from the 4x4 coarser ones, per sampling phase (x01, x12, x02);
- offset spreads (4): the residual energy of e0, e1, e2 per pixel-position class (mod 2, mod 4),
  as max - min of its log over the classes. A camera has no sampling grid (equal energies up to
  noise); an x2 or x4 upsampler makes them depend on the offset; a blur does not.

Every predictor runs at every pixel (no decimation), so shifting the crop only permutes the
offset classes: the features do not depend on where the crop falls on an upsampler's grid.
Every residual is a fixed linear filter of S0, so each profile energy is one dot product with
the image's power spectrum (Parseval): one FFT per image, three inverse FFTs for the spreads.

The predictors are frozen, like the backbone's weights: fitted once in closed form from the
mergeable ``GramAccumulator`` over real photos that are not evaluation photos, shipped as
``forensic_predictor.safetensors``, and named by digest in the feature spec, so anchors fitted
with the same predictor merge. Soft real photos (focus blur, upscaled thumbnails) are also
"too predictable": the one-class model is a mixture along the softness path of real photos
(``ForensicModel``: one Gaussian per level, the distance the smallest over levels), and the
level that explains an image best is written out, so a curator can tell soft from generated.
"""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LUMA = (0.299, 0.587, 0.114)
MAX_LAG = 27  # the widest predictor (S2 from 7 taps 4 px apart, 4x4 boxes) spans 28 px
TAPER = 8  # px of cosine taper at the crop's border: no jump for the FFT to see
PREDICTORS = ("e0", "e1", "e2", "x01", "x12", "x02")
FEATURE_NAMES = tuple(f"log_{name}" for name in PREDICTORS) + (
    "spread_e0_mod2",
    "spread_e0_mod4",
    "spread_e1_mod2",
    "spread_e2_mod4",
)
EPS = 1e-6
# Crops whose FFTs run at once: a large image's tiles multiply a batch, and the residual maps of
# more crops than this leave the caches (measured: 2.5 times the time per crop at 60 crops).
CHUNK = 8
PREDICTOR_FILE = Path(__file__).with_name("forensic_predictor.safetensors")
_FRAME = MAX_LAG + 1  # every element kernel lives in a frame of this many pixels


# --- the predictors as kernels on S0 -----------------------------------------------------------


def _box(scale: int, top: int, left: int) -> np.ndarray:
    """The S_scale sample whose 2^s x 2^s block starts at (top, left), as a kernel on S0."""
    kernel = np.zeros((_FRAME, _FRAME))
    side = 2**scale
    kernel[top : top + side, left : left + side] = 1.0 / (side * side)
    return kernel


@functools.cache
def predictor_elements() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per predictor: (neighbour kernels (q, F, F), target kernels (phases, F, F)) on S0.

    Intra e_s: the S_s sample at (3d, 3d) from the 48 others of its 7x7 grid of spacing
    d = 2^s. Cross (coarse c, fine f): the fine samples of each phase of the coarse block at
    (2^c, 2^c) from the 4x4 coarse samples around it."""
    elements = {}
    for scale in range(3):
        d = 2**scale
        neighbours = [
            _box(scale, 3 * d + d * a, 3 * d + d * b)
            for a in range(-3, 4)
            for b in range(-3, 4)
            if (a, b) != (0, 0)
        ]
        elements[f"e{scale}"] = (np.stack(neighbours), _box(scale, 3 * d, 3 * d)[None])
    for name, coarse, fine in (("x01", 1, 0), ("x12", 2, 1), ("x02", 2, 0)):
        step, fine_step, phases = 2**coarse, 2**fine, 2 ** (coarse - fine)
        neighbours = [_box(coarse, step * a, step * b) for a in range(4) for b in range(4)]
        targets = [
            _box(fine, step + fine_step * i, step + fine_step * j)
            for i in range(phases)
            for j in range(phases)
        ]
        elements[name] = (np.stack(neighbours), np.stack(targets))
    return elements


def residual_kernels(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per predictor, its residual (target - prediction) as kernels (phases, F, F) on S0."""
    kernels = {}
    for name, (neighbours, targets) in predictor_elements().items():
        kernels[name] = targets - np.einsum("pq,qyx->pyx", np.asarray(weights[name], np.float64), neighbours)
    return kernels


# --- fitting the predictors --------------------------------------------------------------------


def luma(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 luma (B, H, W), each image's mean removed. A matrix-vector
    product over the channels: 5x faster than a product summed over the last axis, same bits
    here (docs/BENCHMARKS.md)."""
    y = pixels.float() @ torch.tensor(LUMA)
    return y - y.mean(dim=(1, 2), keepdim=True)


def taper_window(height: int, width: int) -> torch.Tensor:
    def ramp(n: int) -> torch.Tensor:
        window = torch.ones(n)
        edge = 0.5 - 0.5 * torch.cos(torch.pi * (torch.arange(TAPER) + 0.5) / TAPER)
        window[:TAPER], window[n - TAPER :] = edge, edge.flip(0)
        return window

    return ramp(height)[:, None] * ramp(width)[None, :]


def _fft_size(height: int, width: int) -> int:
    """A power of two with room for MAX_LAG of zero padding (a linear, not circular,
    correlation), and 0 mod 4 so that circular indices keep their offset class."""
    return 1 << math.ceil(math.log2(max(height, width) + MAX_LAG + 1))


def autocorrelation(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> the windowed luma's autocorrelation per pixel at lags up to
    MAX_LAG, (B, 2L+1, 2L+1)."""
    y = luma(pixels)
    window = taper_window(*y.shape[-2:])
    size = _fft_size(*y.shape[-2:])
    spectrum = torch.fft.rfft2(y * window, s=(size, size))
    correlation = torch.fft.irfft2(spectrum.real**2 + spectrum.imag**2, s=(size, size))
    correlation = torch.roll(correlation, shifts=(MAX_LAG, MAX_LAG), dims=(-2, -1))
    return correlation[..., : 2 * MAX_LAG + 1, : 2 * MAX_LAG + 1] / (window * window).sum()


def _toeplitz_index() -> np.ndarray:
    """Index into the lag grid with T[i, j] = R(position_j - position_i) over frame positions."""
    rows, columns = np.divmod(np.arange(_FRAME * _FRAME), _FRAME)
    dy = rows[None, :] - rows[:, None] + MAX_LAG
    dx = columns[None, :] - columns[:, None] + MAX_LAG
    return dy * (2 * MAX_LAG + 1) + dx


class GramAccumulator:
    """n real images and the sum of their luma autocorrelations (float64). Every predictor's
    Gram matrix over all pixels is ``K T K^T`` (K its element kernels, T built from the mean
    autocorrelation), so this is the sufficient statistic of all predictors at once, and it
    merges by addition."""

    def __init__(self):
        self.n = 0
        self.sum = np.zeros((2 * MAX_LAG + 1,) * 2)

    def add(self, pixels: torch.Tensor) -> GramAccumulator:
        with torch.inference_mode():
            self.sum += autocorrelation(pixels).double().sum(0).numpy()
        self.n += len(pixels)
        return self

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        self.n += other.n
        self.sum += other.sum
        return self

    def solve(self, ridge: float = 1e-4) -> dict[str, np.ndarray]:
        """Least-squares weights (phases, q) of every predictor, with a small ridge relative to
        the neighbours' mean energy."""
        if not self.n:
            raise ValueError("the predictors need at least one real image")
        toeplitz = (self.sum / self.n).ravel()[_toeplitz_index()]
        weights = {}
        for name, (neighbours, targets) in predictor_elements().items():
            q = len(neighbours)
            kernels = np.concatenate([neighbours, targets]).reshape(q + len(targets), -1)
            gram = kernels @ toeplitz @ kernels.T
            g_xx, g_xy = gram[:q, :q], gram[:q, q:]
            weights[name] = np.ascontiguousarray(
                np.linalg.solve(g_xx + ridge * np.trace(g_xx) / q * np.eye(q), g_xy).T, dtype=np.float32
            )
        return weights


def predictor_digest(weights: dict[str, np.ndarray]) -> str:
    return hashlib.sha256(
        b"".join(np.ascontiguousarray(weights[name]).tobytes() for name in PREDICTORS)
    ).hexdigest()


def save_predictor(weights: dict[str, np.ndarray], path, description: str) -> None:
    import safetensors.numpy

    safetensors.numpy.save_file(
        {name: np.ascontiguousarray(weights[name]) for name in PREDICTORS},
        str(path),
        metadata={"description": description, "sha256": predictor_digest(weights)},
    )


@functools.cache
def shipped_predictor() -> dict[str, np.ndarray]:
    import safetensors.numpy

    return safetensors.numpy.load_file(str(PREDICTOR_FILE))


# --- features ----------------------------------------------------------------------------------


def _kernel_power_weights(kernels: np.ndarray, size: int) -> torch.Tensor:
    """Phase-averaged |K(w)|^2 on rfft2's half spectrum, counted twice where the half stands for
    two bins, over size^2: the residual's mean energy is one dot product with |X(w)|^2."""
    power = torch.fft.rfft2(torch.tensor(kernels, dtype=torch.float32), s=(size, size)).abs() ** 2
    multiplicity = torch.full((size // 2 + 1,), 2.0)
    multiplicity[0] = multiplicity[-1] = 1.0
    return (power.mean(0) * multiplicity / size**2).flatten()


class ResidualFeatures(nn.Module):
    """uint8 crops (B, H, W, 3) -> (B, 10) float32 forensic features (``FEATURE_NAMES``)."""

    def __init__(self, weights: dict[str, np.ndarray] | None = None):
        super().__init__()
        weights = shipped_predictor() if weights is None else weights
        self.digest = predictor_digest(weights)
        self._kernels = residual_kernels(weights)
        self._spectral: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _spectra(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conjugate spectra of the intra residual kernels, the profile's power weights)."""
        if size not in self._spectral:
            intra = torch.tensor(np.stack([self._kernels[f"e{s}"][0] for s in range(3)]), dtype=torch.float32)
            self._spectral[size] = (
                torch.conj(torch.fft.rfft2(intra, s=(size, size))),
                torch.stack(
                    [_kernel_power_weights(self._kernels[name], size) for name in PREDICTORS], 1
                ).double(),
            )
        return self._spectral[size]

    def forward(self, pixels: torch.Tensor, owners: torch.Tensor | None = None) -> torch.Tensor:
        """The features of each crop; with ``owners`` (the image of each crop, 0 ... n - 1), of
        each image, pooled over its crops (its tiles, docs/METHOD.md §8.1): the residual energies
        are means over each crop's pixels, and the crops are the same size, so their mean is the
        energy over all of them, exactly; the logs are taken after."""
        parts = [self._energies(pixels[start : start + CHUNK]) for start in range(0, len(pixels), CHUNK)]
        profile, classes = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
        if owners is not None:
            profile, classes = _mean_by_owner(profile, owners), _mean_by_owner(classes, owners)
        return torch.cat([torch.log(profile + EPS).float(), self._spreads(classes)], 1)

    def _energies(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the profile's mean residual energies (B, 6) float64, the energy of e0, e1, e2 per
        pixel-position class mod 4 (B, 3, 16))."""
        y = luma(pixels)
        window = taper_window(*y.shape[-2:])
        size = _fft_size(*y.shape[-2:])
        spectrum = torch.fft.rfft2(y * window, s=(size, size))
        intra, power_weights = self._spectra(size)
        power = (spectrum.real**2 + spectrum.imag**2).flatten(1)
        # Summed in float64: a float32 sum of ~10^5 terms depends on how BLAS blocks the batch
        # (2.6e-5 apart between batches of 1 and 7); in float64 an image's features do not.
        energy = (power.double() @ power_weights) / float((window * window).sum())
        residuals = torch.fft.irfft2(spectrum[:, None] * intra, s=(size, size)) ** 2  # (B, 3, n, n)
        batch = residuals.shape[0]
        # energy per offset class mod 4 in both directions
        mod4 = residuals.view(batch, 3, size // 4, 4, size).sum(2).view(batch, 3, 4, size // 4, 4).sum(3)
        return energy, mod4.flatten(2)

    @staticmethod
    def _spreads(mod4: torch.Tensor) -> torch.Tensor:
        """max - min of the log class energies (B, 3, 16 classes (i mod 4, j mod 4)): e0's mod 2
        and mod 4, e1's mod 2, e2's mod 4."""
        batch = mod4.shape[0]
        mod2 = mod4.view(batch, 3, 2, 2, 2, 2).sum((2, 4)).flatten(2)

        def spread(classes: torch.Tensor) -> torch.Tensor:
            logs = torch.log(classes + EPS)
            return logs.max(-1).values - logs.min(-1).values

        return torch.stack(
            [spread(mod2[:, 0]), spread(mod4[:, 0]), spread(mod2[:, 1]), spread(mod4[:, 2])], 1
        )


def _mean_by_owner(values: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
    """The mean of the rows of ``values`` that each owner 0 ... n - 1 has."""
    count = int(owners.max()) + 1 if len(owners) else 0
    sums = torch.zeros(count, *values.shape[1:], dtype=values.dtype).index_add_(0, owners, values)
    rows = torch.bincount(owners, minlength=count).to(values.dtype)
    return sums / rows.view(-1, *[1] * (values.dim() - 1))


# --- softened copies of real photos (fit time) -------------------------------------------------


@functools.lru_cache(maxsize=32)
def _blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """The (size, size) matrix of a 1-d Gaussian blur reflected at the borders (the border
    sample not repeated): a blur along one axis is one matrix product."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    matrix = np.zeros((size, size))
    for row in range(size):
        for offset, weight in zip(range(-radius, radius + 1), taps):
            column = abs(row + offset)
            if column >= size:
                column = 2 * (size - 1) - column
            matrix[row, column] += weight
    return torch.tensor(matrix, dtype=torch.float32)


def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of uint8 (B, H, W, 3), reflected at the borders, back to uint8.
    Two matrix products: five times faster than a one-channel convolution on CPUs
    (benchmarks/fit_speed.py), and the same pixels but for rounding ties."""
    height, width = pixels.shape[1:3]
    x = pixels.permute(0, 3, 1, 2).float()
    x = _blur_matrix(height, sigma) @ x @ _blur_matrix(width, sigma).T
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def upscaled_thumbnail(pixels: torch.Tensor, scale: float) -> torch.Tensor:
    """Area downscale by ``scale``, bicubic back to the input size (uint8 in and out)."""
    height, width = pixels.shape[1:3]
    x = pixels.permute(0, 3, 1, 2).float()
    small = F.interpolate(x, size=(round(height * scale), round(width * scale)), mode="area")
    up = F.interpolate(small.round().clamp(0, 255), size=(height, width), mode="bicubic", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def soften(pixels: torch.Tensor, how) -> torch.Tensor:
    """One level's copy of real crops; ``how`` as in SOFTNESS_PATH (None: the crops)."""
    if how is None:
        return pixels
    kind, value = how
    return gaussian_blur(pixels, value) if kind == "blur" else upscaled_thumbnail(pixels, value)


# --- the one-class model -----------------------------------------------------------------------
