"""Whole files in and out - anchors, heads, deltas, manifests, weights, reports - local, gs://
or http(s)://, without Beam: `info`, `merge` and `export-delta` read and write through here
without starting it, and pipelines use the same functions on their workers. Listing many files
is the pipelines' business (``transforms/listing.py``, through Beam's file systems)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from typing import BinaryIO

from anchorscan.anchors.errors import (
    ENVIRONMENT_ERRNOS,
    EnvironmentFailure,
    MissingFileError,
    UnreadableFileError,
    UnwritableOutputError,
    environment_failure,
)
from anchorscan.anchors.io import gcs
from anchorscan.anchors.io.fetch import fetch
from anchorscan.anchors.io.uris import Location

# Files read whole from web servers (manifests, thumbnails): a cap against endless responses.
MAX_HTTP_FILE_BYTES = 2**30
# Anchors, heads and deltas are read whole into memory: a cap against a file made to exhaust it.
# An anchor of d features holds about 16 d^2 bytes (two float64 d x d matrices counting the
# calibration rows): 2 GiB allows d of 11,000, five times the default backbone's 2,058.
MAX_CHECKED_FILE_BYTES = 2 * 2**30


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole file, refused over ``max_bytes`` before it is read. A file that cannot be read
    is the user's to fix (a wrong path, a missing permission), so the error says which file and
    why."""
    location = Location.parse(uri)
    if location.is_http:  # a manifest or a report's thumbnail on a web server
        return fetch(uri, max_bytes or MAX_HTTP_FILE_BYTES)
    if location.is_gcs:
        with gcs.storage_errors(uri):
            if max_bytes is not None:
                found = gcs.existing_blob(uri)
                if found is not None:
                    _within(uri, found.size or 0, max_bytes)
            return gcs.blob(uri).download_as_bytes(timeout=gcs.TRANSFER_TIMEOUT)
    if location.is_remote:
        raise UnreadableFileError(f"{uri}: only local paths, gs:// and http(s):// URIs can be read")
    path = location.local_file()
    try:
        with open(path, "rb") as handle:
            if max_bytes is not None:
                _within(uri, os.fstat(handle.fileno()).st_size, max_bytes)
            return handle.read()
    except FileNotFoundError:
        raise MissingFileError(f"{uri}: file not found") from None
    except IsADirectoryError:
        raise UnreadableFileError(f"{uri}: is a folder, not a file") from None
    except OSError as error:
        raise UnreadableFileError(f"cannot read {uri}: {error.strerror or error}") from None


def _within(uri: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise UnreadableFileError(
            f"{uri}: {size:,} bytes, more than an anchor, head or delta file may hold "
            f"({max_bytes:,}): not one of ours, or not from a backbone this anchorscan runs"
        )


def read_checked_file(uri: str) -> bytes:
    """An anchor, head or delta file's bytes, capped at MAX_CHECKED_FILE_BYTES."""
    return read_bytes(uri, MAX_CHECKED_FILE_BYTES)


def local_copy(uri: str) -> str:
    """A local path with the contents of ``uri`` (copied once per process for remote files)."""
    location = Location.parse(uri)
    if not location.is_remote:
        return location.local_file()
    if not location.is_gcs:
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


def write_atomically(uri: str, data: bytes | BinaryIO, mode: int = 0o666) -> None:
    """Readers never see half a file: locally a temporary file beside ``uri`` (created with
    ``mode``, less the umask) renamed over it, removed again if anything fails; on Cloud Storage
    one upload (objects appear whole). ``data``: bytes, or a binary file copied from where it
    stands (an output too large to hold, spooled on local disk). A full disk, a read-only file
    system or a permission denied is an EnvironmentFailure that names ``uri``."""
    location = Location.parse(uri)
    if location.is_gcs:
        with gcs.storage_errors(uri):
            if isinstance(data, bytes):
                gcs.blob(uri).upload_from_string(data, timeout=gcs.TRANSFER_TIMEOUT)
            else:
                gcs.blob(uri).upload_from_file(data, timeout=gcs.TRANSFER_TIMEOUT)
        return
    if location.is_remote:
        raise UnwritableOutputError(f"{uri}: outputs are local paths or gs:// URIs")
    path = location.local_file()
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                shutil.copyfileobj(data, handle)
        os.replace(temporary, path)
    except OSError as error:
        failure = environment_failure(error, uri)
        if failure is None:
            raise
        raise failure from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


# A probe's size: a full disk accepts an empty file (a new inode), not a block of data.
PROBE_BYTES = 4096


def check_writable(uri: str, flag: str, size: int = 0) -> None:
    """Fails now, not after the work, where an output cannot be written: writes and deletes a
    probe beside it (locally a block of data, which a full disk refuses; on Cloud Storage a
    small object, which needs the permission to create and delete objects). ``size``: the
    output's expected bytes, refused where the local file system has less free space. A file
    where a folder should be is the user's (UnwritableOutputError, exit 2); a full disk, a
    read-only file system, no permission, storage out of reach are the environment's (exit 3)."""
    location = Location.parse(uri)
    if location.is_gcs:
        bucket_and_folder = uri.rsplit("/", 1)[0]
        probe = f"{bucket_and_folder}/.anchorscan-probe-{uuid.uuid4().hex}"
        with gcs.storage_errors(probe):
            gcs.blob(probe).upload_from_string(b"probe", timeout=gcs.TRANSFER_TIMEOUT)
            gcs.blob(probe).delete(timeout=gcs.TRANSFER_TIMEOUT)
        return
    if location.is_remote:
        raise UnwritableOutputError(f"{flag} {uri}: outputs are local paths or gs:// URIs")
    path = location.local_file()
    folder = os.path.dirname(os.path.abspath(path))
    probe = os.path.join(folder, f".anchorscan-probe-{uuid.uuid4().hex}")
    try:
        os.makedirs(folder, exist_ok=True)
        try:
            with open(probe, "wb") as handle:
                handle.write(b"\0" * PROBE_BYTES)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)
        if size:
            status = os.statvfs(folder)
            free = status.f_bavail * status.f_frsize
            if free < size:
                raise OSError(errno.ENOSPC, f"{size:,} bytes needed, {free:,} free", folder)
    except (FileExistsError, NotADirectoryError):  # a file stands where a folder should be
        raise UnwritableOutputError(
            f"cannot write {flag} {uri}: {_file_in_the_way(folder)} is a file, not a folder"
        ) from None
    except OSError as error:
        if error.errno in ENVIRONMENT_ERRNOS:
            detail = f" ({error.strerror})" if error.errno == errno.ENOSPC and size else ""
            raise EnvironmentFailure(
                f"cannot write {flag} {uri}{detail}: {ENVIRONMENT_ERRNOS[error.errno]}"
            ) from None
        where = f" ({error.filename})" if error.filename else ""
        raise UnwritableOutputError(f"cannot write {flag} {uri}: {error.strerror or error}{where}") from None


