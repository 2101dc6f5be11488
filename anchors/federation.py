"""Federation (docs/METHOD.md §9.4): a site exports what it learned since a common base as a
*delta* of its sufficient statistics - per named statistic (backbone part, forensic levels,
flagged generators) the count, mean and M2 of the images it added, or a low-rank factor of that
M2 - and a coordinator merges deltas into the base with Chan's merge, the CombineFn's own.
Images and per-image features never leave a site; the held-out images a site keeps for its own
calibration are not in its delta.

The delta file is a checked file like the anchor (safetensors + JSON + sha256, never pickled):
tensors ``delta.<name>.mean`` and ``delta.<name>.m2`` or ``delta.<name>.factor``; metadata the
feature spec, the forensic levels, the base's and the site's statistics ids, the counts, the
minimum count it was checked against, the noise scale and the ranks.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from anchorscan.anchors import checked_file
from anchorscan.anchors.anchor import Anchor
from anchorscan.anchors.anchor_file import statistics_id
from anchorscan.anchors.errors import UserError
from anchorscan.anchors.spec import FeatureSpec, IncompatibleAnchorError
from anchorscan.anchors.stats import Moments
from anchorscan.anchors.updating import merged_statistics, recalibrated

FORMAT_VERSION = 1
METADATA_KEY = "anchorscan_delta"
MIN_COUNT = 64


class DeltaFileError(UserError, ValueError):
    """The file is not a readable anchorscan delta."""


class DeltaRefused(UserError, ValueError):
    """A delta that must not be exported or merged; the message says why and what to do."""


def subtract(total: Moments, base: Moments) -> Moments:
    """The moments of the rows in ``total`` that are not in ``base`` (Chan's merge solved for
    the added part). Exact up to rounding amplified by about n_total / n_added."""
    n = total.n - base.n
    if n < 0:
        raise DeltaRefused(f"the site has fewer images ({total.n}) than the base ({base.n}) in a statistic")
    if n == 0:
        return Moments(total.dim)
    mean = base.mean + (total.mean - base.mean) * (total.n / n)
    shift = mean - base.mean
    m2 = total.m2 - base.m2 - np.outer(shift, shift) * (base.n * n / total.n)
    return Moments.from_arrays(n, mean, (m2 + m2.T) / 2)


@dataclasses.dataclass
class Delta:
    spec: FeatureSpec
    level_names: tuple[str, ...]
    base_id: str
    site_id: str
    statistics: dict[str, Moments]  # with a factor, m2 = factor factor^T
    min_count: int = MIN_COUNT
    noise: float = 0.0
    factors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # (d, rank)
    kept_energy: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def n(self) -> float:
        return self.statistics["backbone"].n if "backbone" in self.statistics else 0


def export_delta(
    site: Anchor,
    base: Anchor,
    min_count: int = MIN_COUNT,
    rank: int | None = None,
    noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Delta:
    """What ``site`` learned since ``base``; refused when the site was not made from the base by
    adding images, or when it added fewer than ``min_count`` real images."""
    site.spec.require_same(base.spec, "the base")
    base_id = statistics_id(base.statistics())
    if base_id not in site.lineage:
        raise DeltaRefused(
            f"the site anchor was not made from this base by adding images (base statistics id "
            f"{base_id[:16]} is not in its lineage): export against the anchor the site started "
            "from, and note that an update with --forgetting starts a new lineage"
        )
    base_statistics = base.statistics()
    added = {}
    for name, moments in site.statistics().items():
        difference = subtract(moments, base_statistics[name]) if name in base_statistics else moments.copy()
        if difference.n:
            added[name] = difference
    n_real = added["backbone"].n if "backbone" in added else 0
    if n_real < min_count:
        raise DeltaRefused(
            f"the site added {n_real} real images since the base; a delta must summarise at least "
            f"{min_count} (--min_count), because the means and covariances of a few images can "
            "reveal those images' features. Add more images first"
        )
    rng = rng or np.random.default_rng()
    factors, kept = {}, {}
    for name, moments in added.items():
        if noise:
            symmetric = rng.normal(scale=noise, size=moments.m2.shape)
            moments.m2 = moments.m2 + (symmetric + symmetric.T) / np.sqrt(2)
            moments.mean = moments.mean + rng.normal(scale=noise / moments.n, size=moments.dim)
        if rank is not None and rank < moments.dim:
            eigenvalues, vectors = np.linalg.eigh(moments.m2)
            top = eigenvalues[::-1][:rank].clip(min=0.0)
            factors[name] = vectors[:, ::-1][:, :rank] * np.sqrt(top)
            moments.m2 = factors[name] @ factors[name].T
            kept[name] = float(top.sum() / max(eigenvalues.clip(min=0.0).sum(), 1e-300))
    return Delta(
        site.spec,
        site.forensic.level_names,
        base_id,
        statistics_id(site.statistics()),
        added,
        min_count,
        float(noise),
        factors,
        kept,
    )


def delta_to_bytes(delta: Delta) -> bytes:
    tensors: dict[str, np.ndarray] = {}
    for name, moments in delta.statistics.items():
        tensors[f"delta.{name}.mean"] = moments.mean
        if name in delta.factors:
            tensors[f"delta.{name}.factor"] = delta.factors[name]
        else:
            tensors[f"delta.{name}.m2"] = moments.m2
    metadata = {
        **delta.spec.to_dict(),
        "forensic_level_names": list(delta.level_names),
        "base": delta.base_id,
        "site": delta.site_id,
        "counts": {name: moments.n for name, moments in delta.statistics.items()},
        "min_count": delta.min_count,
        "noise_sigma": delta.noise,
        "ranks": {name: factor.shape[1] for name, factor in delta.factors.items()},
        "kept_energy": delta.kept_energy,
    }
    return checked_file.pack(tensors, metadata, METADATA_KEY, FORMAT_VERSION)


def delta_from_bytes(data: bytes) -> Delta:
    tensors, metadata = checked_file.unpack(data, METADATA_KEY, FORMAT_VERSION, "delta", DeltaFileError)
    statistics, factors = {}, {}
    for name, n in metadata["counts"].items():
        if f"delta.{name}.factor" in tensors:
            factors[name] = tensors[f"delta.{name}.factor"]
            m2 = factors[name] @ factors[name].T
        else:
            m2 = tensors[f"delta.{name}.m2"]
        statistics[name] = Moments.from_arrays(n, tensors[f"delta.{name}.mean"], m2)
    return Delta(
        FeatureSpec.from_dict(metadata),
        tuple(metadata["forensic_level_names"]),
        metadata["base"],
        metadata["site"],
        statistics,
        metadata["min_count"],
        metadata["noise_sigma"],
        factors,
        dict(metadata["kept_energy"]),
    )


def merge(base: Anchor, deltas: list[Delta]) -> Anchor:
    """``base`` with every delta merged in (Chan's merge, in the order given; the result does
    not depend on it beyond rounding), calibrated again on the base's held-out images. Every
    delta is checked before anything is merged."""
    base_id = statistics_id(base.statistics())
    sites = set()
    for i, delta in enumerate(deltas, 1):
        try:
            base.spec.require_same(delta.spec, f"delta {i}")
        except IncompatibleAnchorError as error:
            raise DeltaRefused(f"delta {i} comes from other features than the base:\n{error}") from None
        if delta.level_names != base.forensic.level_names:
            raise DeltaRefused(
                f"delta {i} models the forensic levels {list(delta.level_names)}, "
                f"the base {list(base.forensic.level_names)}"
            )
        if delta.base_id != base_id:
            raise DeltaRefused(
                f"delta {i} was exported against another base (statistics id "
                f"{delta.base_id[:16]}, this base {base_id[:16]}): merge it into the "
                "anchor it was exported against"
            )
        if delta.site_id in sites:
            raise DeltaRefused(
                f"delta {i} repeats a site's delta already given: it would count its images twice"
            )
        sites.add(delta.site_id)
    statistics = base.statistics()
    for delta in deltas:
        statistics = merged_statistics(statistics, delta.statistics)
    return recalibrated(base, statistics, None, base.lineage + (base_id,))
