"""The anchor file: safetensors tensors plus JSON metadata, with a checksum over both.

Never pickled. Tensors: ``mean`` (d), ``m2`` (d x d) in float64 - the sufficient statistics, so
anchors can be merged and updated - ``projection`` (the seeded statistical projection, when
used) and ``calibration.<component>`` quantile sketches. Metadata key ``anchorscan`` holds a JSON
object: format_version, the feature spec, the fit configuration, derived facts (shrinkage, k, ...)
and ``checksum``, the sha256 of the metadata without it and of every tensor's name, dtype, shape
and bytes. The whitening matrices are derived again on load, so they cannot disagree with the
statistics.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import struct

import numpy as np
import safetensors.numpy

from anchors.anchor import COMPONENTS, Anchor, AnchorConfig
from anchors.spec import FeatureSpec
from anchors.stats import Moments

FORMAT_VERSION = 1
METADATA_KEY = "anchorscan"


class AnchorFileError(ValueError):
    """The file is not a readable anchorscan anchor."""


def _checksum(metadata: dict, tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def anchor_to_bytes(anchor: Anchor, projection: np.ndarray | None = None,
                    version: str = "") -> bytes:
    tensors = {"mean": anchor.moments.mean, "m2": anchor.moments.m2}
    if projection is not None:
        tensors["projection"] = np.asarray(projection)
    for name in COMPONENTS:
        tensors[f"calibration.{name}"] = np.asarray(anchor.calibration[name], dtype=np.float64)
    metadata = {
        "format_version": FORMAT_VERSION,
        "anchorscan_version": version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(anchor.config),
        **anchor.summary,
    }
    metadata["checksum"] = _checksum(metadata, tensors)
    return safetensors.numpy.save(tensors, metadata={METADATA_KEY: json.dumps(metadata)})


def read_metadata(data: bytes) -> dict:
    """The JSON metadata alone, without reading the tensors (for `anchorscan info`)."""
    try:
        (header_size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_size])
        metadata = json.loads(header["__metadata__"][METADATA_KEY])
    except Exception as error:  # any malformed header means the same thing to the user
        raise AnchorFileError(f"not an anchorscan anchor file (unreadable header: {error})") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise AnchorFileError(
            f"anchor format version {metadata.get('format_version')!r} is not supported "
            f"(this anchorscan reads version {FORMAT_VERSION})")
    return metadata


def verified_contents(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors and metadata of an anchor file whose checksum holds; refuses truncated,
    tampered or foreign files. Cheap: no linear algebra."""
    metadata = read_metadata(data)
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as error:
        raise AnchorFileError(f"anchor file is truncated or corrupted: {error}") from None
    stored = metadata.pop("checksum", None)
    if stored != _checksum(metadata, tensors):
        raise AnchorFileError("anchor checksum does not match its contents: the file was "
                              "modified or damaged; refit or restore it")
    metadata["checksum"] = stored
    return tensors, metadata


def anchor_from_bytes(data: bytes) -> tuple[Anchor, dict]:
    """Returns the anchor, with its scoring matrices derived, and its metadata."""
    tensors, metadata = verified_contents(data)
    spec = FeatureSpec.from_dict(metadata)
    moments = Moments.from_arrays(metadata["n"], tensors["mean"], tensors["m2"])
    anchor = Anchor(spec, moments, AnchorConfig(**metadata["config"]),
                    {name: tensors[f"calibration.{name}"] for name in COMPONENTS},
                    metadata["n_calibration"])
    metadata["projection"] = tensors.get("projection")
    return anchor, metadata