def _file_in_the_way(folder: str) -> str:
    """The nearest of ``folder`` and the folders above it that exists: the file in the way."""
    path = os.path.abspath(folder)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def files_in(folder: str, suffix: str) -> list[str]:
    """The files directly in a local folder or gs:// prefix whose names end with ``suffix``
    (a coordinator's key folder; a few files, listed without Beam)."""
    location = Location.parse(folder)
    if location.is_gcs:
        bucket, _ = gcs.bucket_and_prefix(folder)
        prefix = folder[len(f"gs://{bucket}/") :].rstrip("/") + "/" if "/" in folder[5:] else ""
        with gcs.storage_errors(folder):
            names = [blob.name for blob in gcs.client().list_blobs(bucket, prefix=prefix, delimiter="/")]
        return sorted(f"gs://{bucket}/{name}" for name in names if name.endswith(suffix))
    if location.is_remote:
        raise UnreadableFileError(f"{folder}: only local folders and gs:// prefixes can be listed")
    path = location.local_file()
    if not os.path.isdir(path):
        raise MissingFileError(f"{folder}: no such folder")
    return sorted(
        os.path.join(path, name)
        for name in os.listdir(path)
        if name.endswith(suffix) and os.path.isfile(os.path.join(path, name))
    )


def files_named(prefix: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files beside ``prefix`` (local or gs://) whose names are its last part followed by
    one of ``suffixes`` (regular expressions, matched whole): the exact names a command writes
    under an output prefix, never another file that merely begins the same way. A bare local
    prefix (``cur``) names files in the working folder, given back bare as well."""
    location = Location.parse(prefix)
    if location.is_gcs:
        folder, name = prefix.rsplit("/", 1)
        wanted = re.compile(re.escape(name) + f"(?:{'|'.join(suffixes)})")
        return [uri for uri in files_in(folder, "") if wanted.fullmatch(uri.rsplit("/", 1)[1])]
    if location.is_remote:
        raise UnreadableFileError(f"{prefix}: outputs are local paths or gs:// URIs")
    folder, name = os.path.split(location.local_file())
    wanted = re.compile(re.escape(name) + f"(?:{'|'.join(suffixes)})")
    try:
        names = os.listdir(folder or ".")
    except (FileNotFoundError, NotADirectoryError):  # nothing written there yet
        return []
    except OSError as error:
        raise UnreadableFileError(f"cannot list {folder or '.'}: {error.strerror or error}") from None
    paths = (os.path.join(folder, name) for name in names if wanted.fullmatch(name))
    return sorted(path for path in paths if os.path.isfile(path))


def resolved(uri: str) -> str:
    """Where ``uri`` leads: a local path made absolute with its links and ``..`` resolved,
    another URI without a trailing '/'."""
    location = Location.parse(uri)
    return uri.rstrip("/") if location.is_remote else os.path.realpath(location.local_file())
