"""Federation (docs/METHOD.md §9.4): a site exports what it learned since a common base as a
*delta* of its sufficient statistics - per named statistic (backbone part, forensic levels,
flagged generators) the count, mean and M2 of the images it added, or a low-rank factor of that
M2 - and a coordinator merges deltas into the base with Chan's merge, the CombineFn's own.
Images and per-image features never leave a site; the held-out images a site keeps for its own
calibration are not in its delta.

The delta file is a checked file like the anchor (safetensors + JSON + sha256, never pickled):
tensors ``delta.<name>.mean`` and ``delta.<name>.m2`` or ``delta.<name>.factor``; metadata the
feature spec, the forensic levels, the base's and the site's statistics ids and the site's
lineage since the base, the counts, the minimum count it was checked against, the noise scale,
the ranks and, when signed, the signer's key fingerprint and the signature of the checksum
(anchors/signing.py). Every number is checked as it is read (anchors/validation.py), and a merge
refuses a delta whose statistics, or whose site's images, the base already holds.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from anchorscan.anchors import channels, checked_file, signing
from anchorscan.anchors.anchor import GENERATOR_NAME, Anchor
from anchorscan.anchors.anchor_file import statistics_id
from anchorscan.anchors.calibration import CALIBRATION_PREFIX
from anchorscan.anchors.errors import UserError
from anchorscan.anchors.spec import FeatureSpec, IncompatibleAnchorError
from anchorscan.anchors.stats import Moments
from anchorscan.anchors.updating import merged_statistics, recalibrated
from anchorscan.anchors.validation import (
    check,
    check_array,
    check_count,
    check_moments,
    distinct_names,
    field,
    present,
)

FORMAT_VERSION = 2  # 2: the site's lineage since the base, signatures
METADATA_KEY = "anchorscan_delta"
MIN_COUNT = 64
# A merged delta's content id in the merged anchor's lineage, apart from anchors' statistics ids.
DELTA_PREFIX = "delta:"
STATISTICS_ID = re.compile(r"^[0-9a-f]{64}$")


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
    # The statistics ids of the site's anchors since the base, oldest first, ending with the site's.
    site_lineage: tuple[str, ...] = ()
    signer: str | None = None  # the signing key's fingerprint
    signature: str | None = None
    checksum: str | None = None  # the file's, as read

    @property
    def n(self) -> float:
        return channels.real_count(self.statistics)

    @property
    def content_id(self) -> str:
        """What the delta adds, by content: the statistics id of its statistics (not the site id
        it claims), so the same statistics under another name are recognised."""
        return statistics_id(self.statistics)


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
    n_real = channels.real_count(added)
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
        low_rank = rank is not None and rank < moments.dim
        if noise or low_rank:
            eigenvalues, vectors = np.linalg.eigh(moments.m2)
            # Noise leaves M2 indefinite; a scatter matrix is not: keep its positive part.
            positive = eigenvalues.clip(min=0.0)
            if low_rank:
                top = positive[::-1][:rank]
                factors[name] = vectors[:, ::-1][:, :rank] * np.sqrt(top)
                moments.m2 = factors[name] @ factors[name].T
                kept[name] = float(top.sum() / max(positive.sum(), 1e-300))
            else:
                moments.m2 = (vectors * positive) @ vectors.T
                moments.m2 = (moments.m2 + moments.m2.T) / 2
    site_id = statistics_id(site.statistics())
    # The anchors the site made since the base; its calibrations added no images.
    since = tuple(
        entry
        for entry in site.lineage[site.lineage.index(base_id) + 1 :]
        if not entry.startswith(CALIBRATION_PREFIX)
    )
    return Delta(
        site.spec,
        site.forensic.level_names,
        base_id,
        site_id,
        added,
        min_count,
        float(noise),
        factors,
        kept,
        tuple(entry for entry in since if not entry.startswith(DELTA_PREFIX)) + (site_id,),
    )


def delta_to_bytes(delta: Delta, signer: signing.Signer | None = None) -> bytes:
    """The delta file; with ``signer``, its fingerprint in the metadata and the signature of the
    checksum beside it."""
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
        "site_lineage": list(delta.site_lineage),
        "counts": {name: moments.n for name, moments in delta.statistics.items()},
        "min_count": delta.min_count,
        "noise_sigma": delta.noise,
        "ranks": {name: factor.shape[1] for name, factor in delta.factors.items()},
        "kept_energy": delta.kept_energy,
    }
    if signer is not None:
        metadata["signer"] = signer.fingerprint
    return checked_file.pack(
        tensors, metadata, METADATA_KEY, FORMAT_VERSION, signer.sign if signer is not None else None
    )


def delta_from_bytes(data: bytes, source: str | None = None) -> Delta:
    """The delta a file holds, every number checked as it enters (anchors/validation.py):
    refused with DeltaFileError, naming ``source``, where a value is not finite, a count not a
    whole positive number below 2**53 (a forensic level's not the backbone's), an M2 not
    symmetric positive semi-definite, a shape not the spec's."""
    what = checked_file.named("delta", source)
    error = DeltaFileError
    tensors, metadata = checked_file.unpack(data, METADATA_KEY, FORMAT_VERSION, "delta", error, source)
    spec = FeatureSpec.checked(metadata, error, what)
    levels = distinct_names(metadata, "forensic_level_names", error, what)
    ids = {key: field(metadata, key, str, error, what) for key in ("base", "site")}
    lineage = field(metadata, "site_lineage", list, error, what)
    check(
        all(isinstance(entry, str) and STATISTICS_ID.match(entry) for entry in [*ids.values(), *lineage])
        and lineage[-1:] == [ids["site"]],
        error,
        f"{what}: its base, site and site lineage are not statistics ids ending with the site's",
    )
    counts = field(metadata, "counts", dict, error, what)
    widths = channels.statistic_widths(spec, levels)
    required = set(widths)
    for name in counts:
        generator = name[len(channels.FLAG_STATISTIC) :]
        if name.startswith(channels.FLAG_STATISTIC) and GENERATOR_NAME.match(generator):
            widths.setdefault(name, spec.dim)
    check(
        set(counts) <= set(widths) and required <= set(counts),
        error,
        f"{what}: statistics {sorted(counts)}: a delta holds backbone, forensic.<level> for each of "
        f"{levels} and flag.<generator> statistics",
    )
    min_count = field(metadata, "min_count", int, error, what)
    check(min_count >= 1, error, f"{what}: min_count {min_count} is not a positive count")
    noise = field(metadata, "noise_sigma", (int, float), error, what)
    check(math.isfinite(noise) and noise >= 0, error, f"{what}: noise_sigma {noise!r} is not a scale")
    ranks = field(metadata, "ranks", dict, error, what)
    kept = field(metadata, "kept_energy", dict, error, what)
    check(
        set(kept) == set(ranks) <= set(counts), error, f"{what}: ranks and kept_energy name other statistics"
    )
    statistics, factors = {}, {}
    for name, n in counts.items():
        label = f"{what}: statistic {name}"
        check_count(label, n, error)
        mean = present(tensors.get(f"delta.{name}.mean"), error, f"{label}: its mean is missing")
        if name in ranks:
            rank = field(ranks, name, int, error, f"{what} ranks")
            check(1 <= rank < widths[name], error, f"{label}: rank {rank} is not below its dimension")
            energy = field(kept, name, (int, float), error, f"{what} kept_energy")
            check(0 <= energy <= 1, error, f"{label}: kept energy {energy!r} is not a share")
            factor = present(tensors.get(f"delta.{name}.factor"), error, f"{label}: its factor is missing")
            check_array(f"{label} factor", factor, (widths[name], rank), error)
            check_array(f"{label} mean", mean, (widths[name],), error)
            factors[name] = factor
            m2 = factor @ factor.T  # positive semi-definite by construction
        else:
            m2 = present(tensors.get(f"delta.{name}.m2"), error, f"{label}: its M2 is missing")
            check_moments(label, n, mean, m2, widths[name], error)
        statistics[name] = Moments.from_arrays(n, mean, m2)
    channels.check_level_counts(counts, levels, error, what)
    expected = {f"delta.{name}.{'factor' if name in ranks else 'm2'}" for name in counts}
    expected |= {f"delta.{name}.mean" for name in counts}
    check(set(tensors) == expected, error, f"{what}: unexpected tensors {sorted(set(tensors) - expected)}")
    signer = metadata.get("signer")
    signature = metadata.get("signature")
    check(
        (signer is None) == (signature is None)
        and (signer is None or (isinstance(signer, str) and isinstance(signature, str))),
        error,
        f"{what}: a signature needs its signer's fingerprint and the other way round",
    )
    return Delta(
        spec,
        tuple(levels),
        ids["base"],
        ids["site"],
        statistics,
        min_count,
        float(noise),
        factors,
        {name: float(value) for name, value in kept.items()},
        tuple(lineage),
        signer,
        signature,
        metadata["checksum"],
    )


