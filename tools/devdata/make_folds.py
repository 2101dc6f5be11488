"""Fold manifests for docs/QUALITY.md's measurements: a photo is in the tune fold when the first
hex digit of sha256(source_photo) is below 8, else in the report fold (round-1 rule).

    python tools/devdata/make_folds.py --dev /work/shared/bench/dev --devdata /work/devdata --out /work/eval

Writes, per fold F: F_real.txt (the fold's real crops), F.csv (uri,label,generator: the fold's
real crops and every fake family of the bench and of tools/devdata), F_processed.csv (the fold's
near-real negatives, label real, generator = the processing) and F_fakes.txt (the fold's fakes).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os


def fold(photo: str) -> str:
    return "tune" if hashlib.sha256(photo.encode()).hexdigest()[0] < "8" else "report"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", default="/work/shared/bench/dev")
    parser.add_argument("--devdata", default="/work/devdata")
    parser.add_argument("--out", default="/work/eval")
    args = parser.parse_args()
    rows = {"tune": [], "report": []}
    with open(os.path.join(args.dev, "manifest.csv")) as handle:
        for row in csv.DictReader(handle):
            label = "real" if row["class"] == "real" else "fake"
            generator = "" if label == "real" else row["class"]
            rows[fold(row["source_photo"])].append((os.path.join(args.dev, row["path"]), label, generator))
    with open(os.path.join(args.devdata, "eval_manifest.csv")) as handle:
        for row in csv.DictReader(handle):
            if row["label"] == "fake":
                rows[fold(row["source_photo"])].append((row["uri"], "fake", row["generator"]))
    processed = {"tune": [], "report": []}
    with open(os.path.join(args.devdata, "processed_real_manifest.csv")) as handle:
        for row in csv.DictReader(handle):
            processed[fold(row["source_photo"])].append((row["uri"], "real", row["generator"]))
    os.makedirs(args.out, exist_ok=True)
    for name in rows:
        write(os.path.join(args.out, f"{name}.csv"), rows[name])
        write(os.path.join(args.out, f"{name}_processed.csv"), processed[name])
        for label in ("real", "fake"):
            with open(
                os.path.join(args.out, f"{name}_{label}s.txt" if label == "fake" else f"{name}_real.txt"), "w"
            ) as handle:
                handle.write("".join(f"{uri}\n" for uri, lab, _ in rows[name] if lab == label))
        print(name, len(rows[name]), "labelled,", len(processed[name]), "processed reals")


def write(path: str, rows) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uri", "label", "generator"])
        writer.writerows(rows)


if __name__ == "__main__":
    main()
