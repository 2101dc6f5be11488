"""The anchor: models of real images' features, and the distances scored against them.

The backbone's part is fitted in closed form from the merged moments (docs/METHOD.md §4): the
semantic distance is the largest standardised deviation of any semantic feature (it needs only
each feature's mean and variance, so it keeps its meaning with fewer images than features),
the shrunk covariance gives the statistical deviation
decoupled from content by regression on the semantic part (its covariance is the Schur
complement), scored with a PPCA spectrum (T2 + SPE). The forensic part is a mixture along the
softness path of real photos (``forensic.ForensicModel``, docs/METHOD.md §8). Each channel gets a
p-value against held-out real images; the chosen channels' p-values combine into the score.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import numpy as np

from anchorscan.anchors import channels as registry  # `channels` names the combined ones
from anchorscan.anchors.calibration import (
    COMBINERS,
    MIN_CALIBRATION,
    NUM_QUANTILES,
    CalibrationRows,
    alarm_terms,
    combined_log10,
    sketch,
    tippett_log10,
    upper_tail_log_pvalues,
)
from anchorscan.anchors.constraints import CALIBRATION_FRACTION, EXPLAINED_VARIANCE, FPR
from anchorscan.anchors.errors import NotEnoughImagesError, UsageError
from anchorscan.anchors.forensic import ForensicModel
from anchorscan.anchors.softness import LEVEL_SETS, level_names
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.anchors.stats import Moments

# Distances with a calibration; "statistical" is the decoupled one. Both as the built-in channels
# declare them (the CLI's choices); an anchor asks the registry (anchors/channels.py).
COMPONENTS = registry.components()
CHANNELS = registry.scored()  # what the score can combine
STATISTICAL_MODES = {"decoupled": "statistical", "raw": "statistical_raw"}
CALIBRATION_KEYS = ("phash", "uri")
# How the content alarms are calibrated (docs/METHOD.md §5.4): on all held-out real images, silent
# at softness levels too few of them hold (round 4, the default: the rule of docs/QUALITY.md
# round 5 kept it), or per softness level on the held-out images and their softened copies.
ALARM_CALIBRATIONS = ("held_out", "per_level")
FLAG_PREFIX = "flag:"  # a flagged generator's component: "flag:NAME"
GENERATOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    explained_variance: float = 0.95
    fpr: float = 0.01
    # docs/METHOD.md §5.4, docs/QUALITY.md rounds 3 and 4: every channel; the first is the
    # primary one, the others alarms that join where they fire on their own at alarm_share of
    # the fpr budget (round 4: 0.1, a threshold of 0.001, half as far down the tail model of a
    # few dozen held-out images as round 3's 0.0005)
    combine: str = "alarms"
    statistical: str = "decoupled"
    channels: tuple[str, ...] = ("forensic", "semantic", "statistical")
    forensic_levels: str = "softness_path"
    # the hold-out rule (§5.1), recorded so that `update` holds out new images the same way
    calibration_fraction: float = 0.1
    calibration_group: str | None = None
    # what groups the hold-out without --calibration_group: the picture's perceptual hash (so
    # near-duplicates are held out together), or the URI alone (anchors fitted before phash)
    calibration_key: str = "phash"
    alarm_share: float = 0.1
    alarm_calibration: str = "held_out"

    def __post_init__(self):
        EXPLAINED_VARIANCE.check(self.explained_variance, "--explained_variance")
        FPR.check(self.fpr, "--fpr")  # the bound of fit's flag: one statement of it
        if self.combine not in COMBINERS:
            raise UsageError(f"--combine must be one of {sorted(COMBINERS)}, got {self.combine!r}")
        if self.statistical not in STATISTICAL_MODES:
            raise UsageError(
                f"--statistical must be one of {sorted(STATISTICAL_MODES)}, got {self.statistical!r}"
            )
        object.__setattr__(self, "channels", tuple(self.channels))  # JSON gives a list
        if (
            not self.channels
            or set(self.channels) - set(registry.scored())
            or len(set(self.channels)) < len(self.channels)
        ):
            raise UsageError(
                f"--channels must be distinct names among {', '.join(registry.scored())}, "
                f"got {', '.join(self.channels) or 'none'}"
            )
        CALIBRATION_FRACTION.check(self.calibration_fraction, "--calibration_fraction")
        if not 0.0 < self.alarm_share * (len(self.channels) - 1) < 1.0 and len(self.channels) > 1:
            raise UsageError(
                f"--alarm_share {self.alarm_share} times {len(self.channels) - 1} alarm channels must be "
                "below 1 (the primary channel keeps the rest of the budget)"
            )
        if self.calibration_key not in CALIBRATION_KEYS:
            raise UsageError(
                f"--calibration_key must be one of {', '.join(CALIBRATION_KEYS)}, "
                f"got {self.calibration_key!r}"
            )
        if self.alarm_calibration not in ALARM_CALIBRATIONS:
            raise UsageError(
                f"--alarm_calibration must be one of {', '.join(ALARM_CALIBRATIONS)}, "
                f"got {self.alarm_calibration!r}"
            )
        if self.forensic_levels not in LEVEL_SETS:
            raise UsageError(
                f"--forensic_levels must be one of {', '.join(LEVEL_SETS)}, got {self.forensic_levels!r}"
            )

    @classmethod
    def from_dict(cls, config: dict) -> AnchorConfig:
        """The configuration an anchor file records; one written before the perceptual-hash
        hold-out held out by URI, and keeps doing so when updated."""
        return cls(**{"calibration_key": "uri", **config})

    @property
    def threshold(self) -> float:
        """The score (-log10 p) above which an image is suspect: p below the false-positive rate."""
        return -math.log10(self.fpr)


def oas_shrinkage(covariance: np.ndarray, n: float) -> float:
    """Oracle Approximating Shrinkage coefficient toward ``trace/d * I`` (Chen et al. 2010),
    in the form scikit-learn uses."""
    d = covariance.shape[0]
    mu = np.trace(covariance) / d
    alpha = np.mean(covariance**2)
    numerator = alpha + mu**2
    denominator = (n + 1.0) * (alpha - mu**2 / d)
    return 1.0 if denominator == 0 else float(min(numerator / denominator, 1.0))


def feature_scale(moments: Moments) -> np.ndarray:
    """Each feature's standard deviation, floored so that a constant feature cannot divide by 0."""
    variances = np.diag(moments.covariance())
    return np.sqrt(np.maximum(variances, 1e-12 * max(variances.max(), 1e-300)))


