"""Bounds of settings, stated once as values (as scikit-learn's parameter constraints): the
same bound parses a flag's text (pipelines/flags.py) and checks a value that reaches a settings
object some other way (a template, an anchor file, a caller of the Python API), and both say
what is wrong in the same words, naming the flag."""

from __future__ import annotations

import dataclasses
import math

from anchorscan.anchors.errors import UsageError

CLOSED = ("both", "left", "right", "neither")


@dataclasses.dataclass(frozen=True)
class Interval:
    """Numbers of ``kind`` (int or float) from ``low`` to ``high`` (None: no upper bound), closed at
    the ends that ``closed`` names; floats are finite."""

    kind: type
    low: float
    high: float | None
    closed: str = "both"
    unit: str = ""

    def __post_init__(self):
        if self.closed not in CLOSED:
            raise ValueError(f"closed must be one of {CLOSED}, got {self.closed!r}")

    def problem(self, value) -> str | None:
        """What is wrong with ``value`` ("must be ..."), or None where it is inside."""
        if self.kind is float and not math.isfinite(value):
            return "must be a finite number"
        low_open, high_open = self.closed in ("right", "neither"), self.closed in ("left", "neither")
        too_low = value <= self.low if low_open else value < self.low
        too_high = self.high is not None and (value >= self.high if high_open else value > self.high)
        return f"must be {self.describe()}" if too_low or too_high else None

    def describe(self) -> str:
        low_open, high_open = self.closed in ("right", "neither"), self.closed in ("left", "neither")
        if self.kind is int:  # integers read as whole bounds: "from 1 to 20", "at least 0"
            low = int(self.low or 0) + low_open
            if self.high is None:
                return f"at least {low:,}{self.unit}"
            return f"from {low:,} to {int(self.high) - high_open:,}{self.unit}"
        if self.high is None:
            return f"above {self.low:g}" if low_open else f"at least {self.low:g}"
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"

    def message(self, flag: str, value) -> str | None:
        """The one line that names ``flag`` and says what its ``value`` must be, or None."""
        problem = self.problem(value)
        return None if problem is None else f"{flag} {problem}, got {value}"

    def check(self, value, flag: str):
        """``value`` where it is inside; a UsageError naming ``flag`` where it is not."""
        message = self.message(flag, value)
        if message is not None:
            raise UsageError(message)
        return value

    def parse(self, text: str):
        """A flag's text as a value of ``kind``, inside the bound; ValueError saying what it
        must be (as ``problem``; pipelines/flags.py makes it argparse's)."""
        try:
            value = self.kind(text)
        except ValueError:
            what = "an integer" if self.kind is int else "a number"
            raise ValueError(f"must be {what}, got {text!r}") from None
        if self.kind is float and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {text!r}")
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(f"{problem}, got {text}")
        return value


# An anchor's configuration (AnchorConfig), as fit's flags set it.
FPR = Interval(float, 0.0, 0.5, closed="right")
EXPLAINED_VARIANCE = Interval(float, 0.0, 1.0, closed="right")
CALIBRATION_FRACTION = Interval(float, 0.0, 1.0, closed="neither")
ALARM_SHARE = Interval(float, 0.0, 0.25, closed="right")
