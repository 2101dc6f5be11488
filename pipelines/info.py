"""`anchorscan info`: what an anchor file holds, after checking its checksum (a modified or
damaged file is refused, never printed as if valid); nothing is derived from it."""

from __future__ import annotations

import json

from anchorscan.anchors.anchor_file import verified_contents
from anchorscan.anchors.calibration import CALIBRATION_PREFIX
from anchorscan.anchors.io.gcs import check_paths
from anchorscan.anchors.io.storage import read_checked_file
from anchorscan.pipelines.flags import command_parser, text

FACTS = (
    "format_version",
    "anchorscan_version",
    "created",
    "backbone",
    "weights_sha256",
    "n",
    "n_calibration",
    "d",
    "d_semantic",
    "d_statistical",
    "d_forensic",
    "shrinkage",
    "k",
    "k_raw",
    "forensic_level_names",
    "checksum",
)


def parser():
    parser = command_parser("info", beam=False)
    parser.add_argument("anchor", type=text, help="the anchor file (local or gs://)")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    return parser


def run(argv=None) -> dict:
    args = parser().parse_args(argv)
    check_paths([args.anchor])
    _, metadata = verified_contents(read_checked_file(args.anchor), args.anchor)
    if args.json:
        print(json.dumps(metadata, sort_keys=True))
        return metadata
    for key in FACTS:
        print(f"{key:20} {metadata.get(key)}")
    for key, value in metadata["config"].items():
        print(f"{key:20} {value}")
    print(f"{'preprocessing':20} {json.dumps(metadata['preprocessing'], sort_keys=True)}")
    # What calibrated it (`anchorscan calibrate` runs, oldest first); statistics ids say nothing.
    for entry in metadata["lineage"]:
        if entry.startswith(CALIBRATION_PREFIX):
            print(f"{'calibrated':20} {entry[len(CALIBRATION_PREFIX) :]}")
    return metadata