def check_signatures(deltas: list[Delta], trusted: dict | None, names: list[str]) -> list[str]:
    """With ``trusted`` (public keys by fingerprint, ``merge --trust``): refuses a delta that is
    unsigned, signed by a key not among them, or whose signature does not verify. Without:
    warnings that say what merging unverified deltas means."""
    if trusted is None:
        unsigned = [name for delta, name in zip(deltas, names) if delta.signature is None]
        signed = [name for delta, name in zip(deltas, names) if delta.signature is not None]
        warnings = []
        if unsigned:
            warnings.append(
                f"merging unsigned deltas ({', '.join(unsigned)}): their checksums show they are intact, "
                "not who wrote them; anyone could have made them. Enrol sites' keys (anchorscan "
                "keygen, export-delta --sign) and merge with --trust"
            )
        if signed:
            warnings.append(
                f"signatures not checked ({', '.join(signed)}): give --trust DIR with the sites' "
                "public keys to accept only enrolled sites"
            )
        return warnings
    for delta, name in zip(deltas, names):
        if delta.signature is None or delta.signer is None:
            raise DeltaRefused(
                f"{name} is not signed: with --trust only deltas signed by an enrolled site are "
                "merged (the site runs export-delta --sign SITE.key)"
            )
        if delta.signer not in trusted:
            raise DeltaRefused(
                f"{name} is signed by key {delta.signer[:16]}, which is not among the --trust keys: "
                "enrol the site's .pub file if it is one of yours"
            )
        if delta.checksum is None or not signing.verifies(
            trusted[delta.signer], delta.checksum, delta.signature
        ):
            raise DeltaRefused(
                f"{name}: its signature does not verify under the key of {delta.signer[:16]}: the "
                "delta was changed after it was signed"
            )
    return []


