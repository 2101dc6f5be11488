"""Merge sites' deltas into their common base (docs/METHOD.md §9.4): the CombineFn's merge on
every named statistic, then calibrated again on the base's held-out images. Every delta is
checked first - its numbers, its signature (with --trust), that the base holds none of it - and
the output is checked writable before any of that work."""

from __future__ import annotations

import logging
import posixpath

from anchorscan.anchors.anchor_file import anchor_from_bytes, anchor_to_bytes
from anchorscan.anchors.errors import UsageError
from anchorscan.anchors.federation import check_signatures, delta_from_bytes, merge
from anchorscan.anchors.io.gcs import check_paths
from anchorscan.anchors.io.storage import (
    check_writable,
    files_in,
    read_bytes,
    read_checked_file,
    write_atomically,
)
from anchorscan.anchors.signing import fingerprint, public_key, trusted_keys
from anchorscan.pipelines.flags import command_parser, text


def parser():
    parser = command_parser("merge", beam=False)
    parser.add_argument("base", type=text, help="the base anchor every delta was exported against")
    parser.add_argument("deltas", type=text, nargs="+", metavar="DELTA", help="delta files")
    parser.add_argument("--output", type=text, required=True, help="the merged anchor file to write")
    parser.add_argument(
        "--trust",
        type=text,
        default=None,
        metavar="DIR",
        help="a folder of the enrolled sites' public keys (SITE.pub from `anchorscan keygen`): only "
        "deltas signed by one of them are merged (default: any delta, with a warning)",
    )
    return parser


def trusted_sites(folder: str) -> tuple[dict, dict[str, str]]:
    """The public keys in ``folder``/*.pub by fingerprint, and their file names by fingerprint.
    A private key there (SITE.key) is warned about: it belongs on its site alone."""
    files = files_in(folder, ".pub")
    if not files:
        raise UsageError(f"--trust {folder}: no .pub files there (the sites' keys from `anchorscan keygen`)")
    for path in files_in(folder, ".key"):
        logging.warning(
            "--trust %s holds %s, a private key: it belongs on its site alone (whoever reads it can "
            "sign deltas as that site); remove it, and have the site make a new key pair with "
            "`anchorscan keygen` if it was copied",
            folder,
            posixpath.basename(path),
        )
    pems = {path: read_bytes(path, 2**16) for path in files}
    names = {fingerprint(public_key(pem, path)): posixpath.basename(path) for path, pem in pems.items()}
    return trusted_keys(pems), names


def run(argv=None) -> dict:
    args = parser().parse_args(argv)
    check_paths([args.base, *args.deltas, args.output, args.trust])
    base_data = read_checked_file(args.base)
    # The merged anchor holds what the base holds, the new statistics in place of the old.
    check_writable(args.output, "--output", size=len(base_data))
    trusted, key_names = trusted_sites(args.trust) if args.trust else (None, {})
    base, metadata = anchor_from_bytes(base_data, args.base)
    deltas = [delta_from_bytes(read_checked_file(uri), uri) for uri in args.deltas]  # all checked first
    for warning in check_signatures(deltas, trusted, args.deltas):
        logging.warning("%s", warning)
    merged = merge(base, deltas, args.deltas)
    write_atomically(args.output, anchor_to_bytes(merged, metadata["projection"]))
    summary = {
        "anchor": args.output,
        "n_before": base.moments.n,
        "n": merged.moments.n,
        "deltas": len(deltas),
        "flagged": {k: m.n for k, m in merged.flagged.items()},
        "signed_by": [delta.signer for delta in deltas],
    }
    # With --trust every delta verified under an enrolled key (check_signatures refused the rest).
    verified = (
        [(name, key_names[delta.signer or ""], delta.signer) for delta, name in zip(deltas, args.deltas)]
        if trusted is not None
        else []
    )
    summary["verified_by"] = [key for _, key, _ in verified]
    trust = "".join(
        f"trust       {name} verified by {key} (fingerprint {signer})\n" for name, key, signer in verified
    )
    print(
        f"anchor      {args.output}\n"
        f"merged      {len(deltas)} deltas: n {base.moments.n} -> {merged.moments.n} real images; "
        f"flagged: {summary['flagged'] or 'none'}\n"
        f"{trust or 'trust       signatures not checked (no --trust)' + chr(10)}"
        f"calibrated  on the base's {merged.n_calibration} held-out images"
    )
    return summary
