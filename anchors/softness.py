"""The softness levels of real photos that the forensic channel models (docs/METHOD.md §8.3): a
registry of names and how each level is simulated on a real crop at fit time. Plain data, so the
maths (which needs the names) and the pixel features (which need the recipes) share it."""

from __future__ import annotations

# Softness levels of real photos simulated at fit time: (name in the score row, how).
# Gaussian blur along the focus path, and thumbnails (area downscale, bicubic back up), so that
# an upscaled thumbnail is reported as an upscale, not as generated. Motion blur is never used:
# it is the softness held out to check that the mixture generalises.
SOFTNESS_PATH = (
    ("sharp", None),
    ("blur0.4", ("blur", 0.4)),
    ("blur0.6", ("blur", 0.6)),
    ("blur0.8", ("blur", 0.8)),
    ("blur1.0", ("blur", 1.0)),
    ("blur1.25", ("blur", 1.25)),
    ("blur1.5", ("blur", 1.5)),
    ("upscale1.25x", ("thumbnail", 0.8)),
    ("upscale1.6x", ("thumbnail", 0.625)),
    ("upscale2x", ("thumbnail", 0.5)),
)
# `fit --forensic_levels`: the default mixture, or the sharp level alone for corpora known to
# be sharp (more recall, and soft photos flagged: docs/QUALITY.md has both tables).
LEVEL_SETS = {"softness_path": SOFTNESS_PATH, "sharp": SOFTNESS_PATH[:1]}


def level_names(level_set: str) -> tuple[str, ...]:
    """The names of a level set's levels, sharp first."""
    return tuple(name for name, _ in LEVEL_SETS[level_set])


def softened(level_set: str) -> tuple:
    """How each level after "sharp" is simulated: what fit-time feature extraction applies."""
    return tuple(how for _, how in LEVEL_SETS[level_set][1:])
