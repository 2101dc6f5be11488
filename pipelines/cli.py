"""The `anchorscan` command: fit, score, info."""
from __future__ import annotations

import argparse
import json
import logging
import sys

USAGE = """usage: anchorscan COMMAND [options]

commands:
  fit     --input PATTERN_OR_MANIFEST [--input ...] --anchor OUT_FILE [--backbone NAME] [beam options]
  score   --input PATTERN_OR_MANIFEST [--input ...] --anchor FILE --output PREFIX [--head HEAD] [beam options]
  fit-head --kind nn|lda|logistic --real PATTERN [--real ...] --fake PATTERN [--fake ...] --output HEAD [--backbone NAME]
  evaluate --layout forensynths|genimage|manifest ROOT --anchor A [--head anchor|HEAD|anchor+HEAD] --output DIR
  report  --scores PREFIX --output report.html [--anchor A] [--labels MANIFEST]
  info    ANCHOR [--json]

`anchorscan COMMAND --help` lists a command's options."""


def info(argv: list[str]) -> int:
    from anchorscan.anchors.anchor_file import read_metadata
    from anchorscan.transforms.io import read_bytes

    parser = argparse.ArgumentParser(prog="anchorscan info", description="Print an anchor's metadata.")
    parser.add_argument("anchor")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args(argv)
    metadata = read_metadata(read_bytes(args.anchor))
    if args.json:
        print(json.dumps(metadata, sort_keys=True))
        return 0
    for key in ("format_version", "anchorscan_version", "created", "backbone", "weights_sha256",
                "n", "n_calibration", "d", "d_semantic", "d_statistical", "shrinkage", "k",
                "k_raw", "fpr", "combine", "statistical", "checksum"):
        print(f"{key:20} {metadata.get(key)}")
    print(f"{'preprocessing':20} {json.dumps(metadata['preprocessing'], sort_keys=True)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from anchorscan.anchors.anchor_file import AnchorFileError
    from anchorscan.anchors.backbones import MissingWeightsError
    from anchorscan.anchors.heads import HeadFileError
    from anchorscan.anchors.spec import IncompatibleAnchorError
    from anchorscan.anchors.weights import WeightsError

    try:
        if command == "info":
            return info(rest)
        if command == "fit":
            from anchorscan.pipelines import fit
            fit.run(rest)
        elif command == "score":
            from anchorscan.pipelines import score
            score.run(rest)
        elif command == "report":
            from anchorscan.pipelines import report
            report.run(rest)
        elif command == "evaluate":
            from anchorscan.pipelines import evaluate
            evaluate.run(rest)
        elif command == "fit-head":
            from anchorscan.pipelines import fit_head
            fit_head.run(rest)
        else:
            print(f"anchorscan: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            return 2
    except (AnchorFileError, HeadFileError, IncompatibleAnchorError, MissingWeightsError, WeightsError,
            FileNotFoundError, ValueError) as error:
        print(f"anchorscan {command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
