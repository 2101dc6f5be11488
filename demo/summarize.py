"""Per-class mean score, suspect rate and AUROC of a scored demo folder.

Usage: python demo/summarize.py --scores PREFIX --manifest demo/data/scan/manifest.csv
"""
from __future__ import annotations

import argparse
import csv
import glob
import os

import numpy as np
import pyarrow.parquet as pq

from sklearn.metrics import roc_auc_score as auroc


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", required=True, help="the PREFIX given to `anchorscan score`")
    parser.add_argument("--manifest", required=True, help="CSV with uri,label,generator")
    args = parser.parse_args(argv)

    root = os.path.dirname(os.path.abspath(args.manifest))
    with open(args.manifest, newline="") as handle:
        generator_of = {os.path.join(root, row["uri"]): row["generator"]
                        for row in csv.DictReader(handle)}
    table = pq.read_table(sorted(glob.glob(f"{args.scores}-scores-*.parquet"))).to_pydict()
    generators = np.array([generator_of[uri] for uri in table["uri"]])
    scores = {name: np.asarray(table[name]) for name in ("score", "semantic", "statistical")}
    suspect = np.asarray(table["is_suspect"])
    real = generators == "real"

    print(f"{'class':12} {'n':>4} {'mean score':>11} {'suspect':>8} "
          f"{'AUROC score':>12} {'semantic':>9} {'statistical':>12}")
    for generator in ["real"] + sorted(set(generators) - {"real"}):
        rows = generators == generator
        line = (f"{generator:12} {rows.sum():4d} {scores['score'][rows].mean():11.3f} "
                f"{suspect[rows].mean():8.1%}")
        if generator != "real":
            pair = real | rows
            line += "".join(f" {auroc(~real[pair], values[pair]):{width}.3f}" for values, width
                            in zip(scores.values(), (12, 9, 12)))
        print(line)
    fake = ~real
    print(f"{'all fakes':12} {fake.sum():4d} {scores['score'][fake].mean():11.3f} "
          f"{suspect[fake].mean():8.1%} {auroc(fake, scores['score']):12.3f} "
          f"{auroc(fake, scores['semantic']):9.3f} {auroc(fake, scores['statistical']):12.3f}")


if __name__ == "__main__":
    main()
