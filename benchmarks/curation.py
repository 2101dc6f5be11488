"""Curation at crawl scale, on this machine: the launcher's peak memory and time to curate a
synthetic scores table of ``--small`` (100,000) rows and one of ``--large`` (1,000,000).

    python benchmarks/curation.py [--quick] [--small N] [--large N] [--workdir DIR]

Each table is one scan of img2dataset-like samples (shards of 10,000, a URL, a caption and a
status carried, distinct images, 1 % suspect), curated with ``--by status`` and without
``--reshard`` (no shard is read: the decisions alone). Each curation runs in a fresh process,
which reports its own peak RSS and the time of ``curate.run`` (imports excluded).
``curate_rss_ratio``: peak RSS of the large over the small run (target <= 1.3: a launcher whose
memory stays flat as the corpus grows); ``curate_time_ratio``: the same for time (target <= 12
for 10x the rows). Prints ``NAME=VALUE`` lines last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PER_SHARD = 10_000
TARGETS = {"curate_rss_ratio": 1.3, "curate_time_ratio": 12.0}

# The curation, in a process of its own: its peak RSS and the time of the call.
CHILD = """
import json, resource, sys, time
from anchorscan.pipelines import curate
scan, output = sys.argv[1:3]
start = time.perf_counter()
outcome = curate.run(["--scores", scan, "--output", output, "--by", "status"])
seconds = time.perf_counter() - start
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "rss_mb": peak_kb / 1024, "kept": outcome["kept"]}))
"""


def write_scan(prefix: Path, rows: int, seed: int = 0) -> None:
    """A scores table of ``rows`` samples as `score` writes it for shards (sidecar columns
    carried), and an empty errors table."""
    rng = np.random.default_rng(seed)
    index = np.arange(rows)
    shard = [f"crawl/{number:05d}.tar" for number in index // PER_SHARD]
    key = [f"{number:05d}{position:04d}" for number, position in zip(index // PER_SHARD, index % PER_SHARD)]
    score = rng.exponential(0.5, rows)
    table = pa.table(
        {
            "uri": [f"{s}#{k}" for s, k in zip(shard, key)],
            "sha256": [f"{number:064x}" for number in index],  # distinct images
            "score": score,
            "is_suspect": score > np.quantile(score, 0.99),
            "anchor_score": score,
            "head": [""] * rows,
            "softness": ["sharp"] * rows,
            "anchor_id": ["a" * 16] * rows,
            "key": key,
            "shard": shard,
            "url": [f"http://images.example/{k}.jpg" for k in key],
            "caption": [f"photo {k}" for k in key],
            "status": ["success"] * rows,
        }
    )
    pq.write_table(table, f"{prefix}-scores-00000-of-00001.parquet")
    pq.write_table(pa.table({"uri": pa.array([], pa.string())}), f"{prefix}-errors-00000-of-00001.parquet")


def curate_once(workdir: Path, rows: int) -> dict:
    scan = workdir / f"scan{rows}"
    write_scan(scan, rows)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(scan), str(workdir / f"cur{rows}")],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 and 10,000 rows")
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    small, large = (1_000, 10_000) if args.quick else (args.small, args.large)
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        runs = {rows: curate_once(Path(folder), rows) for rows in (small, large)}
    values = {
        "curate_rows_small": small,
        "curate_rows_large": large,
        "curate_rss_small_mb": round(runs[small]["rss_mb"], 1),
        "curate_rss_large_mb": round(runs[large]["rss_mb"], 1),
        "curate_rss_ratio": round(runs[large]["rss_mb"] / runs[small]["rss_mb"], 3),
        "curate_time_small_s": round(runs[small]["seconds"], 2),
        "curate_time_large_s": round(runs[large]["seconds"], 2),
        "curate_time_ratio": round(runs[large]["seconds"] / runs[small]["seconds"], 2),
    }
    print("targets")
    for name, target in TARGETS.items():
        print(f"  {name} {values[name]} <= {target}: {'met' if values[name] <= target else 'not met'}")
    print()
    for name, value in values.items():
        print(f"{name}={value}")


if __name__ == "__main__":
    main()
