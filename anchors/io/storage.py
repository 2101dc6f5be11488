"""Whole files in and out - anchors, heads, deltas, manifests, weights, reports - local, gs://
or http(s)://, without Beam: `info`, `merge` and `export-delta` read and write through here
without starting it, and pipelines use the same functions on their workers. Listing many files
is the pipelines' business (``transforms/listing.py``, through Beam's file systems)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import tempfile
import uuid

from anchorscan.anchors.errors import MissingFileError, UnreadableFileError, UnwritableOutputError
from anchorscan.anchors.io import gcs
from anchorscan.anchors.io.fetch import fetch, is_http
from anchorscan.anchors.io.uris import is_remote, local_file

# Files read whole from web servers (manifests, thumbnails): a cap against endless responses.
MAX_HTTP_FILE_BYTES = 2**30


def read_bytes(uri: str) -> bytes:
    """The whole file. A file that cannot be read is the user's to fix (a wrong path, a missing
    permission), so the error says which file and why."""
    if is_http(uri):  # a manifest or a report's thumbnail on a web server
        return fetch(uri, MAX_HTTP_FILE_BYTES)
    if gcs.is_gcs(uri):
        with gcs.storage_errors(uri):
            return gcs.blob(uri).download_as_bytes(timeout=gcs.TRANSFER_TIMEOUT)
    if is_remote(uri):
        raise UnreadableFileError(f"{uri}: only local paths, gs:// and http(s):// URIs can be read")
    path = local_file(uri)
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise MissingFileError(f"{uri}: file not found") from None
    except IsADirectoryError:
        raise UnreadableFileError(f"{uri}: is a folder, not a file") from None
    except OSError as error:
        raise UnreadableFileError(f"cannot read {uri}: {error.strerror or error}") from None


def local_copy(uri: str) -> str:
    """A local path with the contents of ``uri`` (copied once per process for remote files)."""
    if not is_remote(uri):
        return local_file(uri)
    if not gcs.is_gcs(uri):
        raise UnreadableFileError(f"{uri}: copy it to a local path or gs:// first")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = os.path.join(tempfile.gettempdir(), f"anchorscan-{digest}-{posixpath.basename(uri)}")
    if not os.path.exists(target):
        partial = f"{target}.{uuid.uuid4().hex}"
        try:
            with gcs.storage_errors(uri):
                gcs.blob(uri).download_to_filename(partial, timeout=gcs.TRANSFER_TIMEOUT)
            os.replace(partial, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
    return target


def write_atomically(uri: str, data: bytes) -> None:
    """Readers never see half a file: locally a temporary file beside ``uri`` renamed over it
    (removed again if anything fails), on Cloud Storage one upload (objects appear whole)."""
    if gcs.is_gcs(uri):
        with gcs.storage_errors(uri):
            gcs.blob(uri).upload_from_string(data, timeout=gcs.TRANSFER_TIMEOUT)
        return
    if is_remote(uri):
        raise UnwritableOutputError(f"{uri}: outputs are local paths or gs:// URIs")
    path = local_file(uri)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def check_writable(uri: str, flag: str) -> None:
    """Fails now, not after the work, where a local output cannot be written (a file where a
    folder should be, no permission): writes and deletes an empty file beside it. Object stores
    are left to their first write."""
    if is_remote(uri):
        return
    path = local_file(uri)
    folder = os.path.dirname(os.path.abspath(path))
    probe = os.path.join(folder, f".anchorscan-probe-{uuid.uuid4().hex}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except FileExistsError:  # makedirs: a file stands where the folder should be
        raise UnwritableOutputError(
            f"cannot write {flag} {uri}: {folder} or a folder above it is a file, not a folder"
        ) from None
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        raise UnwritableOutputError(f"cannot write {flag} {uri}: {error.strerror or error}{where}") from None
