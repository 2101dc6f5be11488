"""The forensic channel's one-class model (docs/METHOD.md §8.3): one Gaussian of the pixel
features per softness level of real photos, and the tiles of a large image the features pool
over (§8.1). The features themselves come from the pixels (``anchors/models/forensic.py``);
this module is the maths on them."""

from __future__ import annotations

import numpy as np

from anchorscan.anchors.errors import NotEnoughImagesError
from anchorscan.anchors.stats import Moments

# A large image is judged on up to this many native-resolution tiles besides the centre crop.
EXTRA_TILES = 4
# The tile rule below, as the feature spec names it: features pooled otherwise are other features.
TILING = "centre+up_to_4:quarter_points,within_1_crop,mod4"
# The spreads pool energies per pixel-position class mod 4: tiles keep the centre crop's class.
_CLASS_PERIOD = 4


def extra_tiles(width: int, height: int, size: int) -> list[tuple[int, int]]:
    """(left, top) of the tiles the forensic channel reads besides the centre crop of ``size``:
    along each side at least two crops long, the crops centred on its quarter and
    three-quarter points, drawn in to at most one crop from the centre crop (else the centre
    crop's span); every combination but the centre crop's own, each moved by up to 3 px to the
    centre crop's offset class mod 4. At most EXTRA_TILES, none for an image under two crops
    on both sides, and all within the 3 x 3 crops around the centre one, so that decoding them
    costs the same on a 12 MP photo as on a 1 MP one."""

    def starts(side: int) -> list[int]:
        centre = (side - size) // 2
        if side < 2 * size:
            return [centre]
        quarters = (max(side // 4 - size // 2, centre - size), min(3 * side // 4 - size // 2, centre + size))
        aligned = [start + (centre - start) % _CLASS_PERIOD for start in quarters]
        return [start if start <= side - size else start - _CLASS_PERIOD for start in aligned]

    centre = ((width - size) // 2, (height - size) // 2)
    return [(left, top) for top in starts(height) for left in starts(width) if (left, top) != centre]


class ForensicModel:
    """One Gaussian of the forensic features per softness level of real photos.

    distance = the smallest Mahalanobis distance over the levels, with the plain covariance:
    the direction that gives generated images away is a small-variance one, and shrinkage toward
    the identity would wash it out (a ridge of 1e-6 of the mean variance only guards against a
    singular matrix). level = where that minimum is: the softness that best explains the image."""

    RIDGE = 1e-6

    def __init__(self, level_names: tuple[str, ...], moments: list[Moments]):
        if len(level_names) != len(moments) or not moments:
            raise ValueError(f"{len(level_names)} level names for {len(moments)} Gaussians")
        if min(m.n for m in moments) < 2:
            raise NotEnoughImagesError(
                "the forensic channel needs at least 2 real images per softness level: add real images"
            )
        self.level_names, self.moments = tuple(level_names), moments
        self._whitening = []
        for level in moments:
            covariance = level.covariance()
            covariance = covariance + self.RIDGE * np.trace(covariance) / len(covariance) * np.eye(
                len(covariance)
            )
            # D = ||L^-1 (x - mu)||^2 with covariance = L L^T
            self._whitening.append(np.linalg.inv(np.linalg.cholesky(covariance)).T)

    @classmethod
    def from_levels(cls, level_names: tuple[str, ...], joint: Moments) -> ForensicModel:
        """From the moments of each image's features at every level side by side, (L * p)
        wide: level j's moments are the j-th diagonal block (its cross-level terms unused)."""
        width = joint.dim // len(level_names)
        return cls(
            level_names,
            [
                Moments.from_arrays(
                    joint.n,
                    joint.mean[j * width : (j + 1) * width],
                    joint.m2[j * width : (j + 1) * width, j * width : (j + 1) * width],
                )
                for j in range(len(level_names))
            ],
        )

    @property
    def dim(self) -> int:
        return self.moments[0].dim

    def distances(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distance, level index) for (b, dim) feature rows."""
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        per_level = np.stack(
            [
                (((features - level.mean) @ whitening) ** 2).sum(axis=1)
                for level, whitening in zip(self.moments, self._whitening)
            ],
            axis=1,
        )
        return per_level.min(axis=1), per_level.argmin(axis=1)
