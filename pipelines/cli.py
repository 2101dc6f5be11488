"""The `anchorscan` command: one subcommand per pipeline, each with its own parser."""

from __future__ import annotations

import importlib
import logging
import sys
import traceback

from anchorscan.anchors.errors import UserError

# command -> (module under anchorscan.pipelines, one line of usage)
COMMANDS = {
    "fit": ("fit", "--input PATTERN_OR_MANIFEST [--input ...] --anchor OUT_FILE [--backbone NAME]"),
    "score": (
        "score",
        "--input PATTERN_OR_MANIFEST [--input ...] --anchor FILE --output PREFIX [--head HEAD]",
    ),
    "fit-head": ("fit_head", "--kind nn|lda|logistic --real PATTERN --fake PATTERN --output HEAD"),
    "evaluate": ("evaluate", "ROOT --dataset forensynths|genimage|manifest --anchor A --output DIR"),
    "report": ("report", "--scores PREFIX --output report.html [--anchor A] [--labels MANIFEST]"),
    "info": ("info", "ANCHOR [--json]"),
    "update": ("update", "--anchor A --input PATTERN [--input ...] --output A2 [--admit fpr|none|P]"),
    "flag": ("flag", "--anchor A --generator NAME --input PATTERN --output A2"),
    "export-delta": ("export_delta", "--anchor SITE --since BASE --output DELTA [--noise S] [--rank R]"),
    "merge": ("merge", "BASE DELTA [DELTA ...] --output A"),
    "stream": (
        "stream",
        "--watch LOCATION --anchor A --output PREFIX [--window_seconds 60] [--learn_real PATTERN]",
    ),
    "curate": (
        "curate",
        "--scores PREFIX --output PREFIX [--max_score S | --drop_top F] [--reshard] [--samples_per_shard N]",
    ),
}
USAGE = (
    "usage: anchorscan [--debug] COMMAND [options]\n\ncommands:\n"
    + "\n".join(f"  {name:12} {usage}" for name, (_, usage) in COMMANDS.items())
    + (
        "\n\n`anchorscan COMMAND --help` lists a command's options; pipelines pass other flags to Beam."
        "\n--debug prints the traceback of an error (exit status 2: a mistake in the command line or "
        "its files; 1: an internal error)."
    )
)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 on success, 2 on a mistake the user can fix (one line says what and how),
    1 on an internal error (with its traceback). ``--debug`` anywhere: tracebacks for both."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"anchorscan: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        importlib.import_module(f"anchorscan.pipelines.{COMMANDS[command][0]}").run(rest)
    except SystemExit as exit_:  # argparse: --help, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    except UserError as error:
        if debug:
            traceback.print_exc()
        print(f"anchorscan {command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"anchorscan {command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        print(
            f"anchorscan {command}: internal error (a bug in anchorscan or a library it uses; "
            "please report it with this traceback):",
            file=sys.stderr,
        )
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
