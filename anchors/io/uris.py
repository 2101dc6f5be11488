"""File names as the tables write them. Most names are UTF-8 and are written as they are. A local
name may hold any bytes but NUL and '/', and Python carries bytes that are not UTF-8 as
surrogate escapes (PEP 383), which no UTF-8 coder or Parquet column accepts; such a path is
written as an RFC 8089 ``file://`` URI, percent-encoded byte by byte (``/data/caf\\xe9.png``
becomes ``file:///data/caf%E9.png``), which ``local_path`` turns back into the same bytes. Any
``file://`` input is read that way.

``Location`` is a URI classified once: where it lies (a local path, a ``file://`` URI, gs://,
http(s)://, another scheme), the local path it names, and for a sample of a shard
(``SHARD#KEY``) the shard and the key; ``str()`` gives back the URI exactly as written."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import urllib.parse

import braceexpand

FILE_SCHEME = "file://"
GLOB_CHARACTERS = "*?["
# The files a folder input scans and a dataset reader lists.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif")
SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
HTTP_SCHEMES = ("http", "https")
GCS_SCHEME = "gs://"


def has_glob(pattern: str) -> bool:
    return any(character in pattern for character in GLOB_CHARACTERS)


def glob_prefix(pattern: str) -> str:
    """The part of ``pattern`` before its first glob character."""
    positions = [pattern.index(c) for c in GLOB_CHARACTERS if c in pattern]
    return pattern[: min(positions)] if positions else pattern


def is_image_path(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


@dataclasses.dataclass(frozen=True)
class Location:
    """One URI, parsed once; the properties are what the call sites ask of it."""

    uri: str

    @classmethod
    def parse(cls, uri: str | Location) -> Location:
        return uri if isinstance(uri, Location) else cls(uri)

    def __str__(self) -> str:
        return self.uri

    @functools.cached_property
    def is_remote(self) -> bool:
        """Named by a scheme other than ``file://`` (gs://, http(s)://, or one nothing reads)."""
        return "://" in self.uri and not self.uri.startswith(FILE_SCHEME)

    @property
    def is_absolute(self) -> bool:
        """Scheme-qualified, or an absolute local path: not to be resolved beside anything."""
        return "://" in self.uri or self.uri.startswith("/")

    @functools.cached_property
    def is_gcs(self) -> bool:
        return self.uri.startswith(GCS_SCHEME)

    @functools.cached_property
    def is_http(self) -> bool:
        # urlsplit as a web client reads the scheme (any case; ValueError on a broken host).
        return urllib.parse.urlsplit(self.uri).scheme.lower() in HTTP_SCHEMES

    @functools.cached_property
    def local_path(self) -> str | None:
        """The local path it names (bytes that are not UTF-8 as surrogate escapes), or None
        for a remote URI."""
        if self.uri.startswith(FILE_SCHEME):
            return os.fsdecode(urllib.parse.unquote_to_bytes(self.uri[len(FILE_SCHEME) :]))
        return None if self.is_remote else self.uri

    def local_file(self) -> str:
        """The local path of a URI known not to be remote."""
        path = self.local_path
        if path is None:
            raise ValueError(f"{self.uri} is not a local path")
        return path

    @functools.cached_property
    def is_shard(self) -> bool:
        return self.uri.lower().endswith(SHARD_EXTENSIONS)

    @functools.cached_property
    def shard_and_key(self) -> tuple[str, str] | None:
        """(shard, key) of a sample of a shard, ``SHARD#KEY`` (cut at the first '#' after a
        shard's extension); None for any other URI."""
        lowered = self.uri.lower()
        cuts = [lowered.find(extension + "#") for extension in SHARD_EXTENSIONS]
        cuts = [cut + len(extension) for cut, extension in zip(cuts, SHARD_EXTENSIONS) if cut > 0]
        if not cuts:
            return None
        cut = min(cuts)
        return self.uri[:cut], self.uri[cut + 1 :]

    @property
    def shard(self) -> str | None:
        return self.shard_and_key[0] if self.shard_and_key else None

    @property
    def key(self) -> str | None:
        return self.shard_and_key[1] if self.shard_and_key else None

    @classmethod
    def sample(cls, shard: str, key: str) -> Location:
        return cls(f"{shard}#{key}")


def uri_text(path: str) -> str:
    """``path`` as valid UTF-8 text: unchanged when it is, else its ``file://`` URI."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        if Location.parse(path).is_remote:  # object names are UTF-8 already; keep what can be kept
            return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return FILE_SCHEME + urllib.parse.quote_from_bytes(os.fsencode(os.path.abspath(path)))


# A brace pattern naming more than this is refused before it is expanded: each name is one
# element of the listing (about 100 bytes on the driver), and a typo of a few digits more
# (``{0..9999999}``) would build gigabytes of names. LAION-5B's largest shard set is 231,350.
MAX_BRACE_NAMES = 1_000_000


# braceexpand's own ranges: {1..10}, {10..1..3}, {a..g..2}.
_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")
_LETTER_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")


def _count_pattern(pattern: str) -> int:
    """How many names ``braceexpand`` makes of ``pattern``, counted along its grammar (a
    product of literal parts and brace groups) without making them; ValueError where its
    braces are unbalanced, as braceexpand's."""
    count, start, depth, position = 1, 0, 0, 0
    while position < len(pattern):
        character = pattern[position]
        if character == "\\":
            position += 2
            continue
        if character == "{":
            depth += 1
            if depth == 1:
                start = position
        elif character == "}":
            depth -= 1
            if depth == 0:
                count *= _count_expression(pattern[start + 1 : position])
        position += 1
    if depth != 0:
        raise ValueError(f"unbalanced braces: {pattern!r}")
    return count


def _count_expression(expression: str) -> int:
    """The names one brace group makes: a range's length, the sum of a list's alternatives,
    or those of its inside (a group that is neither stays braces in the names)."""
    match = _INT_RANGE.match(expression)
    if match:
        first, last, step = int(match[1]), int(match[2]), int(match[3] or 1) or 1
        return abs(last - first) // step + 1
    if _LETTER_RANGE.match(expression):  # at most 52 letters: made, not counted
        return len(list(braceexpand.braceexpand("{" + expression + "}")))
    alternatives, start, depth, position = [], 0, 0, 0
    while position < len(expression):
        character = expression[position]
        if character == "\\":
            position += 2
            continue
        if character == "{":
            depth += 1
        elif character == "}":
            depth -= 1
        elif character == "," and depth == 0:
            alternatives.append(expression[start:position])
            start = position + 1
        position += 1
    if depth != 0 or not alternatives:
        return _count_pattern(expression)
    return sum(_count_pattern(alternative) for alternative in [*alternatives, expression[start:]])


def too_many_names(pattern: str) -> str | None:
    """Why a brace pattern may not be expanded (it names more than MAX_BRACE_NAMES), counted
    without making a name; None for any other pattern (unbalanced braces are a literal name)."""
    if "{" not in pattern:
        return None
    try:
        count = _count_pattern(pattern)
    except ValueError:
        return None
    if count <= MAX_BRACE_NAMES:
        return None
    return (
        f"{pattern!r} names {count:,} files, more than {MAX_BRACE_NAMES:,}: check the range, "
        "or split the set over several runs"
    )
