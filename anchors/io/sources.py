"""Byte sources: where the bytes of a listed input come from. The read step of every pipeline
(``transforms/read.py``) hands each listed ``Unit`` to the first of ``registered_sources()`` that
claims its URI and passes on the ``Record``s it yields: one per image, with its URI, its bytes
and the columns that travel with it to the score row. Decoding never knows where bytes came
from. A new kind of input (a tar shard, a Parquet column of bytes, an object store) is one
``ByteSource`` subclass and one line in ``registered_sources``."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import errno
import os
import stat
import threading
from collections.abc import Iterator

from anchorscan.anchors.errors import MissingFileError, exception_name
from anchorscan.anchors.io import gcs
from anchorscan.anchors.io.fetch import FetchError, HttpConfig, fetch
from anchorscan.anchors.io.uris import Location, is_image_path

DEFAULT_MAX_BYTES = 256 * 2**20
DEFAULT_READ_TIMEOUT = 60.0
# A tar shard's read goes through at most this many bytes (decompressed, for a .tar.gz):
# img2dataset writes shards of tens of MB to a few GB; a gzip'd bomb of zeros stops here.
DEFAULT_MAX_SHARD_BYTES = 16 * 2**30
# A member that is not read (over --max_bytes, a link, a refused sample's) is still read past in
# the stream: past this many bytes the rest of its shard is not read.
DEFAULT_MAX_SKIP_BYTES = 2**30


@dataclasses.dataclass(frozen=True)
class Unit:
    """One listed input to read: a file, or a container of many images. ``order`` (input
    index, row) decides which listing of a URI named twice wins; ``carried``: the manifest's
    other columns for this URI."""

    uri: str
    order: tuple[int, int] = (0, 0)
    carried: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Record:
    """One image's bytes as read, with the columns that travel with it to its score row."""

    uri: str
    data: bytes
    carried: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ReadFailure:
    """An input inside a unit that could not be read (the unit itself goes on)."""

    uri: str
    message: str
    error_type: str = "ReadError"


@dataclasses.dataclass(frozen=True)
class ReadLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    read_timeout: float = DEFAULT_READ_TIMEOUT
    http: HttpConfig = HttpConfig()
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    max_skip_bytes: int = DEFAULT_MAX_SKIP_BYTES


class ReadError(OSError):
    """The input could not be read; the message says why in words, ``error_type`` names the
    exception behind it (or this class, where a check refused the input)."""

    def __init__(self, message: str, error_type: str = "ReadError"):
        super().__init__(message)
        self.error_type = error_type


# The stop signal of the read running on this thread (see ``stopped_by``).
_STOP = threading.local()


@contextlib.contextmanager
def stopped_by(stop: threading.Event):
    """Reads on this thread that go through ``raise_if_stopped`` end once ``stop`` is set: the
    read step sets it when a read outlives its timeout, so that a read that is working (a shard
    decompressing) ends rather than running on unseen."""
    _STOP.event = stop
    try:
        yield
    finally:
        _STOP.event = None


def raise_if_stopped() -> None:
    stop = getattr(_STOP, "event", None)
    if stop is not None and stop.is_set():
        raise ReadError("the read was stopped past --read_timeout", "TimeoutError")


class ByteSource(abc.ABC):
    """A kind of input. ``lists``: which files a folder's walk hands to this source;
    ``claims``: which listed URIs it reads; ``read``: a unit's records and failures."""

    name: str

    @abc.abstractmethod
    def lists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def claims(self, uri: str) -> bool: ...

    @abc.abstractmethod
    def read(self, unit: Unit, limits: ReadLimits) -> Iterator[Record | ReadFailure]:
        """Raises ReadError where the unit as a whole cannot be read (its row names the unit)."""


class FileSource(ByteSource):
    """An image file: local, gs:// or http(s)://; one record."""

    name = "file"

    def lists(self, path: str) -> bool:
        return is_image_path(path)

    def claims(self, uri: str) -> bool:
        return True

    def read(self, unit: Unit, limits: ReadLimits) -> Iterator[Record | ReadFailure]:
        yield Record(unit.uri, read_limited(unit.uri, limits.max_bytes, limits.http), unit.carried)


