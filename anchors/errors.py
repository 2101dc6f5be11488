"""The product's deliberate refusals. A ``UserError`` is a mistake the user can fix (a missing
file, a bad flag value, an output under a file, an anchor or delta that is damaged, forged or
does not fit the features, a refused merge or update); its message says what and how, and the
command line prints it as one line (exit status 2). An ``EnvironmentFailure`` is the machine's or
the network's (a full disk, a read-only file system, permission denied on an output, storage that
cannot be reached): one line too, exit status 3, and the same command completes once it is
fixed. Any other exception is a bug in anchorscan or a library: the command line says "internal
error" (exit status 1)."""

from __future__ import annotations

import errno
import re


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


class EnvironmentFailure(Exception):
    """The machine or the network stopped the command, not its arguments; the message names the
    path and what to do. Rerunning once it is fixed completes (nothing half-written is left)."""


# OSErrors that are the environment's, and what to do about each.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device: free space and run the command again",
    errno.EDQUOT: "disk quota exceeded: free space and run the command again",
    errno.EROFS: "the file system is read-only: write elsewhere, or make it writable",
    errno.EACCES: "permission denied: write elsewhere, or get the permission",
    errno.EPERM: "operation not permitted: write elsewhere, or get the permission",
}
# How other runners' workers report an OSError: only its text comes back.
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] [^:'\n]*(?:: '([^'\n]*)')?")


def environment_failure(error: BaseException, path: str | None = None) -> EnvironmentFailure | None:
    """The EnvironmentFailure behind ``error``: itself, an OSError with one of
    ENVIRONMENT_ERRNOS anywhere in its chain, or the text of one that a runner's worker sent
    back; None where the failure is not the environment's. ``path``: what was being written."""
    seen, first = set(), error
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, EnvironmentFailure):
            return cause
        if isinstance(cause, OSError) and cause.errno in ENVIRONMENT_ERRNOS:
            return EnvironmentFailure(
                f"{cause.filename or path or 'an output'}: {ENVIRONMENT_ERRNOS[cause.errno]}"
            )
        cause = cause.__cause__ or cause.__context__
    for match in _ERRNO_TEXT.finditer(str(first)):
        number = int(match.group(1))
        if number in ENVIRONMENT_ERRNOS:
            return EnvironmentFailure(
                f"{match.group(2) or path or 'an output'}: {ENVIRONMENT_ERRNOS[number]}"
            )
    return None


def exception_name(error: BaseException) -> str:
    """The exception's class as a person would look it up: ``TypeError``, ``struct.error``."""
    kind = type(error)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
