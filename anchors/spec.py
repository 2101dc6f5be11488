"""What the features of an image depend on; an anchor only scores features with the same spec."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from anchorscan.anchors.errors import UserError
from anchorscan.anchors.validation import check, field


class IncompatibleAnchorError(UserError, ValueError):
    """The anchor was fitted on features made differently from the ones being scored."""


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    backbone: str
    weights_sha256: str
    preprocessing: dict
    layout: dict  # at least d_semantic, d_statistical, d_forensic and the projection's digest

    @property
    def d_semantic(self) -> int:
        return int(self.layout["d_semantic"])

    @property
    def d_statistical(self) -> int:
        return int(self.layout["d_statistical"])

    @property
    def d_forensic(self) -> int:
        return int(self.layout["d_forensic"])

    @property
    def d_backbone(self) -> int:
        """The semantic and statistical parts: what the backbone's forward pass gives."""
        return self.d_semantic + self.d_statistical

    @property
    def dim(self) -> int:
        return self.d_backbone + self.d_forensic

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpec:
        return cls(
            data["backbone"], data["weights_sha256"], dict(data["preprocessing"]), dict(data["layout"])
        )

    @classmethod
    def checked(cls, metadata: dict, error: type[Exception], what: str) -> FeatureSpec:
        """The spec a file's metadata records, refused with ``error`` where a field is missing
        or not what a spec holds (the layout's sizes whole numbers, the semantic one positive)."""
        layout = field(metadata, "layout", dict, error, what)
        for key in ("d_semantic", "d_statistical", "d_forensic"):
            size = field(layout, key, int, error, f"{what} layout")
            check(size >= (key == "d_semantic"), error, f"{what}: layout {key} is {size}, not a size")
        return cls(
            field(metadata, "backbone", str, error, what),
            field(metadata, "weights_sha256", str, error, what),
            dict(field(metadata, "preprocessing", dict, error, what)),
            dict(layout),
        )

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def require_same(self, other: FeatureSpec, anchor_name: str = "the anchor") -> None:
        """Raises IncompatibleAnchorError naming every field that differs."""
        differences = [
            f"{field}: anchor has {getattr(self, field)!r}, features have {getattr(other, field)!r}"
            for field in ("backbone", "weights_sha256", "preprocessing", "layout")
            if getattr(self, field) != getattr(other, field)
        ]
        if differences:
            raise IncompatibleAnchorError(
                f"{anchor_name} was fitted on different features and cannot score these:\n  "
                + "\n  ".join(differences)
                + f"\nGive the --weights it was fitted with (backbone {self.backbone}), or fit a new "
                "anchor on these features (`anchorscan fit --backbone ...`)."
            )
