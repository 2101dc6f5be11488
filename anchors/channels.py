"""The channels an anchor is made of, declared once (docs/METHOD.md §4, §8): each channel's slice
of the features, its named sufficient statistics and their widths, the one-class model fitted
from its merged moments, the calibrated distances it emits and the p-value columns the score
can combine. The anchor, its file, a delta, the statistics layout and the score iterate over
``REGISTRY``; a new channel is a module declaring a ``Channel`` and one line adding it there.

The backbone and forensic channels' models are the anchor's own (``AnchorModel``,
``ForensicModel``: they carry the statistical mode, the softness levels and the flagged
generators' blocks), so they declare no ``fit``; a channel that declares one is fitted and
scored by it alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import numpy as np

from anchorscan.anchors.spec import FeatureSpec
from anchorscan.anchors.stats import Moments
from anchorscan.anchors.validation import check


class ChannelModel(Protocol):
    def distances(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Each of the channel's components' distances for rows of its feature slice."""


@dataclasses.dataclass(frozen=True)
class Channel:
    """``columns``: its (start, stop) in a scored feature row. ``levelled``: one statistic per
    softness level (``name.level``, fit's rows holding one slice per level after the first,
    side by side), else one named ``name``. ``components``: the distances it emits and
    calibrates; ``scored``: the channels among them the score can combine, their p-value
    columns ``p_<channel>`` meaning ``p_meanings``; ``score_columns``: the distance columns it
    adds to the score table (name, Arrow type alias, meaning). ``fit``: an added (not levelled)
    channel's model from its merged moments. ``per_level``: its distances move with the image's
    softness (a blurred photo's embedding does), so they are calibrated per softness level where
    the anchor keeps held-out images' softened copies (docs/METHOD.md §5.4)."""

    name: str
    columns: Callable[[FeatureSpec], tuple[int, int]]
    components: tuple[str, ...]
    scored: tuple[str, ...]
    p_meanings: tuple[str, ...]
    score_columns: tuple[tuple[str, str, str], ...]
    levelled: bool = False
    per_level: bool = False
    fit: Callable[[Moments], ChannelModel] | None = None

    def width(self, spec: FeatureSpec) -> int:
        start, stop = self.columns(spec)
        return stop - start

    def statistic_names(self, levels: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        return tuple(f"{self.name}.{level}" for level in levels) if self.levelled else (self.name,)

    def slices(self, spec: FeatureSpec, levels: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
        """Its statistics' (name, start, stop) in fit's rows."""
        start, stop = self.columns(spec)
        width = stop - start
        return tuple(
            (name, start + j * width, start + (j + 1) * width)
            for j, name in enumerate(self.statistic_names(levels))
        )


BACKBONE = Channel(
    "backbone",
    lambda spec: (0, spec.d_backbone),
    components=("semantic", "statistical", "statistical_raw"),
    scored=("semantic", "statistical"),
    p_meanings=(
        "upper-tail p-value of `semantic` against the held-out real images",
        "upper-tail p-value of the statistical distance the anchor scores with",
    ),
    score_columns=(
        (
            "semantic",
            "float64",
            "semantic distance: the largest standardised deviation of a semantic feature from real photos",
        ),
        ("statistical", "float64", "decoupled statistical distance, `t2 + spe`"),
        ("t2", "float64", "its part in the kept eigenspace"),
        ("spe", "float64", "its part outside the kept eigenspace"),
        ("statistical_raw", "float64", "the statistical distance without regression on content"),
    ),
    per_level=True,
)
FORENSIC = Channel(
    "forensic",
    lambda spec: (spec.d_backbone, spec.dim),
    components=("forensic",),
    scored=("forensic",),
    p_meanings=("upper-tail p-value of `forensic`",),
    score_columns=(
        (
            "forensic",
            "float64",
            "pixel-level distance: how much more predictable the fine scales are than in real "
            "photos of the same softness",
        ),
        (
            "softness",
            "string",
            "the real-photo softness that explains the pixels best: `sharp`, `blur0.4` ... "
            "`blur1.5` (focus blur, Gaussian sigma in px), `upscale1.25x` ... `upscale2x` "
            "(an upscaled smaller image)",
        ),
    ),
    levelled=True,
)
BUILT_IN = (BACKBONE, FORENSIC)
REGISTRY: list[Channel] = [BACKBONE, FORENSIC]


def components() -> tuple[str, ...]:
    """Every channel's calibrated distances, in the registry's order."""
    return tuple(component for channel in REGISTRY for component in channel.components)


def scored() -> tuple[str, ...]:
    """What the score can combine: every channel's p-value columns."""
    return tuple(name for channel in REGISTRY for name in channel.scored)


def level_calibrated() -> tuple[str, ...]:
    """The distances calibrated per softness level (``Channel.per_level``)."""
    return tuple(component for channel in REGISTRY if channel.per_level for component in channel.components)


def added() -> tuple[Channel, ...]:
    """The registered channels beyond the anchor's built-in ones."""
    return tuple(channel for channel in REGISTRY if channel not in BUILT_IN)


def statistic_widths(spec: FeatureSpec, levels: tuple[str, ...] | list[str]) -> dict[str, int]:
    """Every channel's statistics by name, each with its width."""
    return {name: channel.width(spec) for channel in REGISTRY for name in channel.statistic_names(levels)}


# A flagged generator's statistic, "flag.NAME": moments of its images' whole feature rows (§9.3).
FLAG_STATISTIC = "flag."
# The statistic whose count is the number of real images (the forensic levels' are checked against it).
COUNTING = BACKBONE.name


def flag_statistic(generator: str) -> str:
    return FLAG_STATISTIC + generator


def flagged(statistics: dict[str, Moments]) -> dict[str, Moments]:
    """The flagged generators' statistics among ``statistics``, by generator."""
    return {
        name[len(FLAG_STATISTIC) :]: moments
        for name, moments in statistics.items()
        if name.startswith(FLAG_STATISTIC)
    }


def real_count(statistics: dict[str, Moments]) -> float:
    """How many real images ``statistics`` count (0 where they hold none)."""
    return statistics[COUNTING].n if COUNTING in statistics else 0


def check_level_counts(counts: dict, levels: list[str], error: type[Exception], what: str) -> None:
    """The forensic levels' counts against the backbone's (docs/METHOD.md §8.3, §9.5): the first
    level (sharp) takes every real image, so it counts what the backbone counts; the softened
    levels take the same deterministic sample of them, so they count alike and at most that."""
    real = counts[COUNTING]
    tolerance = 1e-9 * real  # counts may be weights after --forgetting: equal up to rounding
    sharp, *softened = FORENSIC.statistic_names(levels)
    check(
        abs(counts[sharp] - real) <= tolerance,
        error,
        f"{what}: statistic {sharp} counts {counts[sharp]}, the backbone's {real}: they are the same images",
    )
    for name in softened:
        first = counts[softened[0]]
        check(
            abs(counts[name] - first) <= tolerance and counts[name] <= real + tolerance,
            error,
            f"{what}: statistic {name} counts {counts[name]}: the softened levels count the same sample "
            f"of the backbone's {real} images ({softened[0]} counts {first})",
        )
