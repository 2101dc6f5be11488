"""Files of tensors and metadata that cannot be damaged silently: safetensors tensors, one JSON
object under a metadata key, and a sha256 over both (never a pickle). Anchors and heads use it,
each under its own key, so neither reader takes the other's file."""

from __future__ import annotations

import datetime
import hashlib
import json
import struct
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import safetensors.numpy


def checksum(metadata: dict, tensors: dict[str, np.ndarray]) -> str:
    """sha256 of the metadata (without its checksum) and of every tensor's name, dtype, shape
    and bytes."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _software_version() -> str:
    try:
        return version("anchorscan")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return ""


def pack(tensors: dict[str, np.ndarray], metadata: dict, key: str, format_version: int) -> bytes:
    """The file's bytes: ``metadata`` after the header every anchorscan file starts with
    (format version, the software that wrote it, when), then the checksum."""
    metadata = {
        "format_version": format_version,
        "anchorscan_version": _software_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **metadata,
    }
    metadata["checksum"] = checksum(metadata, tensors)
    return safetensors.numpy.save(tensors, metadata={key: json.dumps(metadata)})


def read_metadata(data: bytes, key: str, version: int, what: str, error: type[Exception]) -> dict:
    """The JSON metadata alone, read from the header without touching the tensors."""
    try:
        (header_size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_size])
        metadata = json.loads(header["__metadata__"][key])
    except Exception as problem:  # any malformed header means the same thing to the user
        raise error(f"not an anchorscan {what} file (unreadable header: {problem})") from None
    if metadata.get("format_version") != version:
        raise error(
            f"{what} format version {metadata.get('format_version')!r} is not supported "
            f"(this anchorscan reads version {version}): fit it again with this anchorscan"
        )
    return metadata


def unpack(
    data: bytes, key: str, version: int, what: str, error: type[Exception]
) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors and metadata of a file whose checksum holds; refuses truncated, tampered or
    foreign files with ``error``."""
    metadata = read_metadata(data, key, version, what, error)
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as problem:
        raise error(f"{what} file is truncated or corrupted: {problem}") from None
    stored = metadata.pop("checksum", None)
    if stored != checksum(metadata, tensors):
        raise error(
            f"{what} checksum does not match its contents: the file was modified or "
            f"damaged; refit or restore it"
        )
    metadata["checksum"] = stored
    return tensors, metadata
