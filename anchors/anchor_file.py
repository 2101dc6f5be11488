"""The anchor file: safetensors tensors plus JSON metadata, with a checksum over both.

Never pickled. Every sufficient statistic the anchor holds (``Anchor.statistics``: the backbone
part's, the forensic channel's per softness level, each flagged generator's) is stored the same
way, ``moments.<name>.mean`` and ``moments.<name>.m2`` in float64 with its count in the
metadata's ``moments``, so anchors can be merged and updated channel by channel without code per
channel. Beside them: ``projection`` (the seeded statistical projection, when used),
``calibration.<component>`` quantile sketches, and ``calibration.keys`` / ``calibration.features``,
the held-out real images' URI keys and feature rows the sketches were taken on, and
``calibration.softened_keys`` / ``calibration.softened_features``, some of those images'
softened copies (each row every softness level's feature row after "sharp"). Metadata key
``anchorscan`` holds a JSON object: format_version, the feature spec, the fit configuration,
derived facts (shrinkage, k, ...), ``lineage`` and ``checksum``, the sha256 of the metadata
without it and of every tensor's name, dtype, shape and bytes. The whitening matrices are
derived again on load, so they cannot disagree with the statistics.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from anchorscan.anchors import channels, checked_file
from anchorscan.anchors.anchor import FLAG_PREFIX, GENERATOR_NAME, Anchor, AnchorConfig
from anchorscan.anchors.calibration import (
    MAX_CALIBRATION_ROWS,
    MAX_SOFTENED_ROWS,
    MIN_CALIBRATION,
    CalibrationRows,
)
from anchorscan.anchors.errors import UserError
from anchorscan.anchors.forensic import ForensicModel
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.anchors.stats import Moments
from anchorscan.anchors.validation import (
    check,
    check_array,
    check_count,
    check_moments,
    distinct_names,
    field,
)

FORMAT_VERSION = 5  # 2: the forensic channel; 3: named statistics, flagged generators, calibration rows;
# 4: the semantic distance is the largest standardised deviation (its sketches mean another thing);
# 5: held-out images' softened copies, the content channels' calibration per softness level
READ_VERSIONS = (4, 5)  # a version-4 anchor is a version-5 anchor without softened copies
METADATA_KEY = "anchorscan"
ROW_TENSORS = (
    "calibration.keys",
    "calibration.features",
    "calibration.softened_keys",
    "calibration.softened_features",
)


class AnchorFileError(UserError, ValueError):
    """The file is not a readable anchorscan anchor."""


def anchor_id(metadata: dict) -> str:
    """The anchor's short name in score rows: the first 16 hex digits of its checksum."""
    return metadata["checksum"][:16]


def statistics_tensors(statistics: dict[str, Moments]) -> tuple[dict[str, np.ndarray], dict]:
    """Named moments as tensors ``moments.<name>.mean|m2`` and their counts by name."""
    tensors: dict[str, np.ndarray] = {}
    for name, moments in statistics.items():
        tensors[f"moments.{name}.mean"], tensors[f"moments.{name}.m2"] = moments.mean, moments.m2
    return tensors, {name: moments.n for name, moments in statistics.items()}


def statistics_from_tensors(tensors: dict[str, np.ndarray], counts: dict) -> dict[str, Moments]:
    return {
        name: Moments.from_arrays(n, tensors[f"moments.{name}.mean"], tensors[f"moments.{name}.m2"])
        for name, n in counts.items()
    }


def statistics_id(statistics: dict[str, Moments]) -> str:
    """sha256 of the named statistics alone (not of calibration or configuration): what an
    update's lineage and a delta's base refer to."""
    tensors, counts = statistics_tensors(statistics)
    return checked_file.checksum({"moments": counts}, tensors)


def anchor_to_bytes(anchor: Anchor, projection: np.ndarray | None = None) -> bytes:
    statistics = anchor.statistics()
    tensors, counts = statistics_tensors(statistics)
    if projection is not None:
        tensors["projection"] = np.asarray(projection)
    for name in anchor.components:
        tensors[f"calibration.{name}"] = np.asarray(anchor.calibration[name], dtype=np.float64)
    if anchor.calibration_rows is not None:
        tensors["calibration.keys"] = anchor.calibration_rows.keys
        tensors["calibration.features"] = anchor.calibration_rows.features
        softened = anchor.calibration_rows.softened
        if softened is not None:
            tensors["calibration.softened_keys"] = softened.keys
            tensors["calibration.softened_features"] = softened.features
    metadata = {
        "config": dataclasses.asdict(anchor.config),
        **anchor.summary,
        "moments": counts,
        "statistics_id": statistics_id(statistics),
        "lineage": list(anchor.lineage),
    }
    return checked_file.pack(tensors, metadata, METADATA_KEY, FORMAT_VERSION)


