"""Export what a site learned since a common base as a delta of its statistics (docs/METHOD.md
§9.4): no images, no per-image features; refused below a minimum count."""

from __future__ import annotations

import numpy as np

from anchorscan.anchors.anchor_file import anchor_from_bytes
from anchorscan.anchors.federation import MIN_COUNT, delta_to_bytes, export_delta
from anchorscan.anchors.io.storage import read_bytes, write_atomically
from anchorscan.pipelines.options import command_parser


def parser():
    parser = command_parser(
        "export-delta",
        "Write a site's statistics since a common base anchor, for `anchorscan merge` elsewhere.",
    )
    parser.add_argument(
        "--anchor", required=True, help="the site's anchor (made from BASE by update or flag)"
    )
    parser.add_argument("--since", required=True, help="BASE: the anchor every site started from")
    parser.add_argument("--output", required=True, help="the delta file to write")
    parser.add_argument(
        "--min_count", type=int, default=MIN_COUNT, help="refuse a delta of fewer real images than this"
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="standard deviation of Gaussian noise added to every M2 entry (and, "
        "divided by n, to the means); recorded in the delta",
    )
    parser.add_argument(
        "--rank", type=int, default=None, help="send each M2 as its best rank-R factor (smaller, approximate)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the noise (default: fresh)")
    return parser


def run(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be at least 1, got {args.rank}")
    if args.noise < 0:
        raise ValueError(f"--noise must be non-negative, got {args.noise}")
    site, _ = anchor_from_bytes(read_bytes(args.anchor))
    base, _ = anchor_from_bytes(read_bytes(args.since))
    delta = export_delta(site, base, args.min_count, args.rank, args.noise, np.random.default_rng(args.seed))
    data = delta_to_bytes(delta)
    write_atomically(args.output, data)
    summary = {
        "delta": args.output,
        "n": delta.n,
        "bytes": len(data),
        "statistics": {name: moments.n for name, moments in delta.statistics.items()},
        "noise": delta.noise,
        "ranks": {name: f.shape[1] for name, f in delta.factors.items()},
    }
    print(
        f"delta       {args.output} ({len(data):,} bytes)\n"
        f"images      {delta.n} real since the base; flagged: "
        f"{ {n[5:]: m.n for n, m in delta.statistics.items() if n.startswith('flag.')} or 'none' }\n"
        f"noise       {delta.noise}\n"
        f"rank        {summary['ranks'] or 'full'}"
    )
    return summary
