"""Parsers and flag values, without Beam: every command's parser is made here (one-line errors
that name the flag, exit status 2), and every flag value is checked where it is parsed, so a
bad value never reaches a pipeline. `info`, `merge` and `export-delta` import only this."""

from __future__ import annotations

import argparse
import math
import re
import sys

from anchorscan.anchors.constraints import Interval
from anchorscan.anchors.io.uris import too_many_names
from anchorscan.pipelines.cli import COMMANDS

BEAM_EPILOG = "Other flags pass to Beam (--runner, --direct_num_workers, --project, ...)."


class CommandParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line: what is wrong, naming the flag, and where
    to read more."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def command_parser(command: str, beam: bool = True) -> CommandParser:
    """The parser of ``command``, described as cli.COMMANDS describes it; ``beam``: whether
    flags it does not know go to Beam."""
    return CommandParser(
        prog=f"anchorscan {command}",
        description=COMMANDS[command].description,
        epilog=BEAM_EPILOG if beam else None,
        allow_abbrev=False,
    )


# --- values: each function parses one flag's text or says what it must be ---------------------


def bounded(interval: Interval):
    """The argparse type of a flag whose values ``interval`` bounds: its errors are the
    interval's, which a settings object built without argparse raises in the same words."""

    def parse(text: str):
        try:
            return interval.parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = "integer" if interval.kind is int else "number"
    return parse


def add_bounded(group, bounds: dict[str, Interval], flags: tuple[tuple[str, object, str], ...]) -> None:
    """Flags (name, default, help) whose values ``bounds`` bound, each bound its flag's type."""
    for name, default, help_text in flags:
        group.add_argument(f"--{name}", type=bounded(bounds[name]), default=default, help=help_text)


def checked_flags(bounds: dict[str, Interval], args) -> None:
    """Each flag that ``bounds`` names, as ``args`` holds it, checked by its bound: a settings
    object built from flags set past the parser (a caller, a template) refuses a value in the
    words its flag's type uses (a UsageError naming --NAME)."""
    for name, interval in bounds.items():
        interval.check(getattr(args, name), f"--{name}")


def int_in(low: int, high: int | None = None, unit: str = ""):
    """Integers from ``low`` to ``high`` (inclusive; no upper bound without one)."""
    return bounded(Interval(int, low, high, unit=unit))


def float_in(low: float, high: float | None = None, low_open: bool = True, high_open: bool = False):
    """Finite numbers in the interval from ``low`` to ``high``, open or closed at each end."""
    closed = {(False, False): "both", (False, True): "left", (True, False): "right", (True, True): "neither"}
    return bounded(Interval(float, low, high, closed[low_open, high_open]))


positive_float = float_in(0.0)
non_negative_float = float_in(0.0, low_open=False)
positive_int = int_in(1)
non_negative_int = int_in(0)


def text(value: str) -> str:
    """A path, prefix or name: never empty (an empty --output would write beside the working
    directory's files; an empty --input would scan it)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def pem_certificates(path: str) -> str:
    """The text of a PEM file of certificates (local or gs://), read when the flag is parsed."""
    from anchorscan.anchors.errors import UserError
    from anchorscan.anchors.io.storage import read_checked_file

    try:
        pem = read_checked_file(text(path)).decode("utf-8", "replace")
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise argparse.ArgumentTypeError(
            f"{path}: no PEM certificate in it (give CA certificates, each between "
            "-----BEGIN CERTIFICATE----- and -----END CERTIFICATE-----)"
        )
    return pem


def input_pattern(value: str) -> str:
    """An --input: not empty, and a brace pattern of at most MAX_BRACE_NAMES names (counted,
    not made: a typo's {0..9999999} would build gigabytes of names)."""
    too_many = too_many_names(text(value))
    if too_many:
        raise argparse.ArgumentTypeError(too_many)
    return value


def regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"is not a regular expression ({error}): {value!r}") from None
    return value


def choice_list(choices: tuple[str, ...]):
    """Comma-separated distinct names among ``choices``."""

    def parse(value: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in value.split(",") if part.strip())
        if not names or set(names) - set(choices) or len(set(names)) < len(names):
            raise argparse.ArgumentTypeError(
                f"must be distinct names among {', '.join(choices)}, comma-separated; got {value!r}"
            )
        return names

    parse.__name__ = "list"
    return parse


def admit_value(value: str) -> str:
    """`update --admit`: 'fpr', 'none' or a p-value in (0, 1)."""
    if value not in ("fpr", "none"):
        try:
            p = float(value)
        except ValueError:
            p = math.nan
        if not 0.0 < p < 1.0:
            raise argparse.ArgumentTypeError(f"must be 'fpr', 'none' or a p-value in (0, 1), got {value!r}")
    return value


def generator_name(value: str) -> str:
    from anchorscan.anchors.anchor import GENERATOR_NAME

    if not GENERATOR_NAME.match(value):
        raise argparse.ArgumentTypeError(
            f"must start with a letter or digit and hold only letters, digits, '_', '.' and '-' "
            f"(at most 64), got {value!r}"
        )
    return value


def perturbation_value(value: str) -> str:
    from anchorscan.anchors.errors import UsageError
    from anchorscan.anchors.images.perturbations import parse_perturbation

    try:
        parse_perturbation(value)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--perturbation ")) from None
    return value


def perturbation_list(value: str) -> list[str]:
    """`evaluate --sweep`: comma-separated perturbations, each checked."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("must name at least one perturbation")
    return [perturbation_value(item) for item in items]
