"""Location: a URI classified once. Its str() is the URI exactly as written (outputs and error
rows keep every byte), and each property answers as the string checks it replaced did (their
definitions are kept here as the reference)."""

from __future__ import annotations

import os
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anchorscan.anchors.io.uris import FILE_SCHEME, Location, uri_text

# The URIs the tests and the README name: shard members, brace patterns, globs, every scheme.
URIS = [
    "photos/a.jpg",
    "/data/images/x.PNG",
    "./relative/../folder/",
    "",
    "gs://bucket/x.jpg",
    "gs://bucket/shards/{00000..00009}.tar",
    "gs://b/s/00012.TAR#000120045",
    "http://images.example/1.jpg",
    "HTTPS://Example.com/shards/00001.tar.gz#key",
    "https://host/a.tgz#k#member=5",
    "shards/00000.tar#000000001",
    "shards/00000.tar##member=3",
    "shards/00000.tar#dup#member=2",
    "/abs/data-{a..c}/*.jpg",
    "file:///data/caf%E9.png",
    "s3://bucket/key.jpg",
    "folder.tar/not-a-member.jpg",
    "#.tar#x",
    "caf\udce9.png",
]

SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")


def _old_split_sample_uri(uri: str) -> tuple[str, str] | None:
    """shards.split_sample_uri as it was before Location."""
    lowered = uri.lower()
    cuts = [lowered.find(extension + "#") for extension in SHARD_EXTENSIONS]
    cuts = [cut + len(extension) for cut, extension in zip(cuts, SHARD_EXTENSIONS) if cut > 0]
    if not cuts:
        return None
    cut = min(cuts)
    return uri[:cut], uri[cut + 1 :]


def _old_is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith(FILE_SCHEME)


def _old_local_path(uri: str) -> str | None:
    if uri.startswith(FILE_SCHEME):
        return os.fsdecode(urllib.parse.unquote_to_bytes(uri[len(FILE_SCHEME) :]))
    return None if _old_is_remote(uri) else uri


def _old_is_http(uri: str) -> bool:
    return urllib.parse.urlsplit(uri).scheme.lower() in ("http", "https")


def _answers_as_before(uri: str) -> None:
    location = Location.parse(uri)
    assert str(location) == uri
    assert Location.parse(location) is location
    assert location == Location.parse(uri) and hash(location) == hash(Location.parse(uri))
    assert location.is_remote == _old_is_remote(uri)
    assert location.is_gcs == uri.startswith("gs://")
    assert location.is_absolute == ("://" in uri or uri.startswith("/"))
    assert location.local_path == _old_local_path(uri)
    assert location.is_shard == uri.lower().endswith(SHARD_EXTENSIONS)
    assert location.shard_and_key == _old_split_sample_uri(uri)
    if location.shard_and_key is not None:
        assert str(Location.sample(*location.shard_and_key)) == uri
    try:
        expected_http: bool | type[ValueError] = _old_is_http(uri)
    except ValueError:  # a broken host ("http://[::1"): refused as before
        expected_http = ValueError
    if expected_http is ValueError:
        with pytest.raises(ValueError):
            _ = location.is_http
    else:
        assert location.is_http == expected_http


@pytest.mark.parametrize("uri", URIS)
def test_location_answers_as_the_string_checks_did(uri):
    _answers_as_before(uri)


def test_location_parts():
    member = Location.parse("gs://b/s/00012.TAR#000120045")
    assert (member.shard, member.key, member.is_gcs, member.is_remote) == (
        "gs://b/s/00012.TAR",
        "000120045",
        True,
        True,
    )
    assert Location.parse("shards/00000.tar##member=3").key == "#member=3"
    local = Location.parse("photos/a.jpg")
    assert (local.shard, local.key, local.is_remote, local.local_path) == (None, None, False, "photos/a.jpg")
    # Brace patterns are left alone: a Location names the pattern, not what it expands to.
    assert (
        str(Location.parse("gs://bucket/shards/{00000..00009}.tar"))
        == "gs://bucket/shards/{00000..00009}.tar"
    )
    assert Location.parse(uri_text("/data/caf\udce9.png")).local_path == "/data/caf\udce9.png"


def test_remote_locations_have_no_local_file():
    with pytest.raises(ValueError, match=r"^gs://b/x\.jpg is not a local path$"):
        Location.parse("gs://b/x.jpg").local_file()
    assert Location.parse("file:///data/caf%E9.png").local_file() == os.fsdecode(b"/data/caf\xe9.png")


# Text built from the characters URIs are made of, so schemes, '#', shard extensions and braces meet.
_PIECES = st.sampled_from(
    ["gs://", "http://", "HTTPS://", "file://", "s3://", "/", "./", "..", "#", ".tar", ".TGZ", ".tar.gz",
     "{0..3}", "*", "[", "]", ":", "%E9", "\udce9", "a", "b.jpg", "member=2"]
)  # fmt: skip


@given(st.lists(_PIECES | st.text(max_size=4), max_size=8).map("".join))
def test_location_round_trips_and_classifies_as_before(uri):
    _answers_as_before(uri)
