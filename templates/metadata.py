"""Dataflow Flex templates: each command's template metadata, derived from its parser, and the
launcher's entry point (templates/launch.py) that turns template parameters into the command's
flags, submits the job and returns.

`python -m anchorscan.templates.metadata` rewrites templates/<command>/metadata.json for every
command."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from anchorscan.anchors.errors import UsageError
from anchorscan.anchors.images.perturbations import PERTURBATION_PATTERN
from anchorscan.pipelines.cli import COMMANDS

TEMPLATE_COMMANDS = {"fit": "fit", "score": "score", "stream": "stream"}  # command -> module
STREAMING = {"stream"}

GCS_PATH = r"^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/\S*)?$"
INPUT_LIST = r"^(gs|https?)://[^\s,]+(,(gs|https?)://[^\s,]+)*$"
NUMBER = r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"
INTEGER = r"^[-+]?[0-9]+$"
BOOLEAN = r"^(true|false)$"
# Free-text flags whose values are paths: how each is checked and offered in the console.
PATHS = {
    "input": ("TEXT", INPUT_LIST),
    "anchor": ("GCS_READ_FILE", GCS_PATH),
    "head": ("GCS_READ_FILE", GCS_PATH),
    "weights": ("GCS_READ_FILE", GCS_PATH),
    "skip_scored": ("TEXT", GCS_PATH),
    "output": ("TEXT", GCS_PATH),  # a prefix: PREFIX-scores-*.parquet
    "errors": ("TEXT", GCS_PATH),
    "watch": ("TEXT", GCS_PATH),  # stream: a gs:// prefix or glob
    "learn_real": ("TEXT", GCS_PATH),
}
WRITTEN = {("fit", "anchor"): "GCS_WRITE_FILE"}


def template_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's options that a template exposes: all but --help."""
    return [
        action
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    ]


def _name(action: argparse.Action) -> str:
    return action.option_strings[-1].lstrip("-")


def parameter(command: str, action: argparse.Action) -> dict:
    """One ParameterMetadata (as JSON) for an option of ``command``'s parser."""
    name = _name(action)
    entry = {
        "name": name,
        "label": name.replace("_", " ").capitalize(),
        "helpText": action.help or name,
        "isOptional": not action.required,
    }
    if isinstance(action, argparse._StoreTrueAction):
        entry.update(paramType="BOOLEAN", regexes=[BOOLEAN])
    elif action.choices:
        entry.update(
            paramType="ENUM",
            regexes=[f"^({'|'.join(action.choices)})$"],
            enumOptions=[{"value": choice} for choice in action.choices],
        )
    elif action.type is int:
        entry.update(paramType="NUMBER", regexes=[INTEGER])
    elif action.type is float:
        entry.update(paramType="NUMBER", regexes=[NUMBER])
    elif name in PATHS:
        kind, regex = PATHS[name]
        entry.update(paramType=WRITTEN.get((command, name), kind), regexes=[regex])
    elif name == "perturbation":
        entry.update(paramType="TEXT", regexes=[PERTURBATION_PATTERN])
    else:
        entry.update(paramType="TEXT")
    if isinstance(action, argparse._AppendAction):
        entry["helpText"] = f"{entry['helpText']} (in a template: separate several with commas)"
    if action.default is not None and not action.required:
        default = action.default
        entry["defaultValue"] = str(default).lower() if isinstance(default, bool) else str(default)
    return entry


def parser_of(command: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"anchorscan.pipelines.{TEMPLATE_COMMANDS[command]}").parser()


def metadata(command: str) -> dict:
    parser = parser_of(command)
    return {
        "name": f"anchorscan-{command}",
        "description": f"anchorscan {command}: {COMMANDS[command].description}",
        "parameters": [parameter(command, action) for action in template_options(parser)],
        **({"streaming": True} if command in STREAMING else {}),
    }


def template_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The launcher's ``--name=value`` arguments as the command's flags: a repeatable flag's
    comma-separated values repeated, a switch's true/false as its presence; the rest (Beam's
    options, which the launcher adds) as they are."""
    switches = {
        action.option_strings[-1]
        for action in template_options(parser)
        if isinstance(action, argparse._StoreTrueAction)
    }
    lists = {
        action.option_strings[-1]
        for action in template_options(parser)
        if isinstance(action, argparse._AppendAction)
    }
    flags = []
    for argument in argv:
        flag, has_value, value = argument.partition("=")
        if has_value and flag in switches:
            if value.lower() not in ("true", "false"):
                raise UsageError(f"{flag} takes true or false, not {value!r}")
            flags += [flag] if value.lower() == "true" else []
        elif has_value and flag in lists:
            flags += [f"{flag}={item}" for item in value.split(",") if item]
        else:
            flags.append(argument)
    return flags


def launch(command: str, argv: list[str]):
    """Runs ``command`` as the Flex template launcher calls it: builds and submits the
    pipeline, and returns without waiting for the job."""
    if command not in TEMPLATE_COMMANDS:
        raise UsageError(f"ANCHORSCAN_COMMAND must be one of {', '.join(TEMPLATE_COMMANDS)}, not {command!r}")
    parser = parser_of(command)
    module = importlib.import_module(f"anchorscan.pipelines.{TEMPLATE_COMMANDS[command]}")
    return module.run(template_argv(parser, argv), wait=False)


def write_metadata(folder: str) -> list[str]:
    written = []
    for command in TEMPLATE_COMMANDS:
        path = os.path.join(folder, command, "metadata.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(json.dumps(metadata(command), indent=2) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    print("\n".join(write_metadata(sys.argv[1] if len(sys.argv) > 1 else "templates")))
