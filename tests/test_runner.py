"""The command runner (pipelines/runner.py) and declared bounds (anchors/constraints.py): a
bound gives the parser and the settings object one message; a failed run leaves exactly what
was there before it."""

from __future__ import annotations

import os

import apache_beam as beam
import pyarrow as pa
import pytest

from anchorscan.anchors.anchor import AnchorConfig
from anchorscan.anchors.errors import UsageError
from anchorscan.pipelines import fit
from anchorscan.pipelines.cli import main
from anchorscan.pipelines.flags import text
from anchorscan.pipelines.options import parse
from anchorscan.pipelines.runner import BeamCommand, Guarded
from anchorscan.transforms.sinks import OutputExistsError, Outputs
from helpers import RUNNER

# A value outside each bound of fit's anchor group, and what both sides must say of it.
OUTSIDE = {
    "fpr": ("0.7", "must be in (0, 0.5], got 0.7"),
    "explained_variance": ("0.0", "must be in (0, 1], got 0.0"),
    "calibration_fraction": ("1.0", "must be in (0, 1), got 1.0"),
    "alarm_share": ("0.3", "must be in (0, 0.25], got 0.3"),
}


@pytest.mark.parametrize("name", sorted(OUTSIDE))
def test_a_declared_bound_says_the_same_from_the_parser_and_the_settings(name, tmp_path, capsys):
    assert set(OUTSIDE) == set(fit.ANCHOR_BOUNDS)
    value, problem = OUTSIDE[name]
    required = ["--input", str(tmp_path), "--anchor", str(tmp_path / "a.safetensors")]

    assert main(["fit", *required, f"--{name}", value]) == 2
    assert f"argument --{name}: {problem} (see" in capsys.readouterr().err

    args, _ = parse(fit.parser(), required)  # set past the parser, as a caller of the API may
    setattr(args, name, float(value))
    with pytest.raises(UsageError) as refused:
        fit.anchor_config(args)
    assert str(refused.value) == f"--{name} {problem}"


def test_fits_settings_hold_the_fpr_bound_of_its_flag(tmp_path):
    """--fpr 0.5 is the largest either side takes; 0.6, refused by the flag, is refused by fit's
    settings and by AnchorConfig built alone (a template, the Python API) in the same words."""
    required = ["--input", str(tmp_path), "--anchor", str(tmp_path / "a.safetensors")]
    args, _ = parse(fit.parser(), [*required, "--fpr", "0.5"])
    assert fit.anchor_config(args).fpr == 0.5
    args.fpr = 0.6
    with pytest.raises(UsageError, match=r"--fpr must be in \(0, 0.5\], got 0.6"):
        fit.anchor_config(args)
    with pytest.raises(UsageError, match=r"--fpr must be in \(0, 0.5\], got 0.6"):
        AnchorConfig(fpr=0.6)


WRITTEN: list[str] = []  # what the toy's failing step saw written (the in-process runner)


def _fail_after_writing(path: str) -> None:
    WRITTEN.append(path)
    assert os.path.exists(path)
    raise RuntimeError(f"the toy fails after writing {path}")


def toy_command() -> BeamCommand:
    """A command that writes a table of three rows under --output, then fails."""

    def flags(parser):
        parser.add_argument("--output", type=text, required=True)
        parser.add_argument("--overwrite", action="store_true")

    def graph(pipeline, args, options, prepared):
        _ = (
            pipeline
            | beam.Create([{"n": n} for n in range(3)])
            | beam.io.WriteToParquet(
                f"{args.output}-toy", pa.schema([("n", pa.int64())]), file_name_suffix=".parquet"
            )
            | beam.Map(_fail_after_writing)
        )

    return BeamCommand(
        "score",  # a name cli.COMMANDS describes, for the parser's description
        (flags,),
        prepare=lambda args, options: Outputs(args.output, (r"-toy-\d+-of-\d+\.parquet",)),
        tables=lambda args, prepared: [f"{args.output}-toy"],
        graph=graph,
        summary=lambda args, prepared, counters: {},
        printed=print,
        guarded=lambda args, outputs: Guarded(outputs, args.overwrite, [], "toy tables"),
    )


def test_the_runner_removes_exactly_what_a_failed_run_wrote(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    # Files that begin with the prefix but are no output of the toy's, there before the run.
    for name in ("scan-toy-notes.parquet", "scan-toy.txt", "scan-errors-00000-of-00001.parquet"):
        (folder / name).write_bytes(b"not ours")
    before = sorted(os.listdir(folder))
    WRITTEN.clear()

    with pytest.raises(Exception, match="the toy fails after writing"):
        toy_command().run(["--output", str(folder / "scan"), *RUNNER])

    assert WRITTEN, "the toy's table was written before it failed"
    assert sorted(os.listdir(folder)) == before  # its table, temporary folder and lock gone
    assert all((folder / name).read_bytes() == b"not ours" for name in before)


def test_the_runner_refuses_a_guarded_output_and_overwrites_only_its_own(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    earlier = folder / "scan-toy-00000-of-00001.parquet"
    earlier.write_bytes(b"an earlier run's")
    other = folder / "scan-toy-notes.parquet"
    other.write_bytes(b"not ours")

    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        toy_command().run(["--output", str(folder / "scan"), *RUNNER])
    assert earlier.read_bytes() == b"an earlier run's"

    with pytest.raises(Exception, match="the toy fails after writing"):
        toy_command().run(["--output", str(folder / "scan"), "--overwrite", *RUNNER])
    # The earlier table was replaced, and the failed run's own is removed again.
    assert sorted(os.listdir(folder)) == ["scan-toy-notes.parquet"]


def test_the_http_group_refuses_a_value_past_its_parser_in_its_flags_words(tmp_path, capsys):
    from anchorscan.pipelines import score
    from anchorscan.pipelines.options import http_config

    required = ["--input", str(tmp_path), "--anchor", "a", "--output", str(tmp_path / "scan")]
    assert main(["score", *required, "--http_retries", "30"]) == 2
    assert "argument --http_retries: must be from 0 to 20, got 30 (see" in capsys.readouterr().err

    args, _ = parse(score.parser(), required)
    args.http_retries = 30
    with pytest.raises(UsageError, match=r"^--http_retries must be from 0 to 20, got 30$"):
        http_config(args)


def test_the_chain_refuses_a_value_past_its_parser_in_its_flags_words(tmp_path, capsys):
    from anchorscan.pipelines import score
    from anchorscan.pipelines.common import chain_steps

    required = ["--input", str(tmp_path), "--anchor", "a", "--output", str(tmp_path / "scan")]
    assert main(["score", *required, "--decode_timeout", "0"]) == 2
    assert "argument --decode_timeout: must be above 0, got 0 (see" in capsys.readouterr().err

    args, options = parse(score.parser(), required)
    args.decode_timeout = 0
    with pytest.raises(UsageError, match=r"^--decode_timeout must be above 0, got 0$"):
        chain_steps(args, options, None, None)  # refused before the backbone is looked at