def merge(base: Anchor, deltas: list[Delta], names: list[str] | None = None) -> Anchor:
    """``base`` with every delta merged in (Chan's merge, in the order given; the result does
    not depend on it beyond rounding), calibrated again on the base's held-out images. Every
    delta is checked before anything is merged: the same features and forensic levels; exported
    against the base or an anchor it descends from; its count at least its own minimum; its
    statistics (by content) and its site's images not already in the base nor in another of
    ``deltas``. The result's lineage records what was merged, so a later merge refuses it too."""
    names = names or [f"delta {i}" for i in range(1, len(deltas) + 1)]
    base_id = statistics_id(base.statistics())
    held = {base_id, *(entry for entry in base.lineage if not entry.startswith(DELTA_PREFIX))}
    merged_contents = {entry for entry in base.lineage if entry.startswith(DELTA_PREFIX)}
    for delta, name in zip(deltas, names):
        try:
            base.spec.require_same(delta.spec, name)
        except IncompatibleAnchorError as error:
            raise DeltaRefused(f"{name} comes from other features than the base:\n{error}") from None
        if delta.level_names != base.forensic.level_names:
            raise DeltaRefused(
                f"{name} models the forensic levels {list(delta.level_names)}, "
                f"the base {list(base.forensic.level_names)}"
            )
        if delta.base_id not in held:
            raise DeltaRefused(
                f"{name} was exported against another base (statistics id "
                f"{delta.base_id[:16]}, this base {base_id[:16]}): merge it into the "
                "anchor it was exported against or one made from it"
            )
        if delta.n < delta.min_count:
            raise DeltaRefused(
                f"{name} summarises {delta.n} real images, below its own minimum count "
                f"{delta.min_count}: it was not made by export-delta; ask the site for a new one"
            )
        content = DELTA_PREFIX + delta.content_id
        if content in merged_contents:
            raise DeltaRefused(
                f"{name} holds statistics already merged (content id {delta.content_id[:16]}, "
                "whatever site it names): merging it again would count its images twice"
            )
        overlap = sorted(set(delta.site_lineage) & held)
        if overlap:
            raise DeltaRefused(
                f"{name} holds images the base already has (site anchor {overlap[0][:16]} was merged "
                "before, or the base was made from it): merging it would count them twice; the site "
                "should export only what it added since, with --since that anchor"
            )
        merged_contents.add(content)
        held.update(delta.site_lineage)
    statistics = base.statistics()
    for delta in deltas:
        statistics = merged_statistics(statistics, delta.statistics)
    lineage = base.lineage + (base_id,)
    for delta in deltas:
        lineage += (*delta.site_lineage, DELTA_PREFIX + delta.content_id)
    try:
        return recalibrated(base, statistics, None, lineage)
    except (np.linalg.LinAlgError, ValueError) as problem:
        raise DeltaRefused(f"the merged statistics do not give a model ({problem})") from None
