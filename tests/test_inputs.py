"""Turning --input values into image URIs: globs, directories, manifests."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anchorscan.anchors.io.storage import read_bytes, write_atomically
from anchorscan.transforms.listing import expand_input, manifest_entries
from helpers import listed


def uris(pattern):
    return [
        (kind, value if kind == "uri" else value["stage"]) for kind, value in listed(expand_input(pattern))
    ]


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").mkdir()
    for name in ("a/one.jpg", "a/b/two.PNG", "a/notes.txt", "a/b/.three.webp"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_directory_lists_image_files_recursively(tree):
    listed = [value for _, value in uris(str(tree / "a"))]
    assert listed == sorted(
        [str(tree / "a/one.jpg"), str(tree / "a/b/two.PNG"), str(tree / "a/b/.three.webp")]
    )


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
    assert listed(manifest_entries(str(manifest))) == [
        ("uri", str(tree / "a/one.jpg")),
        ("uri", str(tree / "a/b/two.PNG")),
        ("uri", "gs://bucket/x.jpg"),
    ]


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


def rows(pattern):
    """(kind, uri or (uri, stage, error)) of everything an input lists."""
    return [
        (kind, value if kind == "uri" else (value["uri"], value["stage"], value["error"]))
        for kind, value in listed(expand_input(pattern))
    ]


@pytest.fixture
def linked(tmp_path):
    """photos/ with a link to a folder outside it, a link back to itself and a dangling link."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "inside.jpg").write_bytes(b"x")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "own.jpg").write_bytes(b"x")
    (photos / "linked").symlink_to(tmp_path / "elsewhere")
    (photos / "loop").symlink_to(photos)
    (photos / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    return photos


def test_a_folder_follows_links_to_folders_and_reports_loops(linked):
    listed = rows(str(linked))
    loop = str(linked / "loop")
    assert listed == [
        ("uri", str(linked / "dangling.jpg")),  # listed: its read reports the broken link
        ("uri", str(linked / "linked" / "inside.jpg")),
        (
            "error",
            (
                loop,
                "list",
                f"a symbolic link loop: {loop} leads back to {linked}, a folder above it; not followed",
            ),
        ),
        ("uri", str(linked / "own.jpg")),
    ]


def test_a_glob_follows_links_as_a_shell_does(linked):
    assert rows(str(linked / "*" / "*.jpg")) == [
        ("uri", str(linked / "linked" / "inside.jpg")),
        ("uri", str(linked / "loop" / "dangling.jpg")),
        ("uri", str(linked / "loop" / "own.jpg")),
    ]
    loop = str(linked / "loop")
    assert rows(str(linked / "**.jpg")) == [
        ("uri", str(linked / "dangling.jpg")),
        ("uri", str(linked / "linked" / "inside.jpg")),
        (
            "error",
            (
                loop,
                "list",
                f"a symbolic link loop: {loop} leads back to {linked}, a folder above it; not followed",
            ),
        ),
        ("uri", str(linked / "own.jpg")),
    ]


def test_a_link_that_leads_to_itself_is_listed_and_left_to_the_read(tmp_path):
    (tmp_path / "self.jpg").symlink_to(tmp_path / "self.jpg")
    assert rows(str(tmp_path)) == [("uri", str(tmp_path / "self.jpg"))]


def test_names_that_are_not_utf8_are_listed_as_reversible_text(tmp_path):
    from anchorscan.anchors.io.uris import Location

    name = os.fsencode(str(tmp_path)) + b"/caf\xe9.png"
    with open(name, "wb") as handle:
        handle.write(b"x")
    [(kind, uri)] = rows(str(tmp_path))
    assert kind == "uri" and uri == f"file://{tmp_path}/caf%E9.png"
    uri.encode("utf-8")  # what every coder and Parquet column needs
    assert os.fsencode(Location.parse(uri).local_path) == name


def test_a_text_manifest_may_name_files_that_are_not_utf8(tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_bytes(b"caf\xe9.png\n")
    assert rows(str(manifest)) == [("uri", f"file://{tmp_path}/caf%E9.png")]


@pytest.mark.parametrize("content", ["", "uri\n", "# only a comment\n"], ids=["empty", "header", "comment"])
def test_a_manifest_that_lists_nothing_is_an_error_row(tmp_path, content):
    manifest = tmp_path / ("list.csv" if content == "uri\n" else "list.txt")
    manifest.write_text(content)
    assert rows(str(manifest)) == [
        ("error", (str(manifest), "list", "the manifest lists no images (it is empty or has a header only)"))
    ]


def test_each_blank_or_null_uri_of_a_manifest_is_an_error_row(tmp_path):
    csv_manifest = tmp_path / "list.csv"
    csv_manifest.write_text("uri,label\na.jpg,real\n,fake\n  ,real\n")
    assert rows(str(csv_manifest)) == [
        ("uri", str(tmp_path / "a.jpg")),
        (
            "error",
            (f"{csv_manifest}#row=2", "list", "row 2 of the manifest (line 3) has no uri (blank or null)"),
        ),
        (
            "error",
            (f"{csv_manifest}#row=3", "list", "row 3 of the manifest (line 4) has no uri (blank or null)"),
        ),
    ]
    parquet_manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": ["a.jpg", None, ""]}), parquet_manifest)
    assert [value for kind, value in rows(str(parquet_manifest)) if kind == "error"] == [
        (f"{parquet_manifest}#row=2", "list", "row 2 of the manifest has no uri (blank or null)"),
        (f"{parquet_manifest}#row=3", "list", "row 3 of the manifest has no uri (blank or null)"),
    ]


def test_repeated_inputs_are_listed_once():
    from anchorscan.transforms.listing import distinct_patterns

    assert distinct_patterns(["a/*.jpg", "photos/", "a/*.jpg", "photos", "/"]) == ["a/*.jpg", "photos", "/"]
