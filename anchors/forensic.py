"""The forensic channel's one-class model (docs/METHOD.md §8.3): one Gaussian of the pixel
features per softness level of real photos. The features themselves come from the pixels
(``anchors/models/forensic.py``); this module is the maths on them."""

from __future__ import annotations

import numpy as np

from anchorscan.anchors.errors import NotEnoughImagesError
from anchorscan.anchors.stats import Moments


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
