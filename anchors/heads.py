"""UnivFD's detectors as heads on anchorscan's features (docs/METHOD.md §6): nearest neighbour,
a closed-form linear probe (Fisher LDA) and the paper's logistic regression.

Every head reads the semantic part of the feature vector, ``z[:, :spec.d_semantic]`` (UnivFD's
protocol); the LDA probe can read every channel instead (``parts="all"``). A head's score is
higher for images more likely generated, and it calls fake what scores above 0. Head files
follow the anchor file (safetensors tensors, JSON metadata, a checksum over both, never pickled)
under their own metadata key, so neither reader takes the other's file.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar

import numpy as np

from anchorscan.anchors import checked_file
from anchorscan.anchors.anchor import shrunk_covariance
from anchorscan.anchors.errors import NotEnoughImagesError, UsageError, UserError
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.anchors.stats import Moments
from anchorscan.anchors.validation import check, check_array, check_count, check_moments, field

FORMAT_VERSION = 2  # 2: the forensic channel in the features, the LDA probe's parts
METADATA_KEY = "anchorscan_head"
REAL, FAKE = 0, 1
# query rows x bank rows in one similarity block (64 MiB of float32)
SIMILARITY_BLOCK = 1 << 24


class HeadFileError(UserError, ValueError):
    """The bytes are not a readable anchorscan head."""


def l2_normalised(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, np.finfo(rows.dtype).tiny)


PARTS = ("semantic", "all")  # what a head reads: the semantic embedding, or every channel


def part_width(spec: FeatureSpec, parts: str) -> int:
    if parts not in PARTS:
        raise ValueError(f"a head reads {' or '.join(PARTS)} features, not {parts!r}")
    return spec.d_semantic if parts == "semantic" else spec.dim


def feature_part(features: np.ndarray, spec: FeatureSpec, parts: str = "semantic") -> np.ndarray:
    """The part of (b, spec.dim) feature rows that a head reads."""
    features = np.atleast_2d(np.asarray(features))
    if features.ndim != 2 or features.shape[1] != spec.dim:
        raise ValueError(
            f"features have shape {features.shape}, the feature spec expects rows of {spec.dim} "
            f"({spec.d_semantic} semantic + {spec.d_statistical} statistical + "
            f"{spec.d_forensic} forensic)"
        )
    return features[:, : part_width(spec, parts)]


def _real_and_fake(
    features: np.ndarray, labels: np.ndarray, spec: FeatureSpec, parts: str = "semantic"
) -> tuple[np.ndarray, np.ndarray]:
    semantic = feature_part(features, spec, parts)
    labels = np.asarray(labels)
    if labels.shape != (len(semantic),) or not np.isin(labels, (REAL, FAKE)).all():
        raise ValueError(f"labels must be {REAL} (real) or {FAKE} (fake), one per feature row")
    real, fake = semantic[labels == REAL], semantic[labels == FAKE]
    if len(real) == 0 or len(fake) == 0:
        raise NotEnoughImagesError(
            f"a head needs real and fake examples, got {len(real)} real and {len(fake)} fake"
        )
    return real, fake


class Head(abc.ABC):
    """A fitted detector on a part of the features (``parts``). Subclasses are dataclasses with
    a ``spec`` field and a ``counts`` attribute ({'real': n, 'fake': n}, the examples it was
    fitted on)."""

    kind: ClassVar[str]
    # Whether ``decision`` is a natural-log odds of "generated", which evidence can be added to.
    log_odds: ClassVar[bool] = False
    parts: str = "semantic"  # what the head reads; a field of the heads that can read more
    spec: FeatureSpec

    @property
    @abc.abstractmethod
    def counts(self) -> dict[str, float]:
        """{'real': n, 'fake': n}: the examples the head was fitted on."""

    @abc.abstractmethod
    def _decision_rows(self, rows: np.ndarray) -> np.ndarray:
        """Scores of rows of the part the head reads."""

    @abc.abstractmethod
    def _tensors(self) -> dict[str, np.ndarray]:
        """What the head file stores as tensors."""

    @abc.abstractmethod
    def _parameters(self) -> dict:
        """What the head file stores in its metadata besides kind, spec and counts."""

    @classmethod
    @abc.abstractmethod
    def _from_file(cls, spec: FeatureSpec, tensors: dict[str, np.ndarray], metadata: dict) -> Head:
        """The head that ``_tensors`` and ``_parameters`` describe."""

    @classmethod
    @abc.abstractmethod
    def check_file(cls, spec: FeatureSpec, tensors: dict[str, np.ndarray], metadata: dict, what: str) -> None:
        """Refuses (HeadFileError) numbers that no such head holds: shapes, finiteness, counts."""

    def decision(self, features: np.ndarray, spec: FeatureSpec | None = None) -> np.ndarray:
        """Scores of (b, spec.dim) feature rows; ``spec``, the features' own, is checked first."""
        if spec is not None:
            self.spec.require_same(spec, f"this {self.kind} head")
        return self._decision_rows(feature_part(features, self.spec, self.parts))

    def predict(self, features: np.ndarray, spec: FeatureSpec | None = None) -> np.ndarray:
        """True where the head calls the image generated."""
        return self.decision(features, spec) > 0

    def to_bytes(self) -> bytes:
        metadata = {"kind": self.kind, **self.spec.to_dict(), "counts": self.counts, **self._parameters()}
        return checked_file.pack(self._tensors(), metadata, METADATA_KEY, FORMAT_VERSION)


