"""The anchor file: safetensors tensors plus JSON metadata, with a checksum over both.

Never pickled. Tensors: ``mean`` (d), ``m2`` (d x d) in float64 - the backbone part's sufficient
statistics, so anchors can be merged and updated - ``forensic.n`` (L), ``forensic.mean`` (L x p)
and ``forensic.m2`` (L x p x p), the forensic channel's per softness level, ``projection`` (the
seeded statistical projection, when used) and ``calibration.<component>`` quantile sketches. Metadata key ``anchorscan`` holds a JSON
object: format_version, the feature spec, the fit configuration, derived facts (shrinkage, k, ...)
and ``checksum``, the sha256 of the metadata without it and of every tensor's name, dtype, shape
and bytes. The whitening matrices are derived again on load, so they cannot disagree with the
statistics.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from anchorscan.anchors import checked_file
from anchorscan.anchors.anchor import COMPONENTS, Anchor, AnchorConfig
from anchorscan.anchors.errors import UserError
from anchorscan.anchors.forensic import ForensicModel
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.anchors.stats import Moments

FORMAT_VERSION = 2  # 2: the forensic channel
METADATA_KEY = "anchorscan"


class AnchorFileError(UserError, ValueError):
    """The file is not a readable anchorscan anchor."""


def anchor_id(metadata: dict) -> str:
    """The anchor's short name in score rows: the first 16 hex digits of its checksum."""
    return metadata["checksum"][:16]


def anchor_to_bytes(anchor: Anchor, projection: np.ndarray | None = None) -> bytes:
    tensors = {"mean": anchor.moments.mean, "m2": anchor.moments.m2,
               "forensic.n": np.array([level.n for level in anchor.forensic.moments], dtype=np.int64),
               "forensic.mean": np.stack([level.mean for level in anchor.forensic.moments]),
               "forensic.m2": np.stack([level.m2 for level in anchor.forensic.moments])}
    if projection is not None:
        tensors["projection"] = np.asarray(projection)
    for name in COMPONENTS:
        tensors[f"calibration.{name}"] = np.asarray(anchor.calibration[name], dtype=np.float64)
    metadata = {"config": dataclasses.asdict(anchor.config), **anchor.summary}
    return checked_file.pack(tensors, metadata, METADATA_KEY, FORMAT_VERSION)


def read_metadata(data: bytes) -> dict:
    """The JSON metadata alone, without reading the tensors (for `anchorscan info`)."""
    return checked_file.read_metadata(data, METADATA_KEY, FORMAT_VERSION, "anchor", AnchorFileError)


def verified_contents(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors and metadata of an anchor file whose checksum holds; refuses truncated,
    tampered or foreign files. Cheap: no linear algebra."""
    return checked_file.unpack(data, METADATA_KEY, FORMAT_VERSION, "anchor", AnchorFileError)


def anchor_from_bytes(data: bytes) -> tuple[Anchor, dict]:
    """Returns the anchor, with its scoring matrices derived, and its metadata."""
    tensors, metadata = verified_contents(data)
    spec = FeatureSpec.from_dict(metadata)
    moments = Moments.from_arrays(metadata["n"], tensors["mean"], tensors["m2"])
    forensic = ForensicModel(tuple(metadata["forensic_level_names"]), [
        Moments.from_arrays(n, mean, m2) for n, mean, m2 in zip(
            tensors["forensic.n"], tensors["forensic.mean"], tensors["forensic.m2"])])
    anchor = Anchor(spec, moments, forensic, AnchorConfig(**metadata["config"]),
                    {name: tensors[f"calibration.{name}"] for name in COMPONENTS},
                    metadata["n_calibration"])
    metadata["projection"] = tensors.get("projection")
    return anchor, metadata
