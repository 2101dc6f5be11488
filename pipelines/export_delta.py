"""Export what a site learned since a common base as a delta of its statistics (docs/METHOD.md
§9.4): no images, no per-image features; refused below a minimum count."""

from __future__ import annotations

import numpy as np

from anchorscan.anchors.anchor_file import anchor_from_bytes
from anchorscan.anchors.federation import MIN_COUNT, delta_to_bytes, export_delta
from anchorscan.anchors.io.storage import read_bytes, write_atomically
from anchorscan.pipelines.flags import (
    command_parser,
    non_negative_float,
    non_negative_int,
    positive_int,
    text,
)


def parser():
    parser = command_parser("export-delta", beam=False)
    parser.add_argument(
        "--anchor", type=text, required=True, help="the site's anchor (made from BASE by update or flag)"
    )
    parser.add_argument("--since", type=text, required=True, help="BASE: the anchor every site started from")
    parser.add_argument("--output", type=text, required=True, help="the delta file to write")
    parser.add_argument(
        "--min_count",
        type=positive_int,
        default=MIN_COUNT,
        help="refuse a delta of fewer real images than this",
    )
    parser.add_argument(
        "--noise",
        type=non_negative_float,
        default=0.0,
        help="standard deviation of Gaussian noise added to every M2 entry (and, "
        "divided by n, to the means); recorded in the delta",
    )
    parser.add_argument(
        "--rank",
        type=positive_int,
        default=None,
        help="send each M2 as its best rank-R factor (smaller, approximate)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=None, help="seed of the noise (default: fresh)"
    )
    return parser


def run(argv=None) -> dict:
    args = parser().parse_args(argv)
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
