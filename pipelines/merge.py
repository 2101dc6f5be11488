"""Merge sites' deltas into their common base (docs/METHOD.md §9.4): the CombineFn's merge on
every named statistic, then calibrated again on the base's held-out images."""

from __future__ import annotations

from anchorscan.anchors.anchor_file import anchor_from_bytes, anchor_to_bytes
from anchorscan.anchors.federation import delta_from_bytes, merge
from anchorscan.anchors.io.storage import read_bytes, write_atomically
from anchorscan.pipelines.flags import command_parser, text


def parser():
    parser = command_parser("merge", beam=False)
    parser.add_argument("base", type=text, help="the base anchor every delta was exported against")
    parser.add_argument("deltas", type=text, nargs="+", metavar="DELTA", help="delta files")
    parser.add_argument("--output", type=text, required=True, help="the merged anchor file to write")
    return parser


def run(argv=None) -> dict:
    args = parser().parse_args(argv)
    base, metadata = anchor_from_bytes(read_bytes(args.base))
    deltas = [delta_from_bytes(read_bytes(uri)) for uri in args.deltas]  # all checked first
    merged = merge(base, deltas)
    write_atomically(args.output, anchor_to_bytes(merged, metadata["projection"]))
    summary = {
        "anchor": args.output,
        "n_before": base.moments.n,
        "n": merged.moments.n,
        "deltas": len(deltas),
        "flagged": {k: m.n for k, m in merged.flagged.items()},
    }
    print(
        f"anchor      {args.output}\n"
        f"merged      {len(deltas)} deltas: n {base.moments.n} -> {merged.moments.n} real images; "
        f"flagged: {summary['flagged'] or 'none'}\n"
        f"calibrated  on the base's {merged.n_calibration} held-out images"
    )
    return summary
