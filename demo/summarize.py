"""Per-class mean score, suspect rate, AUROC of the score and of each channel, and the most
frequent softness, of a scored demo folder.

Usage: python demo/summarize.py --scores PREFIX --manifest demo/data/scan/manifest.csv
"""

from __future__ import annotations

import argparse
import collections
import csv
import glob
import os

import numpy as np
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

COLUMNS = ("score", "semantic", "statistical", "forensic")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", required=True, help="the PREFIX given to `anchorscan score`")
    parser.add_argument("--manifest", required=True, help="CSV with uri,label,generator")
    args = parser.parse_args(argv)

    root = os.path.dirname(os.path.abspath(args.manifest))
    with open(args.manifest, newline="") as handle:
        generator_of = {os.path.join(root, row["uri"]): row["generator"] for row in csv.DictReader(handle)}
    table = pq.read_table(sorted(glob.glob(f"{args.scores}-scores-*.parquet"))).to_pydict()
    generators = np.array([generator_of[uri] for uri in table["uri"]])
    values = {name: np.asarray(table[name]) for name in COLUMNS}
    suspect = np.asarray(table["is_suspect"])
    softness = np.asarray(table["softness"])
    real = generators == "real"

    print(
        f"{'class':12} {'n':>4} {'mean score':>11} {'suspect':>8} {'AUROC score':>12} "
        f"{'semantic':>9} {'statistical':>12} {'forensic':>9}  most frequent softness"
    )
    for generator in ["real"] + sorted(set(generators) - {"real"}) + ["all fakes"]:
        rows = ~real if generator == "all fakes" else generators == generator
        line = (
            f"{generator:12} {rows.sum():4d} {values['score'][rows].mean():11.3f} {suspect[rows].mean():8.1%}"
        )
        if generator == "real":
            line += " " * 45
        else:
            pair = real | rows
            line += "".join(
                f" {roc_auc_score(~real[pair], values[name][pair]):{width}.3f}"
                for name, width in zip(COLUMNS, (12, 9, 12, 9))
            )
        ((common, count),) = collections.Counter(softness[rows]).most_common(1)
        print(f"{line}  {common} ({count}/{rows.sum()})")


if __name__ == "__main__":
    main()
