"""Turning --input values into image URIs: globs, directories, manifests."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anchorscan.transforms.io import expand_input, manifest_uris, read_bytes, write_atomically


def uris(pattern):
    return [(kind, value if kind == "uri" else value["stage"]) for kind, value in expand_input(pattern)]


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").mkdir()
    for name in ("a/one.jpg", "a/b/two.PNG", "a/notes.txt", "a/b/.three.webp"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_directory_lists_image_files_recursively(tree):
    listed = [value for _, value in uris(str(tree / "a"))]
    assert listed == sorted([str(tree / "a/one.jpg"), str(tree / "a/b/two.PNG"),
                             str(tree / "a/b/.three.webp")])


def test_glob_matches_exactly_what_it_says(tree):
    assert uris(str(tree / "a" / "*.txt")) == [("uri", str(tree / "a/notes.txt"))]


def test_input_naming_nothing_is_an_error_row(tree):
    assert uris(str(tree / "missing" / "*.jpg")) == [("error", "list")]
    assert uris(str(tree / "missing.csv")) == [("error", "list")]


@pytest.mark.parametrize("kind", ["txt", "csv", "parquet"])
def test_manifest_entries_resolve_relative_to_the_manifest(tree, kind):
    entries = ["a/one.jpg", str(tree / "a/b/two.PNG"), "gs://bucket/x.jpg"]
    manifest = tree / f"list.{kind}"
    if kind == "txt":
        manifest.write_text("# comment\n" + "\n".join(entries) + "\n\n")
    elif kind == "csv":
        manifest.write_text("label,uri\n" + "".join(f"real,{entry}\n" for entry in entries))
    else:
        pq.write_table(pa.table({"uri": entries}), manifest)
    assert manifest_uris(str(manifest)) == [str(tree / "a/one.jpg"), str(tree / "a/b/two.PNG"),
                                            "gs://bucket/x.jpg"]


def test_csv_manifest_without_uri_column_is_an_error_row(tree):
    manifest = tree / "bad.csv"
    manifest.write_text("path\nx.jpg\n")
    [(kind, row)] = list(expand_input(str(manifest)))
    assert kind == "error" and "lacks the column(s) uri (its columns: path)" in row["error"]


def test_atomic_write_replaces_the_whole_file(tmp_path):
    target = str(tmp_path / "file.bin")
    write_atomically(target, b"first")
    write_atomically(target, b"second")
    assert read_bytes(target) == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
