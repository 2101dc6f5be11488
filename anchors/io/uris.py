"""File names as the tables write them. Most names are UTF-8 and are written as they are. A local
name may hold any bytes but NUL and '/', and Python carries bytes that are not UTF-8 as
surrogate escapes (PEP 383), which no UTF-8 coder or Parquet column accepts; such a path is
written as an RFC 8089 ``file://`` URI, percent-encoded byte by byte (``/data/caf\\xe9.png``
becomes ``file:///data/caf%E9.png``), which ``local_path`` turns back into the same bytes. Any
``file://`` input is read that way."""

from __future__ import annotations

import os
import urllib.parse

FILE_SCHEME = "file://"
GLOB_CHARACTERS = "*?["
# The files a folder input scans and a dataset reader lists.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif")


def has_glob(pattern: str) -> bool:
    return any(character in pattern for character in GLOB_CHARACTERS)


def glob_prefix(pattern: str) -> str:
    """The part of ``pattern`` before its first glob character."""
    positions = [pattern.index(c) for c in GLOB_CHARACTERS if c in pattern]
    return pattern[: min(positions)] if positions else pattern


def is_image_path(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith(FILE_SCHEME)


def uri_text(path: str) -> str:
    """``path`` as valid UTF-8 text: unchanged when it is, else its ``file://`` URI."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        if is_remote(path):  # object names are UTF-8 already; keep what can be kept
            return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return FILE_SCHEME + urllib.parse.quote_from_bytes(os.fsencode(os.path.abspath(path)))


def local_path(uri: str) -> str | None:
    """The local path that ``uri`` names (bytes that are not UTF-8 as surrogate escapes), or
    None for a remote URI."""
    if uri.startswith(FILE_SCHEME):
        return os.fsdecode(urllib.parse.unquote_to_bytes(uri[len(FILE_SCHEME) :]))
    return None if is_remote(uri) else uri


def local_file(uri: str) -> str:
    """The local path of a URI known not to be remote."""
    path = local_path(uri)
    if path is None:
        raise ValueError(f"{uri} is not a local path")
    return path
