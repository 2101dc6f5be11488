"""The anchor file: safetensors tensors plus JSON metadata, with a checksum over both.

Never pickled. Every sufficient statistic the anchor holds (``Anchor.statistics``: the backbone
part's, the forensic channel's per softness level, each flagged generator's) is stored the same
way, ``moments.<name>.mean`` and ``moments.<name>.m2`` in float64 with its count in the
metadata's ``moments``, so anchors can be merged and updated channel by channel without code per
channel. Beside them: ``projection`` (the seeded statistical projection, when used),
``calibration.<component>`` quantile sketches, and ``calibration.keys`` / ``calibration.features``,
the held-out real images' URI keys and feature rows the sketches were taken on. Metadata key
``anchorscan`` holds a JSON object: format_version, the feature spec, the fit configuration,
derived facts (shrinkage, k, ...), ``lineage`` and ``checksum``, the sha256 of the metadata
without it and of every tensor's name, dtype, shape and bytes. The whitening matrices are
derived again on load, so they cannot disagree with the statistics.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from anchorscan.anchors import checked_file
from anchorscan.anchors.anchor import Anchor, AnchorConfig
from anchorscan.anchors.calibration import CalibrationRows
from anchorscan.anchors.errors import UserError
from anchorscan.anchors.forensic import ForensicModel
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.anchors.stats import Moments

FORMAT_VERSION = 3  # 2: the forensic channel; 3: named statistics, flagged generators, calibration rows
METADATA_KEY = "anchorscan"


class AnchorFileError(UserError, ValueError):
    """The file is not a readable anchorscan anchor."""


def anchor_id(metadata: dict) -> str:
    """The anchor's short name in score rows: the first 16 hex digits of its checksum."""
    return metadata["checksum"][:16]


def statistics_tensors(statistics: dict[str, Moments]) -> tuple[dict[str, np.ndarray], dict]:
    """Named moments as tensors ``moments.<name>.mean|m2`` and their counts by name."""
    tensors: dict[str, np.ndarray] = {}
    for name, moments in statistics.items():
        tensors[f"moments.{name}.mean"], tensors[f"moments.{name}.m2"] = moments.mean, moments.m2
    return tensors, {name: moments.n for name, moments in statistics.items()}


def statistics_from_tensors(tensors: dict[str, np.ndarray], counts: dict) -> dict[str, Moments]:
    return {
        name: Moments.from_arrays(n, tensors[f"moments.{name}.mean"], tensors[f"moments.{name}.m2"])
        for name, n in counts.items()
    }


def statistics_id(statistics: dict[str, Moments]) -> str:
    """sha256 of the named statistics alone (not of calibration or configuration): what an
    update's lineage and a delta's base refer to."""
    tensors, counts = statistics_tensors(statistics)
    return checked_file.checksum({"moments": counts}, tensors)


def anchor_to_bytes(anchor: Anchor, projection: np.ndarray | None = None) -> bytes:
    statistics = anchor.statistics()
    tensors, counts = statistics_tensors(statistics)
    if projection is not None:
        tensors["projection"] = np.asarray(projection)
    for name in anchor.components:
        tensors[f"calibration.{name}"] = np.asarray(anchor.calibration[name], dtype=np.float64)
    if anchor.calibration_rows is not None:
        tensors["calibration.keys"] = anchor.calibration_rows.keys
        tensors["calibration.features"] = anchor.calibration_rows.features
    metadata = {
        "config": dataclasses.asdict(anchor.config),
        **anchor.summary,
        "moments": counts,
        "statistics_id": statistics_id(statistics),
        "lineage": list(anchor.lineage),
    }
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
    statistics = statistics_from_tensors(tensors, metadata["moments"])
    rows = (
        CalibrationRows(tensors["calibration.keys"], tensors["calibration.features"])
        if "calibration.keys" in tensors
        else None
    )
    levels = tuple(metadata["forensic_level_names"])
    forensic = ForensicModel(levels, [statistics[f"forensic.{level}"] for level in levels])
    flagged = {
        name[len("flag.") :]: moments for name, moments in statistics.items() if name.startswith("flag.")
    }
    anchor = Anchor(
        spec,
        statistics["backbone"],
        forensic,
        AnchorConfig.from_dict(metadata["config"]),
        {
            name[len("calibration.") :]: tensor
            for name, tensor in tensors.items()
            if name.startswith("calibration.") and name not in ("calibration.keys", "calibration.features")
        },
        metadata["n_calibration"],
        flagged,
        rows,
        tuple(metadata.get("lineage", ())),
    )
    metadata["projection"] = tensors.get("projection")
    return anchor, metadata
