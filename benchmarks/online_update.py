"""Online updates against full re-derivations (docs/METHOD.md §9.1), and a delta's size against
the images it summarises (§9.4). Prints a table, then NAME=VALUE lines.

An online update of k images is Chan's merge of the statistics plus Woodbury on the three
followed inverses (full, semantic, raw) and the cheap drift check; a full re-derivation is what
loading an anchor or a refresh costs: OAS, the semantic eigendecomposition, the regression and
two PPCA spectra (``AnchorModel.fit``). Synthetic features (timing does not depend on values);
half the dimensions semantic, as the default backbone's 1280 + 768 are roughly."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from online_precision import OnlineAnchorModel

from anchorscan.anchors.anchor import AnchorModel
from anchorscan.anchors.forensic import ForensicModel
from anchorscan.anchors.stats import Moments

FORENSIC = 10  # the forensic channel's features per level
JPEG_BYTES = 150_000  # a typical web photo, for the delta's size against the images it summarises


def measure(d: int, ks: tuple[int, ...], updates: int) -> dict:
    """Seconds of a full re-derivation (best of two) and, per k, the mean seconds of an update
    over ``updates`` consecutive ones (so the drift checks every 16 updates and the moments'
    buffer flushes are paid for)."""
    rng = np.random.default_rng(0)
    n = 2 * d
    count = n + sum(ks) * updates
    # correlated features (64 latent factors and noise), as a backbone's are: OAS then keeps
    # most of the correlation, as it does on real features
    rows = rng.normal(size=(count, 64)) @ rng.normal(size=(64, d)) + rng.normal(size=(count, d))
    moments = Moments.of(rows[:n])
    forensic = ForensicModel(("sharp",), [Moments.of(rng.normal(size=(n, FORENSIC)))])
    full = min(timed(lambda: AnchorModel.fit(moments, d // 2)) for _ in range(2))
    # no refresh inside the measured updates: the refresh *is* the full re-derivation
    online = OnlineAnchorModel(
        moments, forensic, d // 2, refresh_every=10**9, max_growth=1e9, ridge_drift=1e9, tolerance=1e9
    )
    result = {"d": d, "full_s": full}
    start = n
    for k in ks:
        batches = [rows[start + i * k : start + (i + 1) * k] for i in range(updates)]
        start += k * updates
        result[k] = timed(lambda batches=batches: [online.add(batch) for batch in batches]) / updates
    return result


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def delta_bytes(d: int, rank: int | None) -> int:
    """Bytes of a delta file at backbone dimension d (ten forensic levels, as `fit` models them),
    full or with its backbone M2 as a rank-``rank`` factor. Its size does not depend on how many
    images it summarises."""
    from anchorscan.anchors.federation import Delta, delta_to_bytes
    from anchorscan.anchors.spec import FeatureSpec

    rng = np.random.default_rng(1)
    spec = FeatureSpec(
        "synthetic",
        "0" * 64,
        {"crop": 224},
        {"d_semantic": d // 2, "d_statistical": d - d // 2, "d_forensic": FORENSIC},
    )
    statistics = {"backbone": Moments.from_arrays(64, rng.normal(size=d), np.eye(d))}
    statistics.update(
        {
            f"forensic.level{j}": Moments.from_arrays(64, np.zeros(FORENSIC), np.eye(FORENSIC))
            for j in range(10)
        }
    )
    factors = {}
    if rank is not None:
        factors["backbone"] = rng.normal(size=(d, rank))
    levels = tuple(f"level{j}" for j in range(10))
    return len(delta_to_bytes(Delta(spec, levels, "0" * 64, "1" * 64, statistics, factors=factors)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dims", default="512,1024,2048")
    parser.add_argument("--ks", default="1,16,256")
    parser.add_argument("--updates", type=int, default=32, help="consecutive updates timed per k")
    args = parser.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    ks = tuple(int(k) for k in args.ks.split(","))
    print(f"online update of k images vs full re-derivation ({os.cpu_count()} cores)")
    print(f"{'d':>6} {'full (s)':>10} " + " ".join(f"{f'k={k} (ms)':>12} {'speed-up':>9}" for k in ks))
    lines = []
    for d in dims:
        result = measure(d, ks, args.updates)
        cells = []
        for k in ks:
            cells.append(f"{result[k] * 1e3:12.2f} {result['full_s'] / result[k]:8.0f}x")
            # significant digits, not decimals: a tiny d's ratio can be below 0.05 and is still a ratio
            lines.append(f"online_speedup_d{d}_k{k}={result['full_s'] / result[k]:.3g}")
        print(f"{d:6d} {result['full_s']:10.3f} " + " ".join(cells))
    for line in lines:
        print(line)
    print(f"\ndelta size against the images it summarises (a JPEG taken as {JPEG_BYTES // 1000} kB)")
    print(
        f"{'d':>6} {'full delta':>12} {'rank 64':>10} "
        + " ".join(f"{f'n={n:,}':>12}" for n in (64, 1_000, 100_000))
    )
    for d in dims:
        full, low = delta_bytes(d, None), delta_bytes(d, 64)
        ratios = " ".join(f"{full / (n * JPEG_BYTES):12.4f}" for n in (64, 1_000, 100_000))
        print(f"{d:6d} {full / 2**20:10.1f}MB {low / 2**20:8.2f}MB {ratios}")
        print(f"delta_mb_d{d}={full / 2**20:.2f}", f"delta_rank64_mb_d{d}={low / 2**20:.2f}", sep="\n")
    print("(the n= columns: the full delta's size over that many images' bytes)")


if __name__ == "__main__":
    main()
