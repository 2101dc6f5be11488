"""The `anchorscan` command: one subcommand per pipeline, each with its own parser."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
import traceback

from anchorscan.anchors.errors import UserError, environment_failure
from anchorscan.anchors.threads import limit_blas_threads


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its module under anchorscan.pipelines, one line of usage, and the
    description its parser, `anchorscan --help` and its Flex template show."""

    module: str
    usage: str
    description: str


COMMANDS = {
    "fit": Command(
        "fit",
        "--input PATTERN_OR_MANIFEST [--input ...] --anchor OUT_FILE [--backbone NAME]",
        "Fit an anchor (statistics of a frozen backbone's and the pixels' features) on real images.",
    ),
    "score": Command(
        "score",
        "--input PATTERN_OR_MANIFEST [--input ...] --anchor FILE --output PREFIX [--head HEAD]",
        "Score images against an anchor; write Parquet tables of scores and of the inputs that "
        "could not be scored.",
    ),
    "fit-head": Command(
        "fit_head",
        "--kind nn|lda|logistic --real PATTERN --fake PATTERN --output HEAD",
        "Fit a UnivFD head on labelled real and generated images.",
    ),
    "evaluate": Command(
        "evaluate",
        "ROOT --dataset forensynths|genimage|manifest --anchor A --output DIR",
        "Score a labelled dataset and write per-generator metrics. Write Beam's flags as "
        "--name=value or after ROOT, so that their values are not taken for ROOT.",
    ),
    "report": Command(
        "report",
        "--scores PREFIX --output report.html [--anchor A] [--labels MANIFEST]",
        "Write one self-contained HTML page about a scan.",
    ),
    "info": Command("info", "ANCHOR [--json]", "Print an anchor's metadata, after checking its checksum."),
    "calibrate": Command(
        "calibrate",
        "--anchor A --input REAL_IMAGES [--input ...] --output A2 [--keep_held_out]",
        "Calibrate an anchor's p-values on your own real images (its statistics stay as they are).",
    ),
    "update": Command(
        "update",
        "--anchor A --input PATTERN [--input ...] --output A2 [--admit fpr|none|P]",
        "Absorb more real images into an anchor: exact statistics, the fit's hold-out rule, "
        "calibrated again.",
    ),
    "flag": Command(
        "flag",
        "--anchor A --generator NAME --input PATTERN --output A2",
        "Add images known to come from one generator to the anchor as a flagged class (10-30 "
        "images suffice).",
    ),
    "keygen": Command(
        "keygen",
        "--output SITE",
        "Make a site's key pair (SITE.key, SITE.pub) to sign its deltas for `merge --trust`.",
    ),
    "export-delta": Command(
        "export_delta",
        "--anchor SITE --since BASE --output DELTA [--sign SITE.key] [--noise S] [--rank R]",
        "Write a site's statistics since a common base anchor, for `anchorscan merge` elsewhere.",
    ),
    "merge": Command(
        "merge",
        "BASE DELTA [DELTA ...] --output A [--trust DIR]",
        "Merge deltas from `anchorscan export-delta` into the base anchor; with --trust, only "
        "deltas signed by an enrolled site.",
    ),
    "stream": Command(
        "stream",
        "--watch LOCATION --anchor A --output PREFIX [--window_seconds 60] [--learn_real PATTERN]",
        "Watch a location for new images and score each once, in windows, against the newest anchor file.",
    ),
    "curate": Command(
        "curate",
        "--scores PREFIX --output PREFIX [--max_score S | --drop_top F] [--reshard] [--samples_per_shard N]",
        "Turn a scan's tables into what a training job reads: every sample kept or dropped (with "
        "the reason), the sorted kept keys, and optionally shards of the kept samples.",
    ),
}
USAGE = (
    "usage: anchorscan [--debug] COMMAND [options]\n\ncommands:\n"
    + "\n".join(f"  {name:12} {command.usage}" for name, command in COMMANDS.items())
    + (
        "\n\n`anchorscan COMMAND --help` lists a command's options; pipelines pass other flags to Beam."
        "\nExit status: 0 done; 2 the arguments or their files are wrong or refused; 3 the environment "
        "(disk full, read-only, permission, network); 1 an internal error (a bug). --debug prints "
        "the traceback of any error."
    )
)


EXIT_DONE, EXIT_BUG, EXIT_USER, EXIT_ENVIRONMENT = 0, 1, 2, 3


class _UserErrorTracebacks(logging.Filter):
    """Beam logs the traceback of an error that a step raises before the command sees it; a
    user error's one line says what to fix, so its traceback shows with --debug only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], UserError))


BEAM_STEP_ERRORS = logging.getLogger("apache_beam.runners.common")
QUIET_USER_ERRORS = _UserErrorTracebacks()


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 on success; 2 on a mistake the user can fix and on a refusal (one line says
    what and how); 3 when the environment stopped the command (a full disk, a read-only file
    system, permission denied on an output, storage or the network unreachable: one line); 1 on
    an internal error (with its traceback). ``--debug`` anywhere: tracebacks for all."""
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
    if debug:
        BEAM_STEP_ERRORS.removeFilter(QUIET_USER_ERRORS)
    else:
        BEAM_STEP_ERRORS.addFilter(QUIET_USER_ERRORS)
    limit_blas_threads()  # the driver's eigendecompositions and the in-process runners' workers
    try:
        importlib.import_module(f"anchorscan.pipelines.{COMMANDS[command].module}").run(rest)
    except SystemExit as exit_:  # argparse: --help, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    except UserError as error:
        return _one_line(command, error, EXIT_USER, debug)
    except KeyboardInterrupt:
        print(f"anchorscan {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        failure = environment_failure(error)  # also what a runner's worker met, wrapped
        if failure is not None:
            return _one_line(command, failure, EXIT_ENVIRONMENT, debug)
        print(
            f"anchorscan {command}: internal error (a bug in anchorscan or a library it uses; "
            "please report it with this traceback):",
            file=sys.stderr,
        )
        traceback.print_exc()
        return EXIT_BUG
    return EXIT_DONE


def _one_line(command: str, error: BaseException, status: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"anchorscan {command}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
