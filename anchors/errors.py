"""The product's deliberate refusals. A ``UserError`` is a mistake the user can fix (a missing
file, a bad flag value, an unwritable output, an anchor that does not fit the features); its
message says what and how, and the command line prints it as one line (exit status 2). Any
other exception is a bug in anchorscan or a library: the command line says "internal error"."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message names the input or flag and the fix."""


class UsageError(UserError, ValueError):
    """A command line that cannot run: a flag value out of range, flags that do not go together."""


class UnreadableFileError(UserError, OSError):
    """A file the command needs (an anchor, a head, a manifest, weights) cannot be read."""


class MissingFileError(UnreadableFileError, FileNotFoundError):
    """A file, folder or bucket the command line names does not exist."""


class UnwritableOutputError(UserError, OSError):
    """An output cannot be written where the command line says."""


class NotEnoughImagesError(UserError, ValueError):
    """Too few images could be used for what was asked (an anchor's calibration, a head's class)."""


def exception_name(error: BaseException) -> str:
    """The exception's class as a person would look it up: ``TypeError``, ``struct.error``."""
    kind = type(error)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