def read_metadata(data: bytes, source: str | None = None) -> dict:
    """The JSON metadata alone, without reading the tensors or checking them (a run's summary of
    the file it has just written)."""
    return checked_file.read_metadata(data, METADATA_KEY, READ_VERSIONS, "anchor", AnchorFileError, source)


def verified_contents(data: bytes, source: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors and metadata of an anchor file whose checksum holds and whose numbers are
    an anchor's (``check_contents``); refuses truncated, tampered, forged or foreign files.
    ``source`` names the file in messages."""
    tensors, metadata = checked_file.unpack(
        data, METADATA_KEY, READ_VERSIONS, "anchor", AnchorFileError, source
    )
    check_contents(tensors, metadata, checked_file.named("anchor", source))
    return tensors, metadata


def check_contents(tensors: dict[str, np.ndarray], metadata: dict, what: str) -> None:
    """Every number an anchor file holds, checked as it enters (anchors/validation.py): the
    spec's sizes, each named statistic's count, mean and M2 (the forensic levels' counts against
    the backbone's: ``check_level_counts``), the calibration sketches (finite,
    ascending) and rows, the configuration."""
    error = AnchorFileError
    spec = FeatureSpec.checked(metadata, error, what)
    levels = distinct_names(metadata, "forensic_level_names", error, what)
    counts = field(metadata, "moments", dict, error, what)
    widths = channels.statistic_widths(spec, levels)
    flagged = [name for name in counts if name.startswith(channels.FLAG_STATISTIC)]
    for name in flagged:
        check(
            bool(GENERATOR_NAME.match(name[len(channels.FLAG_STATISTIC) :])),
            error,
            f"{what}: bad generator name {name!r}",
        )
        widths[name] = spec.dim
    check(
        set(counts) == set(widths), error, f"{what}: statistics {sorted(counts)}, expected {sorted(widths)}"
    )
    for name, width in widths.items():
        # counts are weights after --forgetting or a down-weighted update (docs/METHOD.md §9.2)
        for part in ("mean", "m2"):
            check(
                f"moments.{name}.{part}" in tensors,
                error,
                f"{what}: the tensor moments.{name}.{part} is missing",
            )
        check_moments(
            f"{what}: statistic {name}",
            counts[name],
            tensors[f"moments.{name}.mean"],
            tensors[f"moments.{name}.m2"],
            width,
            error,
            whole=False,
        )
    check(
        counts["backbone"] >= 3,
        error,
        f"{what}: the backbone statistic counts {counts['backbone']}, fewer than 3 images",
    )
    channels.check_level_counts(counts, levels, error, what)
    check_calibration(tensors, metadata, spec, flagged, error, what)
    try:
        AnchorConfig.from_dict(field(metadata, "config", dict, error, what))
    except (TypeError, ValueError) as problem:
        raise error(f"{what}: its configuration is not valid: {problem}") from None
    lineage = field(metadata, "lineage", list, error, what)
    check(all(isinstance(entry, str) for entry in lineage), error, f"{what}: lineage holds a non-text entry")
    if "projection" in tensors:
        check_array(f"{what}: projection", tensors["projection"], (None, None), error)
    known = {f"moments.{name}.{part}" for name in widths for part in ("mean", "m2")}
    known |= {"projection", *ROW_TENSORS}
    known |= {f"calibration.{component}" for component in _components(flagged)}
    check(not set(tensors) - known, error, f"{what}: unexpected tensors {sorted(set(tensors) - known)}")


def _components(flagged: list[str]) -> tuple[str, ...]:
    generators = sorted(name[len(channels.FLAG_STATISTIC) :] for name in flagged)
    return channels.components() + tuple(FLAG_PREFIX + name for name in generators)


def check_calibration(tensors, metadata, spec: FeatureSpec, flagged, error, what: str) -> None:
    """Sketches finite and ascending, one per component, all of one length; the calibration
    count a whole number at least MIN_CALIBRATION, the kept rows' (when kept)."""
    n_calibration = check_count(
        f"{what}: n_calibration", metadata.get("n_calibration"), error, minimum=MIN_CALIBRATION
    )
    lengths = set()
    for component in _components(flagged):
        name = f"calibration.{component}"
        check(name in tensors, error, f"{what}: the calibration sketch {name} is missing")
        sketch = check_array(f"{what}: {name}", tensors[name], (None,), error)
        check(
            len(sketch) >= 2 and bool((np.diff(sketch) >= 0).all()),
            error,
            f"{what}: {name} is not an ascending quantile sketch",
        )
        lengths.add(len(sketch))
    check(len(lengths) == 1, error, f"{what}: the calibration sketches differ in length")
    if "calibration.keys" in tensors or "calibration.features" in tensors:
        check(
            "calibration.keys" in tensors and "calibration.features" in tensors,
            error,
            f"{what}: calibration keys and features must come together",
        )
        keys = check_array(f"{what}: calibration.keys", tensors["calibration.keys"], (None,), error)
        check(
            keys.dtype == np.uint64 and len(np.unique(keys)) == len(keys),
            error,
            f"{what}: calibration keys repeat",
        )
        check_array(
            f"{what}: calibration.features", tensors["calibration.features"], (len(keys), spec.dim), error
        )
        check(
            len(keys) == n_calibration and len(keys) <= MAX_CALIBRATION_ROWS,
            error,
            f"{what}: {len(keys)} calibration rows for n_calibration {n_calibration}",
        )
    if "calibration.softened_keys" in tensors or "calibration.softened_features" in tensors:
        check(
            "calibration.softened_keys" in tensors
            and "calibration.softened_features" in tensors
            and "calibration.keys" in tensors,
            error,
            f"{what}: softened calibration keys and features must come together, with the calibration rows",
        )
        keys = check_array(
            f"{what}: calibration.softened_keys", tensors["calibration.softened_keys"], (None,), error
        )
        check(
            keys.dtype == np.uint64 and len(np.unique(keys)) == len(keys) and len(keys) <= MAX_SOFTENED_ROWS,
            error,
            f"{what}: softened calibration keys repeat or exceed {MAX_SOFTENED_ROWS}",
        )
        levels = len(metadata["forensic_level_names"]) - 1
        check(levels > 0, error, f"{what}: softened calibration rows without softness levels")
        check_array(
            f"{what}: calibration.softened_features",
            tensors["calibration.softened_features"],
            (len(keys), levels * spec.dim),
            error,
        )


def check_scores_finite(anchor: Anchor) -> None:
    """The models derived from finite statistics can still overflow (a forged M2 of 1e300):
    raises ValueError where they do not score the anchor's own means and kept calibration rows
    finitely."""
    probe = np.concatenate([anchor.moments.mean, anchor.forensic.moments[0].mean])[None, :]
    if anchor.calibration_rows is not None:
        probe = np.vstack([probe, anchor.calibration_rows.features[:16]])
    with np.errstate(all="ignore"):  # the overflow is what this finds out, not a warning to print
        scores = anchor.assess(probe)
        levels = anchor.level_calibration or {}
    if not all(np.isfinite(s).all() for sketches, _ in levels.values() for s in sketches.values()):
        raise ValueError("its softened calibration rows do not score finitely (NaN or infinity)")
    if not all(np.isfinite(scores[name]).all() for name in ("score", *channels.scored())):
        raise ValueError("its models do not score finitely (NaN or infinity)")


def anchor_from_bytes(data: bytes, source: str | None = None) -> tuple[Anchor, dict]:
    """Returns the anchor, with its scoring matrices derived, and its metadata."""
    tensors, metadata = verified_contents(data, source)
    spec = FeatureSpec.from_dict(metadata)
    statistics = statistics_from_tensors(tensors, metadata["moments"])
    softened = (
        CalibrationRows(tensors["calibration.softened_keys"], tensors["calibration.softened_features"])
        if "calibration.softened_keys" in tensors
        else None
    )
    rows = (
        CalibrationRows(tensors["calibration.keys"], tensors["calibration.features"], softened)
        if "calibration.keys" in tensors
        else None
    )
    levels = tuple(metadata["forensic_level_names"])
    flagged = channels.flagged(statistics)
    try:
        forensic = ForensicModel(
            levels, [statistics[name] for name in channels.FORENSIC.statistic_names(levels)]
        )
        anchor = Anchor(
            spec,
            statistics[channels.COUNTING],
            forensic,
            AnchorConfig.from_dict(metadata["config"]),
            {
                name[len("calibration.") :]: tensor
                for name, tensor in tensors.items()
                if name.startswith("calibration.") and name not in ROW_TENSORS
            },
            metadata["n_calibration"],
            flagged,
            rows,
            tuple(metadata["lineage"]),
            {channel.name: statistics[channel.name] for channel in channels.added()},
        )
        check_scores_finite(anchor)
    except (np.linalg.LinAlgError, ValueError) as problem:  # valid numbers, degenerate models
        raise AnchorFileError(
            f"{checked_file.named('anchor', source)}: its statistics do not give a model "
            f"({problem}): refit it"
        ) from None
    metadata["projection"] = tensors.get("projection")
    return anchor, metadata
