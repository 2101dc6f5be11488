"""File names as the tables write them. Most names are UTF-8 and are written as they are. A local
name may hold any bytes but NUL and '/', and Python carries bytes that are not UTF-8 as
surrogate escapes (PEP 383), which no UTF-8 coder or Parquet column accepts; such a path is
written as an RFC 8089 ``file://`` URI, percent-encoded byte by byte (``/data/caf\\xe9.png``
becomes ``file:///data/caf%E9.png``), which ``local_path`` turns back into the same bytes. Any
``file://`` input is read that way."""

from __future__ import annotations

import os
import re
import urllib.parse

import braceexpand

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
