"""Files of tensors and metadata that cannot be damaged silently: safetensors tensors, one JSON
object under a metadata key, and a sha256 over both (never a pickle). Anchors, heads and deltas
use it, each under its own key, so no reader takes another's file.

What the checksum proves: the bytes are the ones the writer wrote (no truncation, no bit flip,
no edit by a program that does not recompute it). What it does not prove: who wrote them - it is
unkeyed, so anyone can recompute it over numbers of their choosing. A delta may carry an
Ed25519 ``signature`` of its checksum (anchors/signing.py), kept outside the checksum it signs;
the loaders check the numbers themselves (anchors/validation.py)."""

from __future__ import annotations

import datetime
import hashlib
import json
import struct
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import safetensors.numpy

# Metadata fields outside the checksum: the checksum itself and the signature of it.
UNCHECKED = ("checksum", "signature")


def checksum(metadata: dict, tensors: dict[str, np.ndarray]) -> str:
    """sha256 of the metadata (without its checksum and signature) and of every tensor's name,
    dtype, shape and bytes."""
    covered = {key: value for key, value in metadata.items() if key not in UNCHECKED}
    digest = hashlib.sha256(json.dumps(covered, sort_keys=True).encode())
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


def pack(tensors: dict[str, np.ndarray], metadata: dict, key: str, format_version: int, sign=None) -> bytes:
    """The file's bytes: ``metadata`` after the header every anchorscan file starts with
    (format version, the software that wrote it, when), then the checksum; ``sign``, given,
    turns the checksum into the ``signature`` stored beside it."""
    metadata = {
        "format_version": format_version,
        "anchorscan_version": _software_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **metadata,
    }
    metadata["checksum"] = checksum(metadata, tensors)
    if sign is not None:
        metadata["signature"] = sign(metadata["checksum"])
    return safetensors.numpy.save(tensors, metadata={key: json.dumps(metadata)})


def named(what: str, source: str | None) -> str:
    """How messages name the file: 'anchor' or 'anchor gs://b/a.safetensors'."""
    return f"{what} {source}" if source else what


def read_metadata(
    data: bytes,
    key: str,
    version: int | tuple[int, ...],
    what: str,
    error: type[Exception],
    source: str | None = None,
) -> dict:
    """The JSON metadata alone, read from the header without touching the tensors; ``version``
    is the format version, or the versions, this reader takes."""
    try:
        (header_size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_size])
        metadata = json.loads(header["__metadata__"][key])
        if not isinstance(metadata, dict):
            raise ValueError("the metadata is not a JSON object")
    except Exception as problem:  # any malformed header means the same thing to the user
        raise error(
            f"{named(what, source)}: not an anchorscan {what} file (unreadable header: {problem})"
        ) from None
    versions = version if isinstance(version, tuple) else (version,)
    if metadata.get("format_version") not in versions:
        raise error(
            f"{named(what, source)}: format version {metadata.get('format_version')!r} is not supported "
            f"(this anchorscan reads version {' or '.join(map(str, versions))}): make it again with this "
            "anchorscan"
        )
    return metadata


def unpack(
    data: bytes,
    key: str,
    version: int | tuple[int, ...],
    what: str,
    error: type[Exception],
    source: str | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors and metadata of a file whose checksum holds; refuses truncated, tampered or
    foreign files with ``error``."""
    metadata = read_metadata(data, key, version, what, error, source)
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as problem:
        raise error(f"{named(what, source)}: the file is truncated or corrupted: {problem}") from None
    if metadata.get("checksum") != checksum(metadata, tensors):
        raise error(
            f"{named(what, source)}: the checksum does not match its contents: the file was modified "
            "or damaged; make it again or restore it"
        )
    return tensors, metadata
