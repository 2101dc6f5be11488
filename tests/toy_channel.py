"""A toy channel, the whole of it: two of the forensic columns, their moments, a Mahalanobis
distance to real images' mean. Registering it is one line (``channels.REGISTRY.append(TOY)``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from anchorscan.anchors.channels import Channel
from anchorscan.anchors.stats import Moments


@dataclasses.dataclass
class ToyModel:
    mean: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, moments: Moments) -> ToyModel:
        return cls(moments.mean.copy(), np.linalg.inv(moments.covariance()))

    def distances(self, features: np.ndarray) -> dict[str, np.ndarray]:
        centred = features - self.mean
        return {"toy": np.einsum("ij,jk,ik->i", centred, self.precision, centred)}


TOY = Channel(
    "toy",
    lambda spec: (spec.d_backbone, spec.d_backbone + 2),
    components=("toy",),
    scored=("toy",),
    p_meanings=("upper-tail p-value of `toy`",),
    score_columns=(("toy", "float64", "Mahalanobis distance of two forensic columns"),),
    fit=ToyModel.fit,
)