@dataclasses.dataclass(eq=False)
class NearestNeighbourHead(Head):
    """Score: mean cosine similarity to the k nearest fakes minus that to the k nearest reals;
    with k = 1 an image is fake when its nearest fake is closer than its nearest real."""

    kind: ClassVar[str] = "nn"
    spec: FeatureSpec
    real_bank: np.ndarray  # (n_real, d_semantic) unit rows, float32 as banks can be large
    fake_bank: np.ndarray
    k: int = 1

    def __post_init__(self):
        smallest = min(len(self.real_bank), len(self.fake_bank))
        if not 1 <= self.k <= smallest:
            raise UsageError(f"--k must be in [1, {smallest}] (the smaller bank), got {self.k}")

    @classmethod
    def fit(
        cls, spec: FeatureSpec, features: np.ndarray, labels: np.ndarray, k: int = 1
    ) -> NearestNeighbourHead:
        real, fake = _real_and_fake(features, labels, spec)
        return cls(spec, l2_normalised(real.astype(np.float32)), l2_normalised(fake.astype(np.float32)), k)

    @property
    def counts(self) -> dict[str, float]:
        return {"real": len(self.real_bank), "fake": len(self.fake_bank)}

    def _mean_top_k_similarity(self, queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
        means = np.empty(len(queries))
        rows = max(1, SIMILARITY_BLOCK // len(bank))
        for start in range(0, len(queries), rows):
            similarity = queries[start : start + rows] @ bank.T
            top_k = np.partition(similarity, len(bank) - self.k, axis=1)[:, len(bank) - self.k :]
            means[start : start + rows] = top_k.mean(axis=1, dtype=np.float64)
        return means

    def _decision_rows(self, rows):
        queries = l2_normalised(rows.astype(np.float32))
        return self._mean_top_k_similarity(queries, self.fake_bank) - self._mean_top_k_similarity(
            queries, self.real_bank
        )

    def _tensors(self):
        return {"real_bank": self.real_bank, "fake_bank": self.fake_bank}

    def _parameters(self):
        return {"k": self.k}

    @classmethod
    def _from_file(cls, spec, tensors, metadata):
        return cls(spec, tensors["real_bank"], tensors["fake_bank"], metadata["k"])

    @classmethod
    def check_file(cls, spec, tensors, metadata, what):
        _only_tensors(tensors, ("real_bank", "fake_bank"), what)
        banks = [
            check_array(f"{what}: {name}", tensors[name], (None, spec.d_semantic), HeadFileError)
            for name in ("real_bank", "fake_bank")
        ]
        k = field(metadata, "k", int, HeadFileError, what)
        check(
            1 <= k <= min(len(bank) for bank in banks), HeadFileError, f"{what}: k={k} does not fit its banks"
        )


def part_moments(moments: Moments, spec: FeatureSpec, parts: str) -> Moments:
    """Moments of the part a head reads, from moments of the full features or of that part."""
    width = part_width(spec, parts)
    if moments.dim == width:
        return moments
    if moments.dim != spec.dim:
        raise ValueError(
            f"moments of dimension {moments.dim} are neither of the features "
            f"({spec.dim}) nor of their {parts} part ({width})"
        )
    return Moments.from_arrays(moments.n, moments.mean[:width], moments.m2[:width, :width])


def pooled_within_class(real: Moments, fake: Moments) -> Moments:
    """Moments of the class-centred rows, whose covariance is the pooled within-class one.
    Counted one row short so that ``covariance()`` divides by n - 2: two means were estimated."""
    return Moments.from_arrays(real.n + fake.n - 1, np.zeros(real.dim), real.m2 + fake.m2)


@dataclasses.dataclass(eq=False)
class LinearProbeHead(Head):
    """Fisher LDA in closed form from per-class moments of the features it reads (``parts``:
    the semantic embedding, or every channel): the pooled within-class covariance with OAS
    shrinkage (on the correlation scale, so channels of any scale weigh alike),
    w = Sigma^-1 (mean_fake - mean_real), and the score is the Gaussian log-odds w.z + b with the
    class priors of the fitting set."""

    kind: ClassVar[str] = "lda"
    log_odds: ClassVar[bool] = True
    spec: FeatureSpec
    real: Moments
    fake: Moments
    parts: str = "semantic"
    weights: np.ndarray = dataclasses.field(init=False)
    bias: float = dataclasses.field(init=False)
    shrinkage: float = dataclasses.field(init=False)

    def __post_init__(self):
        for name, moments in (("real", self.real), ("fake", self.fake)):
            if moments.dim != part_width(self.spec, self.parts):
                raise ValueError(
                    f"{name} moments have dimension {moments.dim}, the {self.parts} "
                    f"features {part_width(self.spec, self.parts)}"
                )
            if moments.n == 0:
                raise NotEnoughImagesError(f"a linear probe needs {name} examples, got none")
        if self.real.n + self.fake.n < 3:
            raise NotEnoughImagesError("a linear probe needs at least 3 examples")
        covariance, self.shrinkage = shrunk_covariance(pooled_within_class(self.real, self.fake))
        self.weights = np.linalg.solve(covariance, self.fake.mean - self.real.mean)
        midpoint = (self.fake.mean + self.real.mean) / 2
        self.bias = float(np.log(self.fake.n / self.real.n) - self.weights @ midpoint)

    @classmethod
    def fit(cls, spec: FeatureSpec, real: Moments, fake: Moments, parts: str = "semantic") -> LinearProbeHead:
        """From the per-class moments that a combiner keyed by label produces."""
        return cls(spec, part_moments(real, spec, parts), part_moments(fake, spec, parts), parts)

    @classmethod
    def fit_from_rows(
        cls, spec: FeatureSpec, features: np.ndarray, labels: np.ndarray, parts: str = "semantic"
    ) -> LinearProbeHead:
        real, fake = _real_and_fake(features, labels, spec, parts)
        return cls(spec, Moments.of(real), Moments.of(fake), parts)

    @property
    def counts(self) -> dict[str, float]:
        return {"real": self.real.n, "fake": self.fake.n}

    def _decision_rows(self, rows):
        return rows.astype(np.float64) @ self.weights + self.bias

    def _tensors(self):
        return {
            "real.mean": self.real.mean,
            "real.m2": self.real.m2,
            "fake.mean": self.fake.mean,
            "fake.m2": self.fake.m2,
        }

    def _parameters(self):
        return {"parts": self.parts, "shrinkage": self.shrinkage}  # shrinkage: derived again on load

    @classmethod
    def _from_file(cls, spec, tensors, metadata):
        counts = metadata["counts"]
        real, fake = (
            Moments.from_arrays(counts[name], tensors[f"{name}.mean"], tensors[f"{name}.m2"])
            for name in ("real", "fake")
        )
        return cls(spec, real, fake, metadata["parts"])

    @classmethod
    def check_file(cls, spec, tensors, metadata, what):
        _only_tensors(tensors, ("real.mean", "real.m2", "fake.mean", "fake.m2"), what)
        parts = field(metadata, "parts", str, HeadFileError, what)
        check(parts in PARTS, HeadFileError, f"{what}: parts {parts!r}, expected one of {PARTS}")
        counts = field(metadata, "counts", dict, HeadFileError, what)
        for name in ("real", "fake"):
            check_moments(
                f"{what}: {name} class",
                counts.get(name),
                tensors[f"{name}.mean"],
                tensors[f"{name}.m2"],
                part_width(spec, parts),
                HeadFileError,
            )


@dataclasses.dataclass(eq=False)
class LogisticHead(Head):
    """UnivFD's linear probe variant: logistic regression on the L2-normalised semantic
    embeddings; the score is its log-odds."""

    kind: ClassVar[str] = "logistic"
    log_odds: ClassVar[bool] = True
    spec: FeatureSpec
    coef: np.ndarray  # (d_semantic,)
    intercept: float
    class_counts: dict[str, float]
    C: float  # scikit-learn's inverse regularisation strength

    @property
    def counts(self) -> dict[str, float]:
        return self.class_counts

    @classmethod
    def fit(
        cls, spec: FeatureSpec, features: np.ndarray, labels: np.ndarray, C: float = 1.0, max_iter: int = 1000
    ) -> LogisticHead:
        from sklearn.linear_model import LogisticRegression  # only this head needs scikit-learn

        real, fake = _real_and_fake(features, labels, spec)
        rows = l2_normalised(np.concatenate([real, fake]).astype(np.float64))
        targets = np.r_[np.full(len(real), REAL), np.full(len(fake), FAKE)]
        model = LogisticRegression(C=C, max_iter=max_iter).fit(rows, targets)
        return cls(
            spec, model.coef_[0].copy(), float(model.intercept_[0]), {"real": len(real), "fake": len(fake)}, C
        )

    def _decision_rows(self, rows):
        return l2_normalised(rows.astype(np.float64)) @ self.coef + self.intercept

    def _tensors(self):
        return {"coef": self.coef, "intercept": np.array([self.intercept])}

    def _parameters(self):
        return {"C": self.C}

    @classmethod
    def _from_file(cls, spec, tensors, metadata):
        return cls(spec, tensors["coef"], float(tensors["intercept"][0]), metadata["counts"], metadata["C"])

    @classmethod
    def check_file(cls, spec, tensors, metadata, what):
        _only_tensors(tensors, ("coef", "intercept"), what)
        check_array(f"{what}: coef", tensors["coef"], (spec.d_semantic,), HeadFileError)
        check_array(f"{what}: intercept", tensors["intercept"], (1,), HeadFileError)
        C = field(metadata, "C", (int, float), HeadFileError, what)
        check(math.isfinite(C) and C > 0, HeadFileError, f"{what}: C={C!r} is not a positive number")
        counts = field(metadata, "counts", dict, HeadFileError, what)
        for name in ("real", "fake"):
            check_count(f"{what}: {name} examples", counts.get(name), HeadFileError)


def _only_tensors(tensors: dict, names: tuple[str, ...], what: str) -> None:
    check(
        set(tensors) == set(names),
        HeadFileError,
        f"{what}: tensors {sorted(tensors)}, expected {sorted(names)}",
    )


HEADS: dict[str, type[Head]] = {
    head.kind: head for head in (NearestNeighbourHead, LinearProbeHead, LogisticHead)
}


def head_from_bytes(data: bytes, source: str | None = None) -> Head:
    """The head that ``Head.to_bytes`` wrote; refuses truncated, tampered, forged or foreign
    files (every number checked as it enters: anchors/validation.py)."""
    what = checked_file.named("head", source)
    tensors, metadata = checked_file.unpack(data, METADATA_KEY, FORMAT_VERSION, "head", HeadFileError, source)
    if metadata.get("kind") not in HEADS:
        raise HeadFileError(
            f"{what}: unknown head kind {metadata.get('kind')!r}; this anchorscan reads {sorted(HEADS)}"
        )
    spec = FeatureSpec.checked(metadata, HeadFileError, what)
    head = HEADS[metadata["kind"]]
    head.check_file(spec, tensors, metadata, what)
    try:
        return head._from_file(spec, tensors, metadata)
    except (np.linalg.LinAlgError, ValueError) as problem:  # valid numbers, degenerate head
        raise HeadFileError(f"{what}: its numbers do not give a head ({problem}): fit it again") from None
