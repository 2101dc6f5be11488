"""One import name: the folders at the repository root install as `anchorscan.*`, and nothing
of ours can be shadowed by, or shadow, a user's `pipelines/` or another distribution."""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
OUR_FOLDERS = ("anchors", "transforms", "pipelines")


def python_files():
    for folder in (*OUR_FOLDERS, "tests", "benchmarks", "demo"):
        yield from (ROOT / folder).rglob("*.py")


@pytest.mark.parametrize("path", sorted(python_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_bare_top_level_name_of_ours(path):
    bare = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and not node.level
            else []
        )
        bare += [name for name in names if name.split(".")[0] in OUR_FOLDERS]
    assert not bare, f"{path.name} imports {bare}: write anchorscan.{bare[0]}"


def test_no_module_imports_one_that_imports_it():
    """The package's import graph, imports inside functions included, has no cycle."""
    modules = {}
    for folder in (*OUR_FOLDERS, "templates"):
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(("anchorscan", *parts)).removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = (imported & modules.keys()) - {name}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as cycle:
        pytest.fail(f"modules import each other: {' -> '.join(cycle.args[1])}")


def test_the_wheel_holds_no_top_level_package_but_anchorscan(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("anchorscan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"anchorscan"}
    for folder in OUR_FOLDERS:
        assert f"anchorscan/{folder}/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "anchorscan = anchorscan.pipelines.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture
def decoy_folder(tmp_path):
    """A working directory like a data repository's: its own pipelines/ and transforms.py, which
    must never be imported in our place."""
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "__init__.py").write_text(
        "raise ImportError('the decoy pipelines/ was imported')\n"
    )
    (tmp_path / "transforms.py").write_text("raise ImportError('the decoy transforms.py was imported')\n")
    (tmp_path / "anchors.py").write_text("raise ImportError('the decoy anchors.py was imported')\n")
    return tmp_path


def run_cli(args, cwd):
    command = Path(sys.executable).with_name("anchorscan")
    return subprocess.run(
        [str(command), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(cwd)},
    )


def test_info_and_score_work_beside_decoy_packages(decoy_folder, fitted_anchor, real_photos):
    anchor, _ = fitted_anchor
    info = run_cli(["info", str(anchor)], decoy_folder)
    assert info.returncode == 0, info.stderr
    assert "efficientnet-lite0" in info.stdout
    photos = sorted(real_photos.iterdir())[:2]
    scored = run_cli(
        [
            "score",
            "--input",
            str(photos[0]),
            "--input",
            str(photos[1]),
            "--anchor",
            str(anchor),
            "--output",
            str(decoy_folder / "out" / "scan"),
            "--runner",
            "FnApiRunner",
        ],
        decoy_folder,
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "scored      2 images" in scored.stdout
