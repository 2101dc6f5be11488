"""Every statistic an anchor, an update, a flag or a linear head is made of, accumulated in one
pass over embedded rows (docs/METHOD.md §3, §5.1): named moments of column slices of each row
(``backbone``, ``forensic.<level>``, ``flag.<generator>``) and, for the rows that the hold-out
rule sends to calibration instead, their feature rows (at most ``MAX_CALIBRATION_ROWS``, those
with the smallest URI keys). One accumulator for all of them, in the shape of tf.Transform's
analyzers (add, merge, compact, result); ``transforms/statistics.py`` is its Beam wrapper."""

from __future__ import annotations

import dataclasses

import numpy as np

from anchorscan.anchors import channels
from anchorscan.anchors.calibration import (
    MAX_CALIBRATION_ROWS,
    MAX_SOFTENED_ROWS,
    CalibrationRows,
    holds_out,
    uri_key,
)
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.anchors.stats import BufferedMoments, Moments


@dataclasses.dataclass(frozen=True)
class HoldOut:
    """The calibration hold-out rule (§5.1): a stable hash of the first match of ``group`` in
    each URI, else of the picture's perceptual hash (``by_phash``, where the decode step gave
    one), else of the URI, sends ``fraction`` of the images to calibration."""

    fraction: float
    group: str | None = None
    by_phash: bool = True

    def holds(self, uri: str, phash: str = "") -> bool:
        return holds_out(uri, self.fraction, self.group, phash if self.by_phash else "")


@dataclasses.dataclass(frozen=True)
class StatisticsLayout:
    """Which columns of an embedded row feed which named statistic (``slices``: name, start,
    stop), and the rule that sends a row to calibration instead (its first
    ``calibration_width`` columns kept). A statistic named in ``optional`` takes only the rows
    that have its columns (NaN where fitting did not simulate a softness level).
    ``softened_copies``: (backbone width, forensic width, levels) of fit's rows, whose
    held-out images may carry their softened copies' backbone features after the forensic
    levels (docs/METHOD.md §5.4); None where no rows do."""

    slices: tuple[tuple[str, int, int], ...]
    hold_out: HoldOut | None = None
    calibration_width: int = 0
    optional: tuple[str, ...] = ()
    softened_copies: tuple[int, int, int] | None = None

    @classmethod
    def for_anchor(
        cls, spec: FeatureSpec, level_names: tuple[str, ...], hold_out: HoldOut
    ) -> StatisticsLayout:
        """Rows of [semantic ; statistical ; forensic at each softness level] (fit's extractor
        output): every registered channel's statistics (``channels.Channel.slices``)."""
        slices = tuple(part for channel in channels.REGISTRY for part in channel.slices(spec, level_names))
        softened = channels.FORENSIC.statistic_names(level_names)[1:]
        copies = (spec.d_backbone, spec.d_forensic, len(level_names))
        return cls(slices, hold_out, spec.dim, softened, copies)

    def softened_row(self, row: np.ndarray) -> np.ndarray | None:
        """A held-out row's softened copies as full feature rows ([backbone ; forensic] per
        level after "sharp", side by side), or None where the row carries none."""
        if self.softened_copies is None:
            return None
        split, width, levels = self.softened_copies
        start = split + levels * width
        if len(row) < start + (levels - 1) * split:
            return None
        copies = [
            np.concatenate(
                [
                    row[start + (j - 1) * split : start + j * split],
                    row[split + j * width : split + (j + 1) * width],
                ]
            )
            for j in range(1, levels)
        ]
        joined = np.concatenate(copies)
        return joined if np.isfinite(joined).all() else None

    @classmethod
    def whole(cls, name: str, width: int) -> StatisticsLayout:
        """One statistic of the rows' first ``width`` columns, nothing held out (a flagged
        generator's images, a class of a linear head)."""
        return cls(((name, 0, width),))


@dataclasses.dataclass
class Statistics:
    """Named moments and the held-out rows (None where the layout holds nothing out)."""

    moments: dict[str, Moments]
    held_out: CalibrationRows | None = None


class StatisticsAccumulator:
    """The accumulator of a ``StatisticsLayout``: rows are buffered per statistic and added in
    batches (``BufferedMoments``); held-out rows are kept while they may be among the smallest
    keys. Merging never mutates the other accumulator."""

    __slots__ = ("_keys", "_rows", "_softened", "layout", "moments")

    def __init__(self, layout: StatisticsLayout, batch_size: int = 256):
        self.layout = layout
        self.moments = {
            name: BufferedMoments(stop - start, batch_size) for name, start, stop in layout.slices
        }
        self._keys: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []
        self._softened: list[CalibrationRows] = []

    def add(self, uri: str, row: np.ndarray, phash: str = "") -> StatisticsAccumulator:
        row = np.asarray(row)
        hold_out = self.layout.hold_out
        if hold_out is not None and hold_out.holds(uri, phash):
            self._keys.append(np.array([uri_key(uri)], dtype=np.uint64))
            self._rows.append(row[None, : self.layout.calibration_width])
            copies = self.layout.softened_row(row)
            if copies is not None:
                self._softened.append(CalibrationRows(self._keys[-1], copies[None, :]))
            if len(self._keys) >= 2 * MAX_CALIBRATION_ROWS or len(self._softened) >= 2 * MAX_SOFTENED_ROWS:
                self._trim()
            return self
        optional = self.layout.optional
        for name, start, stop in self.layout.slices:
            part = row[start:stop]
            if name not in optional or np.isfinite(part).all():
                self.moments[name].add(part)
        return self

    def merge(self, other: StatisticsAccumulator) -> StatisticsAccumulator:
        for name, moments in self.moments.items():
            moments.flush()
            moments.moments.merge(other.moments[name].value())
        self._keys += other._keys
        self._rows += other._rows
        self._softened += other._softened
        self._trim()
        return self

    def compact(self) -> StatisticsAccumulator:
        for moments in self.moments.values():
            moments.flush()
        self._trim()
        return self

    def _trim(self) -> None:
        """Keeps the held-out rows with the smallest keys, each key once."""
        if not self._keys:
            return
        rows = self.held_out()
        self._keys, self._rows = [rows.keys], [rows.features]
        self._softened = [rows.softened] if rows.softened is not None else []

    def held_out(self) -> CalibrationRows:
        if not self._keys:
            return CalibrationRows([], np.zeros((0, self.layout.calibration_width)))
        softened = CalibrationRows.merged(self._softened, MAX_SOFTENED_ROWS) if self._softened else None
        return CalibrationRows.merged(
            [CalibrationRows(np.concatenate(self._keys), np.concatenate(self._rows), softened)]
        )

    def result(self) -> Statistics:
        moments = {name: accumulator.flush() for name, accumulator in self.moments.items()}
        return Statistics(moments, self.held_out() if self.layout.hold_out is not None else None)

    def state(self) -> tuple[dict[str, Moments], CalibrationRows]:
        """What the accumulator holds, for its coder."""
        self.compact()
        return {name: accumulator.moments for name, accumulator in self.moments.items()}, self.held_out()

    @classmethod
    def from_state(
        cls,
        layout: StatisticsLayout,
        moments: dict[str, Moments],
        held: CalibrationRows,
        batch_size: int = 256,
    ) -> StatisticsAccumulator:
        accumulator = cls(layout, batch_size)
        for name, value in moments.items():
            accumulator.moments[name].moments = value
        if len(held):
            accumulator._keys, accumulator._rows = [held.keys], [held.features]
            accumulator._softened = [held.softened] if held.softened is not None else []
        return accumulator