def shrunk_covariance(moments: Moments) -> tuple[np.ndarray, float]:
    """OAS on the correlation scale, so that features with a large variance do not set the
    target for all others; returns the shrunk covariance and the coefficient. Hand-written:
    scikit-learn's OAS shrinks the covariance itself and needs the rows, not merged moments."""
    covariance = moments.covariance()
    scale = feature_scale(moments)
    correlation = covariance / np.outer(scale, scale)
    shrinkage = oas_shrinkage(correlation, moments.n)
    shrunk = (1.0 - shrinkage) * correlation
    shrunk[np.diag_indices_from(shrunk)] += shrinkage * np.trace(correlation) / len(scale)
    return shrunk * np.outer(scale, scale), shrinkage


@dataclasses.dataclass
class Spectrum:
    """PPCA distance: top-k eigenpairs kept, the tail replaced by its mean variance ``tau``."""

    components: np.ndarray  # (p, k)
    eigenvalues: np.ndarray  # (k,)
    tau: float

    @classmethod
    def fit(cls, covariance: np.ndarray, explained_variance: float, max_rank: int) -> Spectrum:
        eigenvalues, vectors = np.linalg.eigh((covariance + covariance.T) / 2)
        eigenvalues, vectors = eigenvalues[::-1].clip(min=0.0), vectors[:, ::-1]
        p = len(eigenvalues)
        cumulative = np.cumsum(eigenvalues) / max(eigenvalues.sum(), 1e-300)
        k = int(np.searchsorted(cumulative, explained_variance - 1e-12) + 1)
        k = max(1, min(k, max_rank, p - 1)) if p > 1 else 1
        tail = eigenvalues[k:]
        floor = 1e-12 * max(eigenvalues[0], 1e-300)
        tau = float(max(tail.mean(), floor)) if tail.size else floor
        return cls(vectors[:, :k], np.maximum(eigenvalues[:k], floor), tau)

    @property
    def k(self) -> int:
        return self.eigenvalues.shape[0]

    def distances(self, residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (T2, SPE) for rows of residuals."""
        projected = residuals @ self.components
        t2 = (projected**2 / self.eigenvalues).sum(axis=1)
        tail_energy = np.maximum((residuals**2).sum(axis=1) - (projected**2).sum(axis=1), 0.0)
        return t2, tail_energy / self.tau


@dataclasses.dataclass
class AnchorModel:
    """Precomputed whitening for batched scoring; fitted from moments, nothing inverted per image."""

    mean: np.ndarray
    d_semantic: int
    semantic_scale: np.ndarray  # (d_s,): D_sem = max_i |s_i - mu_i| / scale_i
    regression: np.ndarray  # (d_s, d_m): m residual = (m - mu_m) - (s - mu_s) B
    decoupled: Spectrum
    raw: Spectrum
    shrinkage: float

    @classmethod
    def fit(cls, moments: Moments, d_semantic: int, explained_variance: float = 0.95) -> AnchorModel:
        if moments.n < 3:
            raise NotEnoughImagesError(
                f"an anchor needs at least 3 real images, got {moments.n}: add real images"
            )
        if not 0 < d_semantic < moments.dim:
            raise ValueError(f"d_semantic={d_semantic} must lie in (0, {moments.dim})")
        sigma, shrinkage = shrunk_covariance(moments)
        s, m = slice(0, d_semantic), slice(d_semantic, moments.dim)
        sigma_ss, sigma_sm, sigma_mm = sigma[s, s], sigma[s, m], sigma[m, m]

        regression = np.linalg.solve(sigma_ss, sigma_sm)  # B^T
        schur = sigma_mm - sigma_sm.T @ regression
        max_rank = int(moments.n) - 1
        return cls(
            mean=moments.mean.copy(),
            d_semantic=d_semantic,
            semantic_scale=feature_scale(moments)[s],
            regression=regression,
            decoupled=Spectrum.fit(schur, explained_variance, max_rank),
            raw=Spectrum.fit(sigma_mm, explained_variance, max_rank),
            shrinkage=shrinkage,
        )

    def distances(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """All distances for a (b, d) batch; higher is further from the real images."""
        centred = np.atleast_2d(np.asarray(features, dtype=np.float64)) - self.mean
        semantic, statistical = centred[:, : self.d_semantic], centred[:, self.d_semantic :]
        residual = statistical - semantic @ self.regression
        t2, spe = self.decoupled.distances(residual)
        raw_t2, raw_spe = self.raw.distances(statistical)
        return {
            "semantic": np.abs(semantic / self.semantic_scale).max(axis=1),
            "statistical": t2 + spe,
            "t2": t2,
            "spe": spe,
            "statistical_raw": raw_t2 + raw_spe,
        }


class FlaggedClass:
    """A generator flagged from a few of its images (docs/METHOD.md §9.3): Fisher's discriminant
    between the real images and this class, both sharing the pooled within-class covariance,
    per block: the backbone part's OAS-shrunk (§4.1) and the forensic part's sharp level, plain
    with the forensic model's ridge (§8.3). The blocks' covariances are taken as independent
    (the anchor keeps no cross-moments between them), so the log-odds is their sum."""

    def __init__(self, real_backbone: Moments, real_forensic: Moments, fake: Moments):
        split = real_backbone.dim
        if fake.dim != split + real_forensic.dim:
            raise ValueError(
                f"flagged moments have dimension {fake.dim}, the features {split + real_forensic.dim}"
            )
        if fake.n < 2:
            raise NotEnoughImagesError(f"a flagged generator needs at least 2 images, got {fake.n}")
        weights = []
        for block, real in ((slice(0, split), real_backbone), (slice(split, fake.dim), real_forensic)):
            pooled = Moments.from_arrays(
                real.n + fake.n - 1, np.zeros(real.dim), real.m2 + fake.m2[block, block]
            )
            if block.start == 0:
                covariance, _ = shrunk_covariance(pooled)
            else:
                covariance = pooled.covariance()
                covariance = covariance + ForensicModel.RIDGE * np.trace(covariance) / len(
                    covariance
                ) * np.eye(len(covariance))
            weights.append(np.linalg.solve(covariance, fake.mean[block] - real.mean))
        self.weights = np.concatenate(weights)
        real_mean = np.concatenate([real_backbone.mean, real_forensic.mean])
        self.bias = float(np.log(fake.n / real_backbone.n) - self.weights @ (fake.mean + real_mean) / 2)

    def log_odds(self, features: np.ndarray) -> np.ndarray:
        """Gaussian log-odds of this generator against real images (the fitting set's priors)."""
        return features @ self.weights + self.bias


@dataclasses.dataclass
class Anchor:
    """A fitted, calibrated anchor: what `fit` writes and `score` reads. ``moments`` are the
    backbone part's sufficient statistics; ``forensic`` holds the pixel channel's own;
    ``flagged`` the moments of each flagged generator's images (full scoring features, §9.3).
    ``calibration_rows`` are the held-out real images' features that the sketches were taken
    on (§5.1), so that an update or merge can calibrate again; ``lineage`` the statistics ids of
    the anchors this one was made from by adding images (§9.4)."""

    spec: FeatureSpec
    moments: Moments
    forensic: ForensicModel
    config: AnchorConfig
    calibration: dict[str, np.ndarray]  # component -> quantile sketch on held-out real images
    n_calibration: int
    flagged: dict[str, Moments] = dataclasses.field(default_factory=dict)
    calibration_rows: CalibrationRows | None = dataclasses.field(default=None, repr=False)
    lineage: tuple[str, ...] = ()
    # the moments of each channel registered beyond the backbone and forensic ones, by name
    added: dict[str, Moments] = dataclasses.field(default_factory=dict)
    # Derived from the statistics in __post_init__ unless given (dataclasses.replace passes them
    # on, so recalibrating does not derive them again): never None after construction.
    model: AnchorModel = dataclasses.field(default=None, repr=False)  # type: ignore[assignment]
    flag_models: dict[str, FlaggedClass] = dataclasses.field(default=None, repr=False)  # type: ignore[arg-type]
    added_models: dict[str, registry.ChannelModel] = dataclasses.field(default=None, repr=False)  # type: ignore[arg-type]

    def __post_init__(self):
        if self.moments.dim != self.spec.d_backbone:
            raise ValueError(
                f"moments have dimension {self.moments.dim}, the backbone's part of "
                f"the features {self.spec.d_backbone}"
            )
        if self.forensic.dim != self.spec.d_forensic:
            raise ValueError(
                f"the forensic model has dimension {self.forensic.dim}, the features {self.spec.d_forensic}"
            )
        for name in self.flagged:
            if not GENERATOR_NAME.match(name):
                raise ValueError(f"generator name {name!r}: use letters, digits, '_', '.', '-'")
        expected = {channel.name for channel in registry.added()}
        if set(self.added) != expected:
            raise ValueError(f"statistics of channels {sorted(self.added)}, registered {sorted(expected)}")
        for channel in registry.added():
            if channel.fit is None:
                raise ValueError(f"channel {channel.name} declares no model to fit")
            if self.added[channel.name].dim != channel.width(self.spec):
                raise ValueError(
                    f"channel {channel.name} has dimension {self.added[channel.name].dim}, "
                    f"its features {channel.width(self.spec)}"
                )
        missing = set(self.components) - set(self.calibration)
        if missing:
            raise ValueError(f"calibration lacks {sorted(missing)}")
        self.lineage = tuple(self.lineage)
        if self.model is None:
            self.model = AnchorModel.fit(self.moments, self.spec.d_semantic, self.config.explained_variance)
        if self.flag_models is None:
            self.flag_models = {
                name: FlaggedClass(self.moments, self.forensic.moments[0], fake)
                for name, fake in sorted(self.flagged.items())
            }
        if self.added_models is None:
            self.added_models = {
                channel.name: channel.fit(self.added[channel.name]) for channel in registry.added()
            }

    @property
    def components(self) -> tuple[str, ...]:
        """Every calibrated distance: the channels' and one per flagged generator."""
        return registry.components() + tuple(FLAG_PREFIX + name for name in sorted(self.flagged))

    @classmethod
    def uncalibrated(
        cls,
        spec: FeatureSpec,
        moments: Moments,
        forensic: ForensicModel,
        config: AnchorConfig,
        flagged: dict[str, Moments] | None = None,
        lineage: tuple[str, ...] = (),
        added: dict[str, Moments] | None = None,
    ) -> Anchor:
        """The fitted models, to score the held-out real images that will calibrate them."""
        flagged = dict(flagged or {})
        names = registry.components() + tuple(FLAG_PREFIX + name for name in flagged)
        calibration = {name: np.zeros(1) for name in names}
        return cls(spec, moments, forensic, config, calibration, 0, flagged, None, lineage, dict(added or {}))

    def calibrated(self, sketches: dict[str, np.ndarray], n_calibration: int) -> Anchor:
        return dataclasses.replace(
            self,
            calibration={name: np.asarray(sketches[name]) for name in self.components},
            n_calibration=n_calibration,
        )

    def calibrated_on(self, rows: CalibrationRows, num_quantiles: int = NUM_QUANTILES) -> Anchor:
        """Calibrated on the held-out rows: every component's exact quantile sketch (§5.2)."""
        distances = self.distances(rows.features)
        anchor = self.calibrated(
            {name: sketch(distances[name], num_quantiles) for name in self.components}, len(rows)
        )
        anchor.calibration_rows = rows
        return anchor

    @classmethod
    def fit(
        cls,
        spec: FeatureSpec,
        moments: Moments,
        forensic: ForensicModel,
        calibration_features: np.ndarray,
        config: AnchorConfig = AnchorConfig(),
        num_quantiles: int = NUM_QUANTILES,
        calibration_keys: np.ndarray | None = None,
        flagged: dict[str, Moments] | None = None,
    ) -> Anchor:
        """In-memory fit; the pipeline does the same with Beam's combiners. Without keys the
        calibration rows are numbered in order."""
        keys = np.arange(len(calibration_features)) if calibration_keys is None else calibration_keys
        return cls.uncalibrated(spec, moments, forensic, config, flagged).calibrated_on(
            CalibrationRows.merged([CalibrationRows(keys, calibration_features)]), num_quantiles
        )

    def statistics(self) -> dict[str, Moments]:
        """Every sufficient statistic by name: what update, merge and federation add up, the
        same way for every channel (§9)."""
        named = {registry.COUNTING: self.moments}
        levels = registry.FORENSIC.statistic_names(self.forensic.level_names)
        named.update(zip(levels, self.forensic.moments, strict=True))
        named.update({channel.name: self.added[channel.name] for channel in registry.added()})
        named.update(
            {registry.flag_statistic(name): moments for name, moments in sorted(self.flagged.items())}
        )
        return named

    def with_statistics(self, statistics: dict[str, Moments], lineage: tuple[str, ...]) -> Anchor:
        """An uncalibrated anchor of the same spec and configuration on other statistics (as
        ``statistics`` names them); its models are derived from them afresh."""
        return Anchor.from_statistics(self.spec, self.config, statistics, lineage, self.forensic.level_names)

    @classmethod
    def from_statistics(
        cls,
        spec: FeatureSpec,
        config: AnchorConfig,
        statistics: dict[str, Moments],
        lineage: tuple[str, ...] = (),
        levels: tuple[str, ...] | None = None,
    ) -> Anchor:
        """An uncalibrated anchor on named statistics: each registered channel's (``backbone``,
        ``forensic.<level>`` for each of ``levels``, default: the configuration's level set) and
        ``flag.<generator>``."""
        levels = levels or level_names(config.forensic_levels)
        known = set(registry.statistic_widths(spec, levels))
        flagged = registry.flagged(statistics)
        unknown = set(statistics) - known - {registry.flag_statistic(name) for name in flagged}
        if unknown or known - set(statistics):
            raise ValueError(
                f"statistics {sorted(statistics)} do not fit this anchor's channels {sorted(known)}"
            )
        forensic = ForensicModel(
            levels, [statistics[name] for name in registry.FORENSIC.statistic_names(levels)]
        )
        added = {channel.name: statistics[channel.name] for channel in registry.added()}
        return cls.uncalibrated(
            spec, statistics[registry.COUNTING], forensic, config, flagged, lineage, added
        )

    def distances(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Every component's distance for (b, spec.dim) feature rows, and ``softness_level``:
        the index of the forensic level that explains each image best (0 = sharp)."""
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if features.shape[1] != self.spec.dim:
            raise ValueError(f"features have {features.shape[1]} columns, the anchor's spec {self.spec.dim}")
        result = self.model.distances(features[:, : self.spec.d_backbone])
        result["forensic"], result["softness_level"] = self.forensic.distances(
            features[:, self.spec.d_backbone :]
        )
        for channel in registry.added():
            start, stop = channel.columns(self.spec)
            result.update(self.added_models[channel.name].distances(features[:, start:stop]))
        for name, flagged in self.flag_models.items():
            result[FLAG_PREFIX + name] = flagged.log_odds(features)
        return result

    @functools.cached_property
    def level_calibration(self) -> dict[int, tuple[dict[str, np.ndarray], int]] | None:
        """The content channels' calibration per softness level (docs/METHOD.md §5.4): for each
        level the forensic channel gives at least MIN_CALIBRATION held-out real images or their
        softened copies, the quantile sketches of the distances calibrated per level
        (``Channel.per_level``: the content channels') on them and
        their count (each photo once per level: its first row there). None unless the anchor
        is configured so (``alarm_calibration``) and keeps softened copies (`calibrate` without
        --keep_held_out replaces them)."""
        rows = self.calibration_rows
        if self.config.alarm_calibration != "per_level" or rows is None or rows.softened is None:
            return None
        copies = rows.softened.features.reshape(-1, self.spec.dim)
        features = np.vstack([rows.features, copies])
        photos = np.concatenate([rows.keys, np.repeat(rows.softened.keys, len(copies) // len(rows.softened))])
        distances = self.distances(features)
        levels = distances["softness_level"]
        _, first = np.unique(np.stack([photos, levels.astype(np.uint64)], 1), axis=0, return_index=True)
        once = np.zeros(len(photos), bool)
        once[first] = True
        num_quantiles = len(self.calibration["semantic"])
        calibration = {}
        for level in range(len(self.forensic.level_names)):
            chosen = once & (levels == level)
            if chosen.sum() >= MIN_CALIBRATION:
                sketches = {
                    name: sketch(distances[name][chosen], num_quantiles)
                    for name in registry.level_calibrated()
                }
                calibration[level] = (sketches, int(chosen.sum()))
        return calibration

    @functools.cached_property
    def alarm_levels(self) -> np.ndarray:
        """Which softness levels the alarms speak for (docs/METHOD.md §5.4): those with a
        calibration of their own (``level_calibration``); without softened copies, those the
        forensic channel gives at least MIN_CALIBRATION of the held-out real images. An alarm's
        p-value is calibrated on those images; a soft photo at a level they barely hold (a
        blurred or upscaled thumbnail) shifts the backbone's embedding in a way the calibration
        never saw, so there the alarms stay silent. Every level where the held-out rows are not
        kept."""
        count = len(self.forensic.level_names)
        if self.calibration_rows is None:
            return np.ones(count, dtype=bool)
        if self.level_calibration is not None:
            return np.isin(np.arange(count), list(self.level_calibration))
        _, levels = self.forensic.distances(self.calibration_rows.features[:, self.spec.d_backbone :])
        return np.bincount(levels, minlength=count) >= MIN_CALIBRATION

    def channel_log_pvalues(self, result: dict[str, np.ndarray], component: str) -> np.ndarray:
        """log p of one component's distances in ``result``: against the held-out real images at
        the image's softness level where the anchor has that level's calibration, else against
        all of them."""
        log_p = upper_tail_log_pvalues(result[component], self.calibration[component], self.n_calibration)
        if component in registry.level_calibrated() and self.level_calibration:
            for level, (sketches, n) in self.level_calibration.items():
                at = result["softness_level"] == level
                if at.any():
                    log_p[at] = upper_tail_log_pvalues(result[component][at], sketches[component], n)
        return log_p

    def assess(
        self,
        features: np.ndarray,
        combine: str | None = None,
        statistical: str | None = None,
        channels: tuple[str, ...] | None = None,
    ) -> dict[str, np.ndarray]:
        """Distances, their p-values against real images, the combined score and the verdict.
        Flagged generators that fire join the channels' combined p-value by Tippett's rule
        (§9.3), and ``component`` names the channel or flagged generator with the smallest
        p-value."""
        config = dataclasses.replace(
            self.config,
            combine=combine or self.config.combine,
            statistical=statistical or self.config.statistical,
            channels=channels or self.config.channels,
        )  # validated
        result = self.distances(features)
        scored = registry.scored()
        component = {name: name for name in scored} | {"statistical": STATISTICAL_MODES[config.statistical]}
        log_p = {channel: self.channel_log_pvalues(result, component[channel]) for channel in scored}
        channel_log_p = np.stack([log_p[c] for c in config.channels], axis=1)
        if config.combine == "alarms":  # silent alarms: p = 1 where they do not speak
            outside = ~self.alarm_levels[result["softness_level"]]
            channel_log_p[:, 1:] = np.where(outside[:, None], 0.0, channel_log_p[:, 1:])
        score = combined_log10(channel_log_p, config.combine, config.fpr, config.alarm_share)
        # What fired: the candidate with the smallest p-value as the rule weighs it.
        ranked = (
            alarm_terms(channel_log_p, config.fpr, config.alarm_share)
            if config.combine == "alarms"
            else channel_log_p
        )
        candidates = list(config.channels)
        if self.flag_models:
            # A flagged generator joins only where it fires on its own (its Sidak-corrected
            # p-value below fpr), so on real images it moves at most that share of scores (§9.3).
            flags = [FLAG_PREFIX + name for name in self.flag_models]
            flag_log_p = {
                flag: upper_tail_log_pvalues(result[flag], self.calibration[flag], self.n_calibration)
                for flag in flags
            }
            k = 1 + len(flags)
            fired = {
                flag: tippett_log10(np.stack([flag_log_p[flag]] + [np.zeros_like(score)] * (k - 1), axis=1))
                > config.threshold
                for flag in flags
            }
            joined = [np.where(fired[f], flag_log_p[f], 0.0) for f in flags]
            score = tippett_log10(np.stack([-score * math.log(10), *joined], axis=1))
            result["p_flagged"] = np.exp(np.min([flag_log_p[flag] for flag in flags], axis=0))
            # a flag that did not fire is not what fired
            ranked = np.hstack([ranked, np.stack(joined, axis=1)])
            candidates += flags
        else:
            result["p_flagged"] = np.ones(len(score))
        result.update({f"p_{channel}": np.exp(log_p[channel]) for channel in scored})
        result.update(
            score=score,
            is_suspect=score > config.threshold,
            component=np.asarray(candidates)[np.argmin(ranked, axis=1)],
            softness=np.asarray(self.forensic.level_names)[result["softness_level"]],
        )
        return result

    @property
    def summary(self) -> dict:
        """The derived facts `anchorscan info` prints and the anchor file records beside its
        ``config``."""
        return {
            "backbone": self.spec.backbone,
            "weights_sha256": self.spec.weights_sha256,
            "preprocessing": self.spec.preprocessing,
            "layout": self.spec.layout,
            "n": self.moments.n,
            "n_calibration": self.n_calibration,
            "d": self.spec.dim,
            "d_semantic": self.spec.d_semantic,
            "d_statistical": self.spec.d_statistical,
            "d_forensic": self.spec.d_forensic,
            "shrinkage": self.model.shrinkage,
            "k": self.model.decoupled.k,
            "k_raw": self.model.raw.k,
            "tau": self.model.decoupled.tau,
            "forensic_level_names": list(self.forensic.level_names),
            "flagged": {name: moments.n for name, moments in sorted(self.flagged.items())},
            "num_quantiles": len(self.calibration["semantic"]),
            # the images each softness level's alarm calibration rests on (per_level only)
            "level_calibration": {
                self.forensic.level_names[level]: n
                for level, (_, n) in (self.level_calibration or {}).items()
            },
        }
