"""docs/QUALITY.md round 5's tune-fold candidates, from one embedding of each half's images:

    python tools/devdata/alarm_candidates.py EVAL OUT

EVAL: make_folds.py's folder (tuneA.csv, tuneB.csv, tuneA_real.txt, tuneB_real.txt); OUT: the
folder whose tuneA/ and tuneB/ hold each half's anchor.safetensors, fitted with `anchorscan fit
--alarm_calibration per_level` on the other half's real crops and the bundled extra crops
(round 4's commands). Each half's images are embedded once, clean and in the 15 soft conditions
of round 1 (the CLI's decoding and backbone; one crop per image, as the dev crops are); then
(a) round 4's alarms (calibrated on all held-out photos, silent at levels fewer than 5 of them
hold) and (b) the alarms calibrated per softness level are scored on the same features, and the
rule's numbers printed per family and soft condition.
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from anchorscan.anchors.anchor import Anchor
from anchorscan.anchors.anchor_file import anchor_from_bytes
from anchorscan.anchors.calibration import MIN_CALIBRATION, alarms_log10, upper_tail_log_pvalues
from anchorscan.anchors.images.decode import decode_and_crop
from anchorscan.anchors.models.features import BackboneConfig

SOFT = [
    *("blur:0.3", "blur:0.45", "blur:0.6", "blur:0.8", "blur:1.0", "blur:1.2"),
    *("defocus:1", "defocus:1.5", "defocus:2.5", "motion:3", "motion:5", "motion:9"),
    *("thumbnail:0.8", "thumbnail:0.625", "thumbnail:0.5"),
]
GROUPS = {"SR": ("realesrgan", "realcugan", "waifu2x"), "content": ("terrain_diffusion",), "rife": ("rife",)}


def embedded(anchor: Anchor, items: list[tuple[str, str | None]]) -> np.ndarray:
    """Feature rows of (path, perturbation) pairs, batches of 16."""
    extractor = BackboneConfig.from_spec(anchor.spec).build()
    size = anchor.spec.preprocessing["crop"]
    rows = []
    for start in range(0, len(items), 16):
        crops = [
            decode_and_crop(Path(uri).read_bytes(), size, perturbation=p).pixels
            for uri, p in items[start : start + 16]
        ]
        rows.append(extractor(torch.from_numpy(np.stack(crops))).vectors)
    return np.concatenate(rows).astype(np.float64)


def flagged(anchor: Anchor, features: np.ndarray) -> dict[str, np.ndarray]:
    """Each candidate's verdict at the anchor's threshold."""
    per_level = dataclasses.replace(
        anchor, config=dataclasses.replace(anchor.config, alarm_calibration="per_level")
    )
    result = per_level.distances(features)
    levels = result["softness_level"]
    forensic = upper_tail_log_pvalues(
        result["forensic"], anchor.calibration["forensic"], anchor.n_calibration
    )
    _, held = anchor.forensic.distances(anchor.calibration_rows.features[:, anchor.spec.d_backbone :])
    held_levels = np.bincount(held, minlength=len(anchor.forensic.level_names)) >= MIN_CALIBRATION
    alarms = ("semantic", "statistical")
    candidates = {
        "a": (
            [upper_tail_log_pvalues(result[c], anchor.calibration[c], anchor.n_calibration) for c in alarms],
            held_levels[levels],
        ),
        "b": ([per_level.channel_log_pvalues(result, c) for c in alarms], per_level.alarm_levels[levels]),
    }
    verdicts = {}
    for name, (log_p, speaks) in candidates.items():
        channels = np.c_[forensic, np.where(speaks[:, None], np.stack(log_p, 1), 0.0)]
        verdicts[name] = (
            alarms_log10(channels, anchor.config.fpr, anchor.config.alarm_share) > anchor.config.threshold
        )
    return verdicts


def main(eval_dir: Path, out: Path) -> None:
    verdicts: dict[tuple[str, str], list[bool]] = {}
    for half in "AB":
        anchor, _ = anchor_from_bytes((out / f"tune{half}" / "anchor.safetensors").read_bytes())
        with open(eval_dir / f"tune{half}.csv", newline="") as handle:
            items = [(row["uri"], row["generator"] or "real", None) for row in csv.DictReader(handle)]
        reals = (eval_dir / f"tune{half}_real.txt").read_text().split()
        items += [(uri, f"soft:{condition}", condition) for condition in SOFT for uri in reals]
        found = flagged(anchor, embedded(anchor, [(uri, p) for uri, _, p in items]))
        for name, flags in found.items():
            for (_, group, _), flag in zip(items, flags):
                verdicts.setdefault((group, name), []).append(bool(flag))
    for name in ("a", "b"):
        share = {group: float(np.mean(flags)) for (group, n), flags in verdicts.items() if n == name}
        soft = [share[f"soft:{condition}"] for condition in SOFT]
        means = {g: float(np.mean([share[f] for f in families])) for g, families in GROUPS.items()}
        print(
            f"({name}) " + " ".join(f"{f} {share[f]:.3f}" for families in GROUPS.values() for f in families),
            f"| group mean {np.mean(list(means.values())):.3f}",
            f"| clean reals {sum(verdicts[('real', name)])} of {len(verdicts[('real', name)])}",
            f"| soft mean {np.mean(soft):.4f} max {max(soft):.3f}",
        )
        print("    soft: " + " ".join(f"{c} {s:.3f}" for c, s in zip(SOFT, soft)))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
