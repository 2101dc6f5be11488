"""Export what a site learned since a common base as a delta of its statistics (docs/METHOD.md
§9.4): no images, no per-image features; refused below a minimum count; signed with the site's
key (--sign) so that a coordinator can accept only enrolled sites."""

from __future__ import annotations

import logging
import os
import stat

import numpy as np

from anchorscan.anchors.anchor_file import anchor_from_bytes, read_metadata
from anchorscan.anchors.channels import statistic_widths
from anchorscan.anchors.federation import MIN_COUNT, delta_to_bytes, export_delta
from anchorscan.anchors.io.gcs import check_paths
from anchorscan.anchors.io.storage import check_writable, read_bytes, read_checked_file, write_atomically
from anchorscan.anchors.io.uris import Location
from anchorscan.anchors.signing import Signer
from anchorscan.anchors.spec import FeatureSpec
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
        help="send each M2 as its best rank-R factor (smaller, approximate); statistics of R "
        "dimensions or fewer are sent whole",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=None, help="seed of the noise (default: fresh)"
    )
    parser.add_argument(
        "--sign",
        type=text,
        default=None,
        metavar="KEY",
        help="the site's private key (SITE.key from `anchorscan keygen`): the delta carries its "
        "signature, which `merge --trust` checks",
    )
    return parser


def delta_bytes_bound(metadata: dict) -> int:
    """About what the delta file will take: a mean and an M2 of float64 per statistic."""
    spec = FeatureSpec.from_dict(metadata)
    widths = statistic_widths(spec, metadata["forensic_level_names"])  # a flagged generator's: spec.dim
    return sum(8 * (widths.get(name, spec.dim) + 1) ** 2 for name in metadata["moments"])


def warn_if_others_can_read(key: str) -> None:
    """A private key that users other than its owner can read signs for whoever reads it
    (keygen writes it mode 0600)."""
    path = Location.parse(key).local_path
    if path is not None and os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH):
        logging.warning(
            "--sign %s can be read by other users of this machine (mode %s): whoever reads it can sign "
            "deltas as this site; chmod 600 it, and make a new key pair with `anchorscan keygen` if "
            "others may have copied it",
            key,
            oct(stat.S_IMODE(os.stat(path).st_mode)),
        )


def run(argv=None) -> dict:
    args = parser().parse_args(argv)
    check_paths([args.anchor, args.since, args.output, args.sign])
    signer = Signer(read_bytes(args.sign, 2**16), args.sign) if args.sign else None
    if args.sign:
        warn_if_others_can_read(args.sign)
    site_data = read_checked_file(args.anchor)
    check_writable(args.output, "--output", size=delta_bytes_bound(read_metadata(site_data, args.anchor)))
    site, _ = anchor_from_bytes(site_data, args.anchor)
    base, _ = anchor_from_bytes(read_checked_file(args.since), args.since)
    delta = export_delta(site, base, args.min_count, args.rank, args.noise, np.random.default_rng(args.seed))
    data = delta_to_bytes(delta, signer)
    write_atomically(args.output, data)
    summary = {
        "delta": args.output,
        "n": delta.n,
        "bytes": len(data),
        "statistics": {name: moments.n for name, moments in delta.statistics.items()},
        "noise": delta.noise,
        "ranks": {name: f.shape[1] for name, f in delta.factors.items()},
        "signer": signer.fingerprint if signer else None,
    }
    flagged = {name[5:]: m.n for name, m in delta.statistics.items() if name.startswith("flag.")}
    signed = f"by key {signer.fingerprint[:16]}" if signer else "no (merge --trust will refuse it)"
    print(
        f"delta       {args.output} ({len(data):,} bytes)\n"
        f"images      {delta.n} real since the base; flagged: {flagged or 'none'}\n"
        f"noise       {delta.noise}\n"
        f"rank        {rank_text(args.rank, delta)}\n"
        f"signed      {signed}"
    )
    return summary


def rank_text(rank: int | None, delta) -> str:
    """What --rank did: which statistics were factored, which sent whole because they have no
    more than R dimensions."""
    if rank is None:
        return "full"
    whole = sorted({moments.dim for name, moments in delta.statistics.items() if name not in delta.factors})
    factored = ", ".join(f"{name} {factor.shape[1]}" for name, factor in delta.factors.items())
    note = (
        f"M2 of {'/'.join(map(str, whole))} dimensions sent whole (--rank {rank} is not below it)"
        if whole
        else ""
    )
    return "; ".join(part for part in (f"factored: {factored}" if factored else "", note) if part)