# --- reading one file, whatever it turns out to be --------------------------------------------

_NOT_FILES = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _require_regular_file(status: os.stat_result, max_bytes: int | None = None) -> None:
    if stat.S_ISDIR(status.st_mode):
        raise ReadError("is a directory, not a file", "IsADirectoryError")
    if not stat.S_ISREG(status.st_mode):
        kind = _NOT_FILES.get(stat.S_IFMT(status.st_mode), "not a regular file")
        raise ReadError(f"{kind}, not a file: not opened (reading it could wait forever)")
    if max_bytes is not None and status.st_size > max_bytes:
        raise ReadError(f"file is larger than --max_bytes {max_bytes:,}")


def _read_local(path: str, max_bytes: int) -> bytes:
    """Regular files only, found by stat before any open (opening a FIFO blocks until a writer
    comes), and checked again on the open file in case it was replaced in between."""
    _require_regular_file(os.stat(path), max_bytes)
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY), "rb") as handle:
        _require_regular_file(os.fstat(handle.fileno()), max_bytes)
        return handle.read(max_bytes + 1)


def _read_gcs(uri: str, max_bytes: int) -> bytes:
    with gcs.storage_errors(uri):
        blob = gcs.existing_blob(uri)
        if blob is None:
            raise MissingFileError(f"{uri}: no such object")
        if blob.size is not None and blob.size > max_bytes:
            raise ReadError(f"file is larger than --max_bytes {max_bytes:,}")
        return blob.download_as_bytes(timeout=gcs.TRANSFER_TIMEOUT)


@contextlib.contextmanager
def _read_errors(path: str | None):
    """Whatever stops a read, as a ReadError with a sentence (``path``: the local file, if any)."""
    try:
        yield
    except ReadError:
        raise
    except FileNotFoundError as error:
        if path is not None and os.path.islink(path):
            raise ReadError(
                f"a broken symbolic link: its target {os.readlink(path)} does not exist",
                exception_name(error),
            ) from None
        raise ReadError("file not found (removed after it was listed?)", exception_name(error)) from None
    except IsADirectoryError as error:
        raise ReadError("is a directory, not a file", exception_name(error)) from None
    except PermissionError as error:
        raise ReadError("permission denied", exception_name(error)) from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ReadError(
                "a symbolic link loop: the link leads back to itself", exception_name(error)
            ) from None
        raise ReadError(f"cannot read file: {error}", exception_name(error)) from None
    except Exception as error:  # any storage error means the same to the user: not readable
        raise ReadError(
            f"cannot read file: {exception_name(error)}: {error}", exception_name(error)
        ) from None


@contextlib.contextmanager
def open_regular_file(uri: str):
    """A local file opened for reading as it is streamed (a tar shard): regular files only, as
    ``_read_local`` checks them; problems opening it as ReadError."""
    path = Location.parse(uri).local_file()
    with _read_errors(path):
        _require_regular_file(os.stat(path))
        handle = open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY), "rb")  # noqa: SIM115
    with handle:
        _require_regular_file(os.fstat(handle.fileno()))
        yield handle


def read_limited(uri: str, max_bytes: int, http: HttpConfig = HttpConfig()) -> bytes:
    """The bytes of one file, at most ``max_bytes``; ReadError with a sentence otherwise."""
    location = Location.parse(uri)
    if location.is_http:
        try:
            return fetch(uri, max_bytes, http)
        except FetchError as error:
            raise ReadError(str(error), exception_name(error)) from None
    if location.is_remote and not location.is_gcs:
        raise ReadError("only local files, gs:// and http(s):// URIs can be read")
    path = location.local_path
    with _read_errors(path):
        data = _read_local(path, max_bytes) if path is not None else _read_gcs(uri, max_bytes)
    if len(data) > max_bytes:
        raise ReadError(f"file is larger than --max_bytes {max_bytes:,}")
    return data
