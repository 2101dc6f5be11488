"""Every flag of every command is checked where it is parsed: a bad value exits 2 with one line
that names the flag, before any work. The table of bad values is derived from each parser's own
flags, so a flag added without a check fails here."""

from __future__ import annotations

import argparse
import sys

import pytest

from anchorscan.pipelines import flags
from anchorscan.pipelines.cli import COMMANDS, main

# A valid command line per command (the files need not exist: parsing comes first).
BASE = {
    "fit": ["--input", "in", "--anchor", "OUT/a.safetensors"],
    "score": ["--input", "in", "--anchor", "a.safetensors", "--output", "OUT/scan"],
    "fit-head": ["--kind", "lda", "--real", "r", "--fake", "f", "--output", "OUT/h.safetensors"],
    "evaluate": ["root.csv", "--dataset", "manifest", "--anchor", "a.safetensors", "--output", "OUT/e"],
    "report": ["--scores", "scan", "--output", "OUT/r.html"],
    "info": ["a.safetensors"],
    "update": ["--anchor", "a.safetensors", "--input", "in", "--output", "OUT/a2.safetensors"],
    "calibrate": ["--anchor", "a.safetensors", "--input", "in", "--output", "OUT/a2.safetensors"],
    "flag": ["--anchor", "a.safetensors", "--generator", "g", "--input", "in", "--output", "OUT/a2"],
    "export-delta": ["--anchor", "s.safetensors", "--since", "b.safetensors", "--output", "OUT/d"],
    "keygen": ["--output", "OUT/site"],
    "merge": ["b.safetensors", "d.delta", "--output", "OUT/m.safetensors"],
    "stream": ["--watch", "in", "--anchor", "a.safetensors", "--output", "OUT/s"],
    "curate": ["--scores", "scan", "--output", "OUT/c"],
}

# Bad values for each kind of check; a flag's kind is the function that parses it.
BAD_NUMBERS = ["abc", "nan", "inf", "1e999"]


def bad_values(action: argparse.Action) -> list[str]:
    check = action.type
    if action.choices is not None and check is None:
        return ["nope", ""]
    if check is flags.text:
        return ["", "  "]
    if check is flags.pem_certificates:
        return ["", "/nonexistent/ca.pem", "/dev/null"]
    if check is flags.input_pattern:
        return ["", "  ", "s/{0..1000000}.tar", "{a,b}{0..999999}"]
    if check is flags.regex:
        return ["(", "[a-"]
    if check is flags.generator_name:
        return ["../../x", "", "a" * 65, "-leading"]
    if check is flags.admit_value:
        return ["5", "nan", "abc", "0", "1"]
    if check in (flags.perturbation_value, flags.perturbation_list):
        return ["jpeg:-5", "blur:nan", "scale:0", "nope", "png:3", ""]
    if getattr(check, "__name__", "") == "list":
        return ["", "nope", "forensic,forensic"]
    name = getattr(check, "__name__", "")
    if name == "integer":
        return ["0", "-1", "1.5", "abc", "99999999999"]
    if name == "number":
        return ["0", "-1", *BAD_NUMBERS]
    raise AssertionError(f"{action.option_strings or action.dest}: no check for its values (type={check})")


def is_refused(check, value: str) -> bool:
    try:
        check(value)
    except (argparse.ArgumentTypeError, ValueError):
        return True
    return False


def value_flags(command: str):
    parser = importlib_parser(command)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
            continue
        yield action


def importlib_parser(command: str) -> argparse.ArgumentParser:
    import importlib

    return importlib.import_module(f"anchorscan.pipelines.{COMMANDS[command].module}").parser()


def table():
    rows = []
    for command in COMMANDS:
        for action in value_flags(command):
            for value in bad_values(action):
                if action.type is not None and action.choices is None and not is_refused(action.type, value):
                    continue  # e.g. "0" where 0 is allowed: not bad for this flag
                rows.append(pytest.param(command, action, value, id=f"{command}-{action.dest}-{value!r}"))
    return rows


@pytest.mark.parametrize("command, action, value", table())
def test_a_bad_value_exits_2_with_one_line_naming_the_flag(command, action, value, tmp_path, capsys):
    base = [argument.replace("OUT", str(tmp_path)) for argument in BASE[command]]
    if action.option_strings:
        argv = [command, *base, f"{action.option_strings[-1]}={value}"]
        named = action.option_strings[-1]
    else:  # a positional: replace it
        position = [a.dest for a in value_flags(command) if not a.option_strings].index(action.dest)
        argv = [command, *[value if i == position else a for i, a in enumerate(base)]]
        named = action.metavar or action.dest
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    assert named in error, error
    assert not list(tmp_path.iterdir())  # refused before any work


def test_every_flag_that_takes_a_value_is_checked():
    for command in COMMANDS:
        for action in value_flags(command):
            assert action.type is not None or action.choices is not None, (command, action.option_strings)


@pytest.mark.parametrize(
    "command, extra, words",
    [
        ("fit", ["--attention", "cls"], "--attention cls: efficientnet-lite0 supports zscore, uniform"),
        ("fit-head", ["--features", "all", "--kind", "nn"], "--features all is for the lda head"),
        ("stream", ["--watch", "NOWHERE"], "--watch"),
    ],
)
def test_values_checked_against_each_other_exit_2_with_one_line(command, extra, words, tmp_path, capsys):
    base = [a.replace("OUT", str(tmp_path)) for a in BASE[command]]
    if command == "stream":
        base[base.index("in")] = str(tmp_path / "nowhere")
        extra = ["--runner=FnApiRunner"]
    assert main([command, *base, *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and words in error, error


def test_commands_that_read_and_write_files_do_not_start_beam():
    """info, merge and export-delta need no pipeline: importing them must not import Beam."""
    import subprocess

    code = (
        "import sys\n"
        "import anchorscan.pipelines.info, anchorscan.pipelines.merge, anchorscan.pipelines.export_delta\n"
        "assert not [m for m in sys.modules if m.startswith('apache_beam')], 'Beam was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_resource_flags_are_capped_at_a_multiple_of_the_cores(caplog, monkeypatch):
    from anchorscan.anchors import threads

    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    assert threads.capped_to_cores(3, "--decode_processes") == 3
    assert threads.capped_to_cores(99999, "--decode_processes") == 2 * threads.CORES_MULTIPLE
    assert "--decode_processes 99999 is more than 4 x this worker's cores" in caplog.text
