"""WebDataset tar shards in, curation out: shards written by webdataset's own writer in
img2dataset's layout, read as streams (local, http from a server on 127.0.0.1, gs:// on the
emulator); hostile shards, each sample in exactly one table; `curate`'s outputs read back with
webdataset, tarfile and DuckDB, byte-identical on a rerun."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import pathlib
import tarfile
import threading
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_gcs import ROOT, emulator, gcs_rows, upload  # noqa: F401 (emulator: a fixture)

from anchorscan.anchors.errors import UsageError
from anchorscan.anchors.io import curation, shards
from anchorscan.anchors.io.manifests import ManifestError
from anchorscan.anchors.io.registry import source_for
from anchorscan.anchors.io.shards import TarShardSource
from anchorscan.anchors.io.sources import ReadError, ReadFailure, ReadLimits, Record, Unit
from anchorscan.anchors.io.uris import Location
from anchorscan.anchors.tables import ERROR_SCHEMA, SCORE_SCHEMA
from anchorscan.pipelines import curate, report, score
from anchorscan.pipelines.cli import main
from anchorscan.transforms import carried
from anchorscan.transforms import read as read_module
from anchorscan.transforms.carried import carried_columns, carried_row, pixels_resampled
from anchorscan.transforms.listing import expand_input, indexed_inputs
from helpers import RUNNER
from servers import CrawlSite
from shard_fixtures import (
    HOSTILE_MAX_BYTES,
    photo_jpegs,
    write_flood,
    write_gzip_bomb,
    write_gzip_shard,
    write_hostile_shards,
    write_img2dataset,
    write_unsafe_keys,
)


def read_unit(uri: str, limits: ReadLimits | None = None) -> tuple[dict, dict]:
    """What the read step makes of a unit: {uri: record}, {uri: error message}, the unit's own
    error (raised at the end) under the unit's URI."""
    records, errors = {}, {}
    try:
        for item in source_for(uri).read(Unit(uri), limits or ReadLimits()):
            if isinstance(item, ReadFailure):
                assert item.uri not in errors, f"two error rows for {item.uri}"
                errors[item.uri] = item.message
            else:
                assert isinstance(item, Record) and item.uri not in records, item.uri
                records[item.uri] = item
    except ReadError as error:
        errors[uri] = str(error)
    return records, errors


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three shards of four samples in img2dataset's layout (one failed download each)."""
    folder = tmp_path_factory.mktemp("dataset") / "shards"
    return folder, write_img2dataset(folder, shards=3, per_shard=4)


def test_a_shard_is_read_sample_by_sample_with_its_sidecar(dataset):
    _, written = dataset
    shard = written["shards"][0]
    records, errors = read_unit(shard)
    assert errors == {}  # the failed download is in the sidecar only: not the scan's error
    assert list(records) == written["samples"][shard]  # in the shard's order
    for uri, record in records.items():
        assert record.data == written["images"][uri]
        key = uri.split("#")[1]
        assert record.carried["key"] == key and record.carried["shard"] == shard
        assert record.carried["url"] == f"http://images.example/{key}.jpg"
        assert record.carried["status"] == "success"


def test_a_sample_uri_reads_that_sample_alone(dataset):
    _, written = dataset
    uri = written["samples"][written["shards"][1]][2]
    records, errors = read_unit(uri)
    assert list(records) == [uri] and errors == {}
    assert records[uri].data == written["images"][uri]
    missing = uri[:-1] + "x"
    assert "no sample with the key" in read_unit(missing)[1][missing]
    # the report's galleries show samples too
    assert report.thumbnail(report.gallery_images([uri])[uri]).startswith("<img")
    assert Location.parse("gs://b/s/00012.TAR#000120045").shard_and_key == ("gs://b/s/00012.TAR", "000120045")
    assert Location.parse("photos/a#b.jpg").shard_and_key is None


def test_without_a_sidecar_the_json_member_is_carried(tmp_path):
    written = write_img2dataset(tmp_path / "s", shards=1, per_shard=2, sidecar=False)
    records, errors = read_unit(written["shards"][0])
    assert errors == {}
    record = next(iter(records.values()))
    assert record.carried["caption"].startswith("photo ") and record.carried["width"] == 256
    columns = dict(carried_columns([str(tmp_path / "s")]))
    assert columns["width"].name == "manifest_width" and columns["width"].type == pa.int64()
    assert columns["error_message"].type == pa.string()  # null in the JSON: its type is not known


def test_the_first_sidecar_fixes_the_carried_columns(dataset):
    folder, _ = dataset
    columns = dict(carried_columns([str(folder)]))
    assert list(columns)[:4] == ["key", "shard", "url", "caption"]
    # Names the score table has already take the manifest_ prefix.
    assert columns["width"].name == "manifest_width" and columns["sha256"].name == "manifest_sha256"
    # Another shard's sidecar with other types: what converts is kept, the rest is null.
    fields = [(name, field) for name, field in columns.items() if name in ("width", "caption")]
    assert carried_row({"width": "256", "caption": 7}, fields) == {"manifest_width": 256, "caption": "7"}
    assert carried_row({"width": "wide"}, fields) == {"manifest_width": None, "caption": None}


def test_only_a_stored_size_unlike_the_downloaded_one_says_resampled():
    assert pixels_resampled({"width": 224, "height": 224, "original_width": 256, "original_height": 341})
    assert pixels_resampled({"width": "224", "original_width": "256"})  # a CSV manifest's text
    assert pixels_resampled({"height": 224.0, "original_height": 300})
    assert not pixels_resampled({"width": 256, "height": 240, "original_width": 256, "original_height": 240})
    assert not pixels_resampled({"width": "256", "original_width": 256.0})
    # Metadata that says nothing: no original size, nulls, text that is not a size, booleans.
    assert not pixels_resampled({"width": 224, "height": 224})
    assert not pixels_resampled({"width": 224, "original_width": None, "original_height": float("nan")})
    assert not pixels_resampled({"width": "wide", "original_width": "256"})
    assert not pixels_resampled({"height": True, "original_height": 2})


def test_folders_list_shards_and_brace_patterns_name_each(dataset):
    folder, written = dataset
    listed = [value.uri for kind, value in expand_input(str(folder)) if kind == "unit"]
    assert listed == written["shards"]  # the tars, not their sidecars
    pattern = str(folder / "{00000..00003}.tar")
    names = [name for _, name in indexed_inputs([pattern])]
    assert names == [str(folder / f"{n:05d}.tar") for n in range(4)]
    outcomes = [kind for _, name in indexed_inputs([pattern]) for kind, _ in expand_input(name)]
    assert outcomes == ["unit", "unit", "unit", "error"]  # 00003.tar does not exist: its own row


def test_each_hostile_shard_gives_what_the_readme_says(tmp_path):
    expected = write_hostile_shards(tmp_path / "hostile")
    limits = ReadLimits(max_bytes=HOSTILE_MAX_BYTES)
    for name, outcome in expected.items():
        records, errors = read_unit(str(tmp_path / "hostile" / name), limits)
        assert sorted(records) == sorted(outcome["scored"]), name
        assert set(errors) == set(outcome["errors"]), (name, errors)
        for uri, words in outcome["errors"].items():
            assert words in errors[uri], (name, uri, errors[uri])
    assert sorted(os.listdir(tmp_path)) == ["hostile"]  # nothing was written anywhere


def test_a_flood_of_tiny_members_streams_in_flat_memory(tmp_path):
    path = tmp_path / "flood.tar"
    write_flood(path, 100_000)
    tracemalloc.start()
    try:
        count = sum(1 for item in TarShardSource().read(Unit(str(path)), ReadLimits()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 100_000  # one "no image" row per sample
    # The seen-keys set is the one thing that grows (about 100 bytes a key): far below the shard
    # held whole (100 MB) or tarfile's list of every header (about 1 kB each).
    assert peak < 30 * 2**20, peak


def test_a_shard_past_the_member_limit_stops_with_a_row(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "MAX_MEMBERS", 50)  # the limit's logic, not a million members
    path = tmp_path / "flood.tar"
    write_flood(path, 80)
    records, errors = read_unit(str(path))
    assert not records
    assert "more than 50 members" in errors.pop(str(path))
    assert len(errors) == 50  # each sample before the limit: one "no image" row


def test_a_shard_without_its_end_of_archive_marker_refuses_its_last_sample(tmp_path):
    whole = tmp_path / "whole.tar"
    write_img2dataset(tmp_path / "made", shards=1, per_shard=3)
    source = next((tmp_path / "made").glob("*.tar"))
    with tarfile.open(source) as archive:
        last = archive.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512  # the last member's padded data
    whole.write_bytes(source.read_bytes()[:end])
    records, errors = read_unit(str(whole))
    shard_message = errors.pop(str(whole))
    assert "without the end-of-archive marker" in shard_message, shard_message
    (refused,) = errors.values()
    assert "cut short or damaged" in refused
    assert len(records) >= 1 and set(records).isdisjoint(errors)


def test_http_shards_stream_from_a_web_server(dataset, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    _, written = dataset
    shard = written["shards"][0]
    with CrawlSite() as site:
        site.images["00000.tar"] = pathlib.Path(shard).read_bytes()
        site.images["00000.parquet"] = pathlib.Path(shard[: -len(".tar")] + ".parquet").read_bytes()
        site.images["cut.tar"] = site.images["00000.tar"][:30_000]
        uri = f"{site.url}/img/00000.tar"
        records, errors = read_unit(uri)
        assert errors == {}
        assert [record.data for record in records.values()] == [
            written["images"][sample] for sample in written["samples"][shard]
        ]
        assert next(iter(records.values())).carried["url"].startswith("http://images.example/")
        cut = f"{site.url}/img/cut.tar"  # and no sidecar: the server's 404 says there is none
        records, errors = read_unit(cut)
        assert set(errors) == {cut, *(uri for uri in errors if uri.startswith(cut + "#"))}
        assert "cut short" in errors[cut]
        assert all(uri.startswith(cut + "#") for uri in records)
        missing = f"{site.url}/404.tar"
        assert "HTTP 404" in read_unit(missing)[1][missing]


# --- curation ---------------------------------------------------------------------------------


def score_rows(
    uris: list[str], images: dict, scores: list[float], suspect: list[bool], anchor_id="a" * 16, **extra
) -> pa.Table:
    rows = []
    for uri, value, is_suspect in zip(uris, scores, suspect):
        row = dict.fromkeys(SCORE_SCHEMA.names)
        row.update(
            uri=uri,
            sha256=hashlib.sha256(images[uri]).hexdigest(),
            score=value,
            anchor_score=value,
            is_suspect=is_suspect,
            softness="sharp",
            head="",
            anchor_id=anchor_id,
        )
        rows.append({**row, **{name: values[len(rows)] for name, values in extra.items()}})
    schema = pa.schema(
        [*SCORE_SCHEMA, *(pa.field(name, pa.array(values).type) for name, values in extra.items())]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def crawl_rows(written: dict, uris: list[str], suspect: list[bool], **options) -> pa.Table:
    """Score rows of img2dataset samples as `score` writes them: the sidecar's columns carried
    (``key`` and ``shard`` the reader's, ``width`` as ``manifest_width``: a score column's name)."""
    sidecar = [written["rows"][uri] for uri in uris]
    carried = {
        "key": [uri.split("#")[1] for uri in uris],
        "shard": [uri.split("#")[0] for uri in uris],
        **{name: [row[name] for row in sidecar] for name in ("url", "caption", "status")},
        "manifest_width": [row["width"] for row in sidecar],
    }
    return score_rows(uris, written["images"], [1.0] * len(uris), suspect, **options, **carried)


def error_rows(uris: list[str]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"uri": uri, "stage": "read", "error": "damaged", "error_type": "ReadError"} for uri in uris],
        schema=ERROR_SCHEMA,
    )


def test_the_keep_rules_and_their_reasons(dataset):
    _, written = dataset
    uris = [uri for shard in written["shards"] for uri in written["samples"][shard]]
    images = dict(written["images"])
    images[uris[5]] = images[uris[1]]  # the same bytes twice: the first key is kept
    scores = [float(i) for i in range(len(uris))]
    suspect = [i in (3, 9) for i in range(len(uris))]
    table = score_rows(uris[:-1], images, scores, suspect)
    decided = curation.decide([table], [error_rows(uris[-1:])])
    reasons = dict(zip(decided["uri"].to_pylist(), decided["dropped"].to_pylist()))
    assert reasons == {
        **dict.fromkeys(uris, ""),
        uris[3]: "suspect",
        uris[9]: "suspect",
        uris[5]: "duplicate",
        uris[-1]: "unreadable",
    }
    assert decided["uri"].to_pylist() == sorted(uris)  # by shard, then key
    assert decided["p_value"].to_pylist()[2] == pytest.approx(1e-2)  # 10^-score, to rounding
    by_score = curation.decide([table], [], curation.KeepRule(max_score=8.5))
    assert {u for u, d in zip(by_score["uri"].to_pylist(), by_score["dropped"].to_pylist()) if d} == {
        uris[5],
        uris[9],
        uris[10],
    }
    top = curation.decide([table], [], curation.KeepRule(drop_top=0.2))
    dropped = [u for u, d in zip(top["uri"].to_pylist(), top["dropped"].to_pylist()) if d == "top_fraction"]
    assert dropped == [uris[9], uris[10]]  # 0.2 x the 10 left after the duplicate
    counts = curation.summary(decided)
    assert counts["samples"] == len(uris) and counts["kept"] == len(uris) - 4 and counts["shards"] == 3


def test_the_keep_list_is_datacomps_with_or_without_uids():
    rows = pa.table(
        {
            "uid": ["FF" * 16, "not-a-uid", None, None, None],
            "url": [None, "http://a/x.jpg", "http://a/y.jpg", None, None],
            "sha256": ["00" * 32, "11" * 32, "22" * 32, "AB" * 32, "not a hash"],
            "uri": ["a.png", "b.png", "c.png", "d.png", "e.png"],
        }
    )
    uids, sources = (column.to_pylist() for column in curation.sample_uids(rows))
    hashed = ("http://a/x.jpg", "http://a/y.jpg", "e.png")
    derived = [hashlib.sha256(text.encode()).hexdigest()[:32] for text in hashed]
    assert uids == ["ff" * 16, *derived[:2], "ab" * 16, derived[2]]
    assert sources == ["uid", "url", "url", "sha256", "uri"]
    array = curation.key_array(pa.table({"uid": uids}))
    assert array.dtype == np.dtype("u8,u8")
    assert array.tolist() == sorted((int(u[:16], 16), int(u[16:], 16)) for u in uids)


def write_scan(prefix, scores: pa.Table, errors: pa.Table) -> None:
    pq.write_table(scores, f"{prefix}-scores-00000-of-00001.parquet")
    pq.write_table(errors, f"{prefix}-errors-00000-of-00001.parquet")


def datacomp_keeps(shards: list[pathlib.Path], keys: np.ndarray, prefix: str) -> list[str]:
    """What DataComp's resharder keeps of ``shards`` given the keep-list ``keys``, by its logic:
    each shard's sample count from ``successes`` in its stats JSON, each sample's uid from its
    ``json`` member, split into the two uint64 halves and looked up in the sorted ``u8,u8``
    array (kept as many times as the array holds it). Returns the kept uids."""
    import json

    import webdataset as wds

    assert keys.dtype == np.dtype("u8,u8") and keys.tolist() == sorted(keys.tolist())
    kept, counted = [], 0
    for shard in shards:
        stats = json.loads(pathlib.Path(str(shard)[: -len(".tar")] + "_stats.json").read_text())
        counted += int(stats["successes"])
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            uid = json.loads(sample["json"])["uid"]
            wanted = np.array([divmod(int(uid, 16), 2**64)], np.dtype("u8,u8"))[0]
            count = np.searchsorted(keys, wanted, "right") - np.searchsorted(keys, wanted, "left")
            kept += [uid] * int(count)
    assert counted == len(kept), (
        f"{prefix}: the stats count {counted} samples, the keep-list finds {len(kept)}"
    )
    return kept


def test_curate_reshards_the_kept_samples_in_img2datasets_layout(dataset, tmp_path, capsys):
    import json

    import duckdb
    import webdataset as wds
    import wids

    _, written = dataset
    uris = [uri for shard in written["shards"] for uri in written["samples"][shard]]
    suspect = [i % 4 == 1 for i in range(len(uris))]
    write_scan(tmp_path / "scan", crawl_rows(written, uris[1:], suspect[1:]), error_rows(uris[:1]))
    args = ["--scores", str(tmp_path / "scan"), "--output", str(tmp_path / "cur"), "--reshard"]
    outcome = curate.run([*args, "--samples_per_shard", "3", *RUNNER])
    kept = [uri for uri, bad in zip(uris[1:], suspect[1:]) if not bad]
    assert outcome["kept"] == len(kept) == 8 and outcome["resharded"] == 8
    assert "dropped     4: unreadable 1, suspect 3" in capsys.readouterr().out
    shards = sorted(tmp_path.glob("cur-*.tar"))
    assert [p.name for p in shards] == ["cur-00000.tar", "cur-00001.tar", "cur-00002.tar"]
    # each sample under its uid (from its URL: the crawl has none), every member, images unchanged
    uid = {uri: hashlib.sha256(written["rows"][uri]["url"].encode()).hexdigest()[:32] for uri in kept}
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [uid[uri] for uri in kept]
    assert all(s["jpg"] == written["images"][uri] for s, uri in zip(samples, kept))
    assert all(set(s) >= {"jpg", "json", "txt"} for s in samples)
    metadata = [json.loads(s["json"]) for s in samples]
    assert [(m["uid"], m["key"], m["url"]) for m in metadata] == [
        (uid[uri], uid[uri], written["rows"][uri]["url"]) for uri in kept
    ]
    with tarfile.open(shards[0]) as archive:
        members = archive.getmembers()
    assert [m.name for m in members][:3] == [f"{uid[kept[0]]}.{e}" for e in ("jpg", "json", "txt")]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o444)}
    # img2dataset's sidecar and stats beside each shard: one row per sample, the same keys,
    # every carried column under the crawl's own names
    for shard in shards:
        sidecar = pq.read_table(shard.with_suffix(".parquet")).to_pylist()
        in_tar = [s["__key__"] for s in wds.WebDataset(str(shard), shardshuffle=False)]
        assert [row["key"] for row in sidecar] == in_tar
        stats = json.loads((tmp_path / f"{shard.stem}_stats.json").read_text())
        assert stats["successes"] == stats["count"] == len(in_tar)
    rows = pq.read_table([str(shard.with_suffix(".parquet")) for shard in shards]).to_pylist()
    for row, uri in zip(rows, kept):
        crawl = written["rows"][uri]
        assert row["source"] == uri and row["uid"] == uid[uri]
        assert (row["url"], row["caption"], row["status"], row["width"]) == (
            crawl["url"],
            crawl["caption"],
            "success",
            crawl["width"],
        )
    # wids opens the output by its index alone
    index = tmp_path / "cur-shardindex.json"
    dataset = wids.ShardListDataset(str(index), cache_dir=str(tmp_path / "wids-cache"), transformations=[])
    assert len(dataset) == 8
    opened = [dataset[i] for i in range(8)]
    assert [sample["__key__"] for sample in opened] == [uid[uri] for uri in kept]
    assert [sample[".jpg"].read() for sample in opened] == [written["images"][uri] for uri in kept]
    # DataComp's resharder keeps every sample of the output, each once, by the keep-list
    keys = np.load(tmp_path / "cur-keys.npy")
    assert sorted(datacomp_keeps(shards, keys, "cur")) == sorted(uid.values())
    table = str(tmp_path / "cur-kept.parquet")
    database = duckdb.connect()
    got = database.execute(f"select count(*), sum(keep::int) from '{table}'").fetchall()[0]
    assert got == (len(uris), 8)
    reasons = dict(
        database.execute(f"select dropped, count(*) from '{table}' where not keep group by 1").fetchall()
    )
    assert reasons == {"unreadable": 1, "suspect": 3}
    carried = database.execute(
        f"select status, manifest_width, uid_from from '{table}' where keep"
    ).fetchall()
    assert set(carried) == {("success", 256, "url")}
    # the same inputs give the same bytes; an existing output is refused without --overwrite
    first = {p.name: p.read_bytes() for p in tmp_path.glob("cur-*")}
    assert main(["curate", *args, "--samples_per_shard", "3", *RUNNER]) == 2
    assert "already holds" in capsys.readouterr().err
    curate.run([*args, "--samples_per_shard", "3", "--overwrite", *RUNNER])
    assert {p.name: p.read_bytes() for p in tmp_path.glob("cur-*")} == first
    # one shard of 8: the higher-numbered shards of the last run do not stay behind
    curate.run([*args, "--samples_per_shard", "10", "--overwrite", *RUNNER])
    assert sorted(p.name for p in tmp_path.glob("cur-*.tar")) == ["cur-00000.tar"]


def test_resharding_refuses_a_shard_that_changed_since_the_scan(tmp_path, capsys):
    written = write_img2dataset(tmp_path / "s", shards=1, per_shard=3)
    uris = written["samples"][written["shards"][0]]
    images = {**written["images"], uris[1]: b"other bytes"}
    write_scan(tmp_path / "scan", score_rows(uris, images, [0.0] * 3, [False] * 3), error_rows([]))
    args = ["--scores", str(tmp_path / "scan"), "--output", str(tmp_path / "cur"), "--reshard"]
    assert main(["curate", *args, *RUNNER]) == 2
    assert "is not the one that was scored" in capsys.readouterr().err


def test_curating_hostile_shards_writes_nothing_outside_the_output(tmp_path):
    expected = write_hostile_shards(tmp_path / "hostile")
    images = {}
    for name in expected:
        records, _ = read_unit(str(tmp_path / "hostile" / name), ReadLimits(max_bytes=HOSTILE_MAX_BYTES))
        images.update({uri: record.data for uri, record in records.items()})
    uris = sorted(images)
    errors = sorted(uri for outcome in expected.values() for uri in outcome["errors"])
    write_scan(
        tmp_path / "scan",
        score_rows(uris, images, [0.0] * len(uris), [False] * len(uris)),
        error_rows(errors),
    )
    before = {str(p) for p in tmp_path.rglob("*")}
    args = ["--scores", str(tmp_path / "scan"), "--output", str(tmp_path / "out" / "cur"), "--reshard"]
    outcome = curate.run([*args, "--max_bytes", str(HOSTILE_MAX_BYTES), *RUNNER])
    distinct = len(set(images.values()))  # some hostile shards share an image: duplicates are dropped
    assert outcome["kept"] == distinct and outcome["samples"] == len(uris) + len(errors)
    added = {str(p) for p in tmp_path.rglob("*")} - before
    assert added and all(path.startswith(str(tmp_path / "out")) for path in added)
    with tarfile.open(tmp_path / "out" / "cur-00000.tar") as archive:
        names = archive.getnames()
    assert not any(name.startswith("/") or ".." in name.split("/") for name in names)


def test_two_crawls_with_keys_from_zero_curate_into_one_dataset(tmp_path, capsys):
    import webdataset as wds

    # img2dataset numbers each run's shards and keys from 0: the two crawls' keys are the same
    crawls = [
        write_img2dataset(tmp_path / name, shards=2, per_shard=3, seed=seed, host=f"{name}.example")
        for seed, name in enumerate(("laion", "coyo"))
    ]
    uris = [[uri for shard in c["shards"] for uri in c["samples"][shard]] for c in crawls]
    assert [u.split("#")[1] for u in uris[0]] == [u.split("#")[1] for u in uris[1]]
    for name, crawl, listed in zip(("a", "b"), crawls, uris):
        source = [name] * len(listed)
        table = crawl_rows(crawl, listed, [False] * len(listed), crawl=source)
        write_scan(tmp_path / name, table, error_rows([]))
    # the first scan given twice: its samples are the same shard and key twice, one sample each
    args = ["--scores", str(tmp_path / "a"), "--scores", str(tmp_path / "b"), "--scores", str(tmp_path / "a")]
    out = str(tmp_path / "out" / "cur")
    outcome = curate.run([*args, "--output", out, "--reshard", "--by", "crawl", *RUNNER])
    assert outcome["samples"] == outcome["kept"] == outcome["resharded"] == 12
    samples = list(wds.WebDataset(sorted(glob.glob(f"{out}-*.tar")), shardshuffle=False))
    images = {**crawls[0]["images"], **crawls[1]["images"]}
    assert sorted(s["jpg"] for s in samples) == sorted(images.values())
    assert len({s["__key__"] for s in samples}) == 12
    kept = pq.read_table(f"{out}-kept.parquet")
    assert sorted(zip(kept["shard"].to_pylist(), kept["key"].to_pylist())) == sorted(
        tuple(uri.split("#")) for uri in uris[0] + uris[1]
    )
    by = pq.read_table(f"{out}-by.parquet").to_pylist()
    assert [(row["column"], row["value"], row["samples"], row["kept"]) for row in by] == [
        ("crawl", "a", 6, 6),
        ("crawl", "b", 6, 6),
    ]
    assert "  'a'                kept 6 of 6" in capsys.readouterr().out


def test_a_crawl_with_uids_keeps_them_in_the_keep_list_and_the_shards(tmp_path):
    import json

    import webdataset as wds

    written = write_img2dataset(tmp_path / "s", shards=1, per_shard=3)
    uris = written["samples"][written["shards"][0]]
    uids = ["0123456789ABCDEF" * 2, "f" * 32, "0" * 31 + "1"]  # DataComp's: 32 hex digits
    write_scan(tmp_path / "scan", crawl_rows(written, uris, [False] * 3, uid=uids), error_rows([]))
    out = str(tmp_path / "cur")
    curate.run(["--scores", str(tmp_path / "scan"), "--output", out, "--reshard", *RUNNER])
    keys = np.load(f"{out}-keys.npy")
    lowered = sorted(uid.lower() for uid in uids)
    assert keys.tolist() == sorted(divmod(int(uid, 16), 2**64) for uid in lowered)
    samples = list(wds.WebDataset(f"{out}-00000.tar", shardshuffle=False))
    assert sorted(json.loads(s["json"])["uid"] for s in samples) == lowered
    assert sorted(datacomp_keeps([pathlib.Path(f"{out}-00000.tar")], keys, "cur")) == lowered
    assert set(pq.read_table(f"{out}-kept.parquet")["uid_from"].to_pylist()) == {"uid"}


def test_a_true_duplicate_is_still_dropped_and_the_by_table_says_why(tmp_path, capsys):
    written = write_img2dataset(tmp_path / "s", shards=1, per_shard=4)
    uris = written["samples"][written["shards"][0]]
    images = {**written["images"], uris[3]: written["images"][uris[0]]}  # the same bytes twice
    table = score_rows(
        uris, images, [1.0] * 4, [False, True, False, False], kind=["photo", "photo", "art", "art"]
    )
    write_scan(tmp_path / "scan", table, error_rows([]))
    out = str(tmp_path / "cur")
    outcome = curate.run(["--scores", str(tmp_path / "scan"), "--output", out, "--by", "kind", *RUNNER])
    assert outcome["dropped"] == {"duplicate": 1, "suspect": 1}
    by = {row["value"]: row for row in pq.read_table(f"{out}-by.parquet").to_pylist()}
    assert (by["photo"]["kept"], by["photo"]["suspect"], by["art"]["kept"], by["art"]["duplicate"]) == (
        1,
        1,
        1,
        1,
    )
    printed = capsys.readouterr().out
    assert "  'photo'            kept 1 of 2, dropped suspect 1" in printed
    assert "  'art'              kept 1 of 2, dropped duplicate 1" in printed
    assert main(["curate", "--scores", str(tmp_path / "scan"), "--output", f"{out}2", "--by", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--by nope: the scans have no such column" in err and "kind" in err
    assert not glob.glob(f"{out}2-*")


def test_curating_a_bucket_of_shards_at_a_time_decides_as_the_whole_corpus_at_once(tmp_path, monkeypatch):
    """curate decides a bucket of whole shards at a time (the launcher never holds the corpus):
    the same bytes out as one bucket of everything, whatever spans buckets (a sample scored in
    two scans, the same image or URL in shards far apart, --drop_top's highest scores)."""
    shard = "crawl/{:05d}.tar".format
    uris = [f"{shard(number)}#{number:05d}{index:04d}" for number in range(8) for index in range(4)]
    images = {uri: f"image {uri}".encode() for uri in uris}
    images[uris[29]] = images[uris[1]]  # the same bytes in shards 0 and 7
    images[uris[30]] = images[uris[2]]  # the same bytes as a sample of shard 0 that was not read
    scores = [float((7 * i) % 32) for i in range(len(uris))]
    urls = [f"http://images.example/{i}.jpg" for i in range(len(uris))]
    urls[26] = urls[5]  # the same URL (the same derived uid) in shards 1 and 6
    # the scan's rows in no shard order; the third sample not read (an error row)
    order = [i for i in np.random.default_rng(0).permutation(len(uris)) if i != 2]
    table = score_rows(
        [uris[i] for i in order],
        images,
        [scores[i] for i in order],
        [False] * len(order),
        url=[urls[i] for i in order],
        status=["success"] * len(order),
    )
    write_scan(tmp_path / "a", table, error_rows([uris[2], "photos/gone.jpg"]))
    # a second scan: shard 3 again (each sample scored twice: the first scan's rows decide) and
    # images outside shards, the last bucket
    again = [uri for uri in uris if uri.startswith(shard(3))] + ["photos/a.jpg", "photos/b.jpg"]
    images.update({"photos/a.jpg": b"a", "photos/b.jpg": b"b"})
    write_scan(tmp_path / "b", score_rows(again, images, [50.0] * 6, [True] * 6), error_rows([]))
    sizes: list[int] = []
    buckets = curation.ScanRows.buckets

    def counted(scan):
        for rows in buckets(scan):
            sizes.append(len(rows))
            yield rows

    monkeypatch.setattr(curation.ScanRows, "buckets", counted)
    outputs = {}
    for bucket_rows in (10**9, 5):
        monkeypatch.setattr(curation, "BUCKET_ROWS", bucket_rows)
        out = str(tmp_path / f"cur{bucket_rows}")
        args = ["--scores", str(tmp_path / "a"), "--scores", str(tmp_path / "b"), "--output", out]
        outcome = curate.run([*args, "--drop_top", "0.25", "--by", "status"])
        outputs[bucket_rows] = {
            name: pathlib.Path(f"{out}-{name}").read_bytes()
            for name in ("kept.parquet", "keys.npy", "by.parquet")
        }
        # the outcome as printed, less the output paths (the two runs write to two prefixes)
        outputs[bucket_rows]["outcome"] = {
            name: value for name, value in outcome.items() if name not in ("kept_table", "keys", "by_table")
        }
    # the shards in one bucket, the images outside shards in the last; then a shard a bucket (two
    # would be more than 5 rows: shard 0 has an error row, shard 3 was scanned twice)
    assert sizes == [36, 3] + [4, 4, 4, 8, 4, 4, 4, 4, 3]
    assert outputs[5] == outputs[10**9]
    kept = pq.read_table(str(tmp_path / "cur5-kept.parquet"))
    dropped = dict(zip(kept["uri"].to_pylist(), kept["dropped"].to_pylist()))
    assert (dropped[uris[2]], dropped[uris[29]], dropped[uris[30]], dropped[uris[26]]) == (
        "unreadable",
        "duplicate",
        "",  # its twin was not read: no kept image to duplicate
        "duplicate_uid",
    )
    assert dropped["photos/gone.jpg"] == "unreadable" and kept["uri"].to_pylist()[-3:] == [
        "photos/a.jpg",
        "photos/b.jpg",
        "photos/gone.jpg",
    ]
    # a quarter of the 31 samples kept after the other rules (ceil 7.75), those scoring highest
    assert outcome["dropped"]["top_fraction"] == 8
    top = sorted(
        (-score, uri)
        for uri, score in zip(kept["uri"].to_pylist(), kept["score"].to_pylist())
        if dropped[uri] in ("", "top_fraction")
    )
    assert {uri for _, uri in top[:8]} == {uri for uri, reason in dropped.items() if reason == "top_fraction"}


def test_scans_made_with_different_anchors_are_refused_unless_one_is_followed(tmp_path, capsys):
    written = write_img2dataset(tmp_path / "s", shards=2, per_shard=2)
    first, second = (written["samples"][shard] for shard in written["shards"])
    write_scan(tmp_path / "a", score_rows(first, written["images"], [1.0] * 2, [False] * 2), error_rows([]))
    # the second shard scanned by another anchor, which also scored the first shard's first sample
    other = score_rows([first[0], *second], written["images"], [9.0] * 3, [True] * 3, anchor_id="b" * 16)
    write_scan(tmp_path / "b", other, error_rows([]))
    args = ["--scores", str(tmp_path / "a"), "--scores", str(tmp_path / "b"), "--output", str(tmp_path / "c")]
    assert main(["curate", *args, *RUNNER]) == 2
    err = capsys.readouterr().err
    assert f"different anchors ({'a' * 16}, {'b' * 16}" in err and "--follow_anchor" in err
    assert not glob.glob(str(tmp_path / "c-*"))
    assert main(["curate", *args, "--follow_anchor", "c" * 16, *RUNNER]) == 2
    assert f"--follow_anchor {'c' * 16}: no scores table was made with it" in capsys.readouterr().err
    # one anchor, but the second scan's scores are a head's: another scale
    headed = other.set_column(
        other.schema.get_field_index("anchor_id"), "anchor_id", pa.array(["a" * 16] * 3)
    )
    headed = headed.set_column(headed.schema.get_field_index("head"), "head", pa.array(["lda:3f2a"] * 3))
    write_scan(tmp_path / "h", headed, error_rows([]))
    assert (
        main(
            [
                "curate",
                "--scores",
                str(tmp_path / "a"),
                "--scores",
                str(tmp_path / "h"),
                "--output",
                str(tmp_path / "c"),
                *RUNNER,
            ]
        )
        == 2
    )
    assert "different heads (lda:3f2a, no head: the head column)" in capsys.readouterr().err
    outcome = curate.run([*args, "--follow_anchor", "a" * 16, *RUNNER])
    decided = pq.read_table(tmp_path / "c-kept.parquet")
    reasons = dict(zip(decided["uri"].to_pylist(), decided["dropped"].to_pylist()))
    # the followed anchor's row of the sample both scored decides it; the rest are reported
    assert reasons == {first[0]: "", first[1]: "", second[0]: "other_anchor", second[1]: "other_anchor"}
    assert outcome["kept"] == 2 and outcome["dropped"] == {"other_anchor": 2}


def test_tables_that_lie_are_refused_or_their_rows_dropped(tmp_path, capsys):
    written = write_img2dataset(tmp_path / "s", shards=1, per_shard=4)
    uris = written["samples"][written["shards"][0]]
    table = score_rows(uris, written["images"], [float("nan"), None, 1.0, 1.0], [False, False, None, False])
    write_scan(tmp_path / "scan", table, error_rows([]))
    out = str(tmp_path / "cur")
    outcome = curate.run(["--scores", str(tmp_path / "scan"), "--output", out, "--reshard", *RUNNER])
    assert outcome["kept"] == outcome["resharded"] == 1 and outcome["dropped"] == {"invalid_score": 3}
    decided = pq.read_table(f"{out}-kept.parquet")
    assert dict(zip(decided["uri"].to_pylist(), decided["dropped"].to_pylist()))[uris[3]] == ""
    for column in ("is_suspect", "anchor_id"):
        write_scan(tmp_path / column, table.drop_columns([column]), error_rows([]))
        code = main(["curate", "--scores", str(tmp_path / column), "--output", str(tmp_path / "x"), *RUNNER])
        assert code == 2
        err = capsys.readouterr().err
        assert f"{column}-scores-00000-of-00001.parquet: no {column} column" in err
        assert len(err.strip().splitlines()) == 1


def test_a_key_with_a_newline_is_an_error_row_and_curate_reports_it(tmp_path):
    """kept = written + reported: the scan refuses the key (an error row naming it), curate
    lists that sample as unreadable and re-shards the other."""
    import webdataset as wds

    jpg = photo_jpegs(2, seed=3)
    shard = tmp_path / "odd.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in (("line\nbreak.jpg", jpg[0]), ("plain.jpg", jpg[1])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    records, errors = read_unit(str(shard))
    assert list(records) == [f"{shard}#plain"]
    [(error_uri, message)] = errors.items()
    assert "line\\nbreak" in message and "control character" in message
    uris = sorted(records)
    carried = {name: [records[uri].carried[name] for uri in uris] for name in ("key", "shard")}
    images = {uri: records[uri].data for uri in uris}
    scores = score_rows(uris, images, [0.0], [False], **carried)
    write_scan(tmp_path / "scan", scores, error_rows([error_uri]))
    out = str(tmp_path / "cur")
    outcome = curate.run(["--scores", str(tmp_path / "scan"), "--output", out, "--reshard", *RUNNER])
    assert outcome["kept"] == outcome["kept_in_shards"] == outcome["resharded"] == 1
    assert outcome["dropped"] == {"unreadable": 1}
    decided = pq.read_table(f"{out}-kept.parquet")
    assert sorted(decided["uri"].to_pylist()) == sorted([error_uri, f"{shard}#plain"])
    written = list(wds.WebDataset(f"{out}-00000.tar", shardshuffle=False))
    assert [sample["jpg"] for sample in written] == [jpg[1]]


def test_curate_is_a_command_with_its_own_flags(capsys):
    assert main(["curate", "--help"]) == 0
    assert "--samples_per_shard" in capsys.readouterr().out
    assert main(["curate", "--scores", "x", "--output", "y", "--drop_top", "1.5"]) == 2
    assert "--drop_top: must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert main(["curate", "--scores", "nowhere/scan", "--output", "y"]) == 2
    assert "no PREFIX-scores-*.parquet" in capsys.readouterr().err


# --- the commands on shards, with the backbone (slow) -----------------------------------------


def table_rows(pattern: str) -> list[dict]:
    files = sorted(glob.glob(pattern))
    return pq.read_table(files).to_pylist() if files else []


def test_score_and_curate_a_folder_of_shards_every_sample_in_one_table(fitted_anchor, tmp_path, capsys):
    import webdataset as wds

    anchor, _ = fitted_anchor
    root = tmp_path / "corpus"
    written = write_img2dataset(root / "shards", shards=2, per_shard=3)
    hostile = write_hostile_shards(root / "hostile")
    prefix = str(tmp_path / "scan" / "night1")
    limits = ["--max_bytes", str(HOSTILE_MAX_BYTES)]
    inputs = [
        "--input",
        str(root / "shards"),
        "--input",
        str(root / "hostile"),
    ]  # the first sidecar fixes the columns
    score.run([*inputs, "--anchor", str(anchor), "--output", prefix, *limits, *RUNNER])
    scores, errors = table_rows(f"{prefix}-scores-*.parquet"), table_rows(f"{prefix}-errors-*.parquet")
    scored = [row["uri"] for row in scores]
    failed = {row["uri"]: row for row in errors}
    assert len(scored) == len(set(scored)) and not set(scored) & set(failed)
    samples = [uri for shard in written["shards"] for uri in written["samples"][shard]]
    assert set(scored) == set(samples) | {uri for o in hostile.values() for uri in o["scored"]}
    assert set(failed) == {uri for o in hostile.values() for uri in o["errors"]}
    assert all(failed[uri]["stage"] == "read" for uri in failed)
    # the sidecar's columns follow each row; the content hash is the image's
    row = next(r for r in scores if r["uri"] == samples[0])
    assert row["key"] == samples[0].split("#")[1] and row["shard"] == written["shards"][0]
    assert row["url"].endswith(f"{row['key']}.jpg") and row["manifest_width"] == 256
    assert row["sha256"] == hashlib.sha256(written["images"][samples[0]]).hexdigest()

    outcome = curate.run(
        ["--scores", prefix, "--output", str(tmp_path / "cur"), "--reshard", *limits, *RUNNER]
    )
    assert outcome["samples"] == len(scores) + len(errors)
    kept = pq.read_table(tmp_path / "cur-kept.parquet")
    assert sorted(kept["uri"].to_pylist()) == sorted([*scored, *failed])
    resharded = list(wds.WebDataset(sorted(glob.glob(str(tmp_path / "cur-*.tar"))), shardshuffle=False))
    assert len(resharded) == outcome["kept"] == outcome["resharded"]
    assert "kept" in capsys.readouterr().out


def test_rows_and_the_summary_say_which_samples_were_resized_before_storage(fitted_anchor, tmp_path, capsys):
    anchor, _ = fitted_anchor
    crawl = tmp_path / "crawl"
    # img2dataset at --image_size: downloaded at 274 x 293, stored area-downscaled to 240 x 256.
    native = write_img2dataset(crawl, shards=1, per_shard=2)
    resized = write_img2dataset(crawl, shards=1, per_shard=3, first_shard=1, seed=3, downloaded=(274, 293))
    json_only = write_img2dataset(
        crawl, shards=1, per_shard=1, first_shard=2, seed=4, downloaded=(274, 293), sidecar=False
    )
    prefix = str(tmp_path / "scan")
    assert main(["score", "--input", str(crawl), "--anchor", str(anchor), "--output", prefix, *RUNNER]) == 0
    rows = {row["uri"]: row for row in table_rows(f"{prefix}-scores-*.parquet")}
    assert {uri: row["pixels_resampled"] for uri, row in rows.items()} == {
        **dict.fromkeys(native["images"], False),
        **dict.fromkeys([*resized["images"], *json_only["images"]], True),  # sidecar, JSON member
    }
    assert "resampled   4 (66.7%): resized before storage" in capsys.readouterr().out

    # The same bytes stored again by a crawl that resized them: a reused row says what the new
    # record says, not what the earlier one did.
    recrawl = tmp_path / "recrawl"
    recrawl.mkdir()
    shard = pathlib.Path(native["shards"][0])
    (recrawl / shard.name).write_bytes(shard.read_bytes())
    sidecar = pq.read_table(shard.with_suffix(".parquet")).to_pylist()
    for row in sidecar:
        row["original_width"] = row["original_width"] and 2 * row["original_width"]
    pq.write_table(pa.Table.from_pylist(sidecar), recrawl / shard.with_suffix(".parquet").name)
    again = str(tmp_path / "again")
    args = ["--input", str(recrawl), "--anchor", str(anchor), "--output", again, "--skip_scored", prefix]
    assert main(["score", *args, *RUNNER]) == 0
    reused = table_rows(f"{again}-scores-*.parquet")
    assert len(reused) == 2 and all(row["pixels_resampled"] for row in reused)
    assert "resampled   2 (100.0%)" in capsys.readouterr().out


def test_nightly_scans_of_shards_score_only_what_is_new(fitted_anchor, tmp_path):
    anchor, _ = fitted_anchor
    shards = tmp_path / "shards"
    write_img2dataset(shards, shards=2, per_shard=3)
    first = score.run(
        ["--input", str(shards), "--anchor", str(anchor), "--output", str(tmp_path / "n1"), *RUNNER]
    )
    write_img2dataset(shards, shards=1, per_shard=3, first_shard=2, seed=5)  # tonight's new shard
    second = score.run(
        [
            "--input",
            str(shards / "{00000..00002}.tar"),
            "--anchor",
            str(anchor),
            "--output",
            str(tmp_path / "n2"),
            "--skip_scored",
            str(tmp_path / "n1"),
            *RUNNER,
        ]
    )
    assert first["scored"] == 6 and (second["scored"], second["reused"]) == (3, 6)
    rows = table_rows(str(tmp_path / "n2-scores-*.parquet"))
    assert len(rows) == 9 and {row["key"] for row in rows} == {row["uri"].split("#")[1] for row in rows}


def test_fit_update_and_evaluate_read_shards(fitted_anchor, tmp_path):
    from test_evaluate import make_fakes

    from anchorscan.anchors.anchor_file import read_metadata
    from anchorscan.anchors.io.storage import read_bytes
    from anchorscan.pipelines import evaluate, fit, update

    anchor, _ = fitted_anchor
    real = write_img2dataset(tmp_path / "real", shards=3, per_shard=12)
    fitted = fit.run(
        [
            "--input",
            str(tmp_path / "real" / "{00000..00002}.tar"),
            "--anchor",
            str(tmp_path / "a.safetensors"),
        ]
        + ["--calibration_fraction", "0.3", *RUNNER]
    )
    assert fitted["n"] + fitted["n_calibration"] == 36 and fitted["errors"] == 0
    more = write_img2dataset(tmp_path / "more", shards=1, per_shard=6, seed=3)
    update.run(
        ["--anchor", str(anchor), "--input", more["shards"][0], "--output", str(tmp_path / "b.safetensors")]
        + ["--trusted", *RUNNER]  # photos one vouches for: every sample counts, as a fit's
    )
    before, after = (
        read_metadata(read_bytes(str(anchor))),
        read_metadata(read_bytes(str(tmp_path / "b.safetensors"))),
    )
    assert after["n"] + after["n_calibration"] == before["n"] + before["n_calibration"] + 6
    # A manifest labels whole shards: each sample takes its shard's label.
    pngs = tmp_path / "reals"
    pngs.mkdir()
    paths = []
    for uri in real["samples"][real["shards"][0]][:6]:
        paths.append(str(pngs / f"{uri.split('#')[1]}.jpg"))
        pathlib.Path(paths[-1]).write_bytes(real["images"][uri])
    fakes = make_fakes(paths, tmp_path / "fakes")
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "fake.tar")) as writer:
        for path in fakes:
            writer.write({"__key__": pathlib.Path(path).stem, "png": pathlib.Path(path).read_bytes()})
    labels = tmp_path / "labels.csv"
    labels.write_text(
        f"uri,label,generator\n{real['shards'][1]},real,\n{tmp_path / 'fake.tar'},fake,bicubic\n"
    )
    table = evaluate.run(
        [
            str(labels),
            "--dataset",
            "manifest",
            "--anchor",
            str(anchor),
            "--output",
            str(tmp_path / "eval"),
            *RUNNER,
        ]
    )
    assert (table[0]["generator"], table[0]["n_real"], table[0]["n_fake"]) == ("bicubic", 12, 6)


@pytest.mark.usefixtures("emulator")
def test_shards_on_cloud_storage_score_and_curate(fitted_anchor, tmp_path):
    import webdataset as wds
    from apache_beam.io.filesystems import FileSystems

    anchor, _ = fitted_anchor
    written = write_img2dataset(tmp_path / "shards", shards=2, per_shard=3)
    for path in sorted((tmp_path / "shards").iterdir()):
        upload(path, f"{ROOT}/shards/{path.name}")
    prefix = f"{ROOT}/scans/night1"
    summary = score.run(["--input", f"{ROOT}/shards", "--anchor", str(anchor), "--output", prefix, *RUNNER])
    rows = gcs_rows(f"{prefix}-scores-*.parquet")
    local = {uri.replace(str(tmp_path / "shards"), f"{ROOT}/shards"): uri for uri in written["images"]}
    assert summary["scored"] == 6 and sorted(row["uri"] for row in rows) == sorted(local)
    assert all(row["url"].endswith(f"{row['key']}.jpg") for row in rows)
    assert all(
        row["sha256"] == hashlib.sha256(written["images"][local[row["uri"]]]).hexdigest() for row in rows
    )
    # one sample by its URI, as a manifest or an earlier row names it
    one = sorted(local)[4]
    records, errors = read_unit(one)
    assert errors == {} and list(records) == [one] and records[one].data == written["images"][local[one]]

    curated = f"{ROOT}/curated/cur"
    outcome = curate.run(
        ["--scores", prefix, "--output", curated, "--reshard", "--samples_per_shard", "4", *RUNNER]
    )
    names = sorted(m.path for m in FileSystems.match([f"{curated}-*.tar"])[0].metadata_list)
    assert names == [f"{curated}-00000.tar", f"{curated}-00001.tar"][: len(names)] and outcome["resharded"]
    copies = []
    for name in names:
        copies.append(tmp_path / name.rsplit("/", 1)[1])
        copies[-1].write_bytes(FileSystems.open(name).read())
        with tarfile.open(copies[-1]) as archive:
            assert all(member.name.split(".", 1)[1] in ("jpg", "json", "txt") for member in archive)
    samples = list(wds.WebDataset([str(path) for path in copies], shardshuffle=False))
    assert len(samples) == outcome["kept"] == outcome["resharded"]
    kept = pq.read_table(io.BytesIO(FileSystems.open(f"{curated}-kept.parquet").read()))
    assert len(kept) == 6 and sum(kept["keep"].to_pylist()) == outcome["kept"]


def test_a_shard_dropped_into_a_watched_folder_is_streamed_sample_by_sample(fitted_anchor, tmp_path):
    from apache_beam.io.filesystem import FileMetadata
    from apache_beam.testing import test_stream
    from apache_beam.transforms.window import TimestampedValue
    from test_stream import stream_events

    anchor, _ = fitted_anchor
    written = write_img2dataset(tmp_path / "incoming", shards=1, per_shard=3)
    arrived = FileMetadata(written["shards"][0], 1, last_updated_in_seconds=1.0)
    events = (
        test_stream.TestStream(output_tags={"files", "ticks"})
        .advance_watermark_to(0, tag="files")
        .advance_watermark_to(0, tag="ticks")
        .add_elements([TimestampedValue(str(anchor), 0)], tag="ticks")
        .add_elements([TimestampedValue(arrived, 1)], tag="files")
        .advance_watermark_to_infinity(tag="files")
        .advance_watermark_to_infinity(tag="ticks")
    )
    stream_events(events, tmp_path / "incoming", anchor, tmp_path / "out" / "live")
    rows = table_rows(str(tmp_path / "out" / "live-scores-*.parquet"))
    assert sorted(row["uri"] for row in rows) == written["samples"][written["shards"][0]]


def test_a_shards_samples_are_redistributed_where_the_runner_spreads_them(dataset):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from anchorscan.transforms.read import ReadInputs

    _, written = dataset
    shard = written["shards"][0]
    alone = written["samples"][shard][1]  # one sample named by its URI, beside its whole shard
    options = beam.options.pipeline_options.PipelineOptions(RUNNER)
    with beam.Pipeline(options=options) as pipeline:
        units = pipeline | beam.Create([Unit(shard), Unit(alone)])
        records, errors = units | ReadInputs(ReadLimits(), spread=True)
        uris = records | beam.Map(lambda record: record.uri)
        assert_that(uris, equal_to([*written["samples"][shard], alone]), label="AllRecords")
        assert_that(errors, equal_to([]), label="NoErrors")


# --- reliability round 4: compressed shards, keys, sidecars (issue 24) ------------------------

MIB = 2**20


def test_gzip_bombs_stop_at_the_skip_and_shard_limits(tmp_path):
    bomb = tmp_path / "bomb.tar.gz"
    write_gzip_bomb(bomb, 64 * MIB)  # a 64 kB file; the issue's were 3 GiB, here the limits are lowered
    assert bomb.stat().st_size < MIB
    records, errors = read_unit(str(bomb), ReadLimits(max_bytes=HOSTILE_MAX_BYTES, max_skip_bytes=8 * MIB))
    assert not records
    assert "larger than --max_bytes" in errors.pop(f"{bomb}#bomb")
    assert "more than --max_skip_bytes 8,388,608" in errors.pop(str(bomb))
    assert errors == {}
    limits = ReadLimits(max_bytes=HOSTILE_MAX_BYTES, max_shard_bytes=8 * MIB)
    assert "past --max_shard_bytes 8,388,608" in read_unit(str(bomb), limits)[1][str(bomb)]

    # A gzip'd shard of good samples is read whole; past a lowered shard limit, its first
    # samples are scored, the one being read is refused and the shard gets a row.
    images = photo_jpegs(6, seed=3)
    good = tmp_path / "good.tar.gz"
    keys = write_gzip_shard(good, images)
    records, errors = read_unit(str(good))
    assert errors == {} and [record.data for record in records.values()] == images
    limit = sum(len(image) for image in images[:3]) + 3 * 1024  # three samples, headers and padding
    records, errors = read_unit(str(good), ReadLimits(max_shard_bytes=limit))
    assert list(records) == [f"{good}#{key}" for key in keys[: len(records)]] and 1 <= len(records) < 6
    assert "past --max_shard_bytes" in errors.pop(str(good))
    assert all(uri not in records for uri in errors)


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE], ids=["gnu_long_name", "pax"])
def test_a_tar_header_declaring_a_huge_size_is_refused_in_flat_memory(tmp_path, kind):
    bomb = tmp_path / "header.tar.gz"
    write_gzip_bomb(bomb, 256 * MIB, kind)
    tracemalloc.start()
    try:
        records, errors = read_unit(str(bomb))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not records and list(errors) == [str(bomb)]
    assert "declares 268,435,456 bytes" in errors[str(bomb)]
    # tarfile decompresses 10 kB of input at a time (some 10 MB of zeros) and holds a few such
    # pieces at once; the 256 MiB "name", read whole, would be far past this.
    assert peak < 64 * MIB, peak


def test_the_driver_reads_a_bounded_part_of_shards_without_sidecars(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    written = write_img2dataset(folder, shards=1, per_shard=2, sidecar=False)
    bombs = [folder / f"0-bomb-{n}.tar.gz" for n in range(5)]  # listed before 00000.tar
    for bomb in bombs:
        write_gzip_bomb(bomb, 256 * MIB)
    read_from: dict[str, int] = {}
    real_open = carried.open_shard

    class Counted:
        def __init__(self, uri, stream):
            self.uri, self.stream = uri, stream

        def read(self, size=-1):
            data = self.stream.read(size)
            read_from[self.uri] = read_from.get(self.uri, 0) + len(data)
            return data

    @contextlib.contextmanager
    def counted_open(uri, *args):
        with real_open(uri, *args) as stream:
            yield Counted(uri, stream)

    monkeypatch.setattr(carried, "open_shard", counted_open)
    columns = dict(carried_columns([str(folder)]))
    assert columns["caption"].type == pa.string()  # the good shard's first JSON member
    assert read_from[written["shards"][0]] > 0
    for bomb in bombs:  # each gave up at once: the whole file decompresses to 256 MiB
        assert read_from[str(bomb)] < bomb.stat().st_size / 4, (bomb, read_from)


def test_a_read_past_its_timeout_is_stopped_not_left_running(monkeypatch):
    """A shard that keeps delivering bytes (a decompressing bomb, a trickling server) past
    --read_timeout: its read ends, the stream is closed, nothing is left reading."""
    closed, reads = threading.Event(), []

    class Endless:
        def read(self, size=-1):
            reads.append(size)
            if len(reads) == 1:  # a member that declares 4 GiB, then zeros for ever
                info = tarfile.TarInfo("endless.jpg")
                info.size = 4 * 2**30
                return info.tobuf(tarfile.GNU_FORMAT)
            closed.wait(0.001)  # a trickle: the timeout, not the data's end, ends this read
            return bytes(max(size, 0) or 512)

    @contextlib.contextmanager
    def endless_shard(uri, http):
        try:
            yield Endless()
        finally:
            closed.set()

    monkeypatch.setattr(shards, "open_shard", endless_shard)
    limits = ReadLimits(max_bytes=HOSTILE_MAX_BYTES, read_timeout=0.2, max_skip_bytes=2**40)
    read = read_module.ReadFn(limits)
    read.setup()
    [row] = [output.value for output in read.process(Unit("/endless/shard.tar"))]
    assert row["error_type"] == "TimeoutError" and "--read_timeout 0.2" in row["error"]
    assert closed.wait(60), "the read went on after its timeout"
    [stuck] = read._stuck
    assert stuck.wait(60)  # the reader thread's call ended too: nothing reads on unseen


def test_keys_that_would_break_uris_are_error_rows_each_uri_once(tmp_path):
    shard = tmp_path / "keys.tar"
    expected = write_unsafe_keys(shard)
    records, errors = read_unit(str(shard))
    assert sorted(records) == sorted(expected["scored"])
    assert set(errors) == set(expected["errors"]), errors
    for uri, words in expected["errors"].items():
        assert words in errors[uri] and "\n" not in errors[uri], (uri, errors[uri])
    assert set(records).isdisjoint(errors)
    assert all(len(uri) < len(str(shard)) + 300 for uri in [*records, *errors])


def test_a_sidecar_with_a_clashing_column_fails_its_shard_alone(dataset, tmp_path):
    folder, written = dataset
    clash = tmp_path / "clash" / "00000.tar"
    write_img2dataset(clash.parent, shards=1, per_shard=2)
    rows = pq.read_table(clash.with_suffix(".parquet")).to_pylist()
    rows = [{**row, "score": 0.5, "manifest_score": 0.25} for row in rows]
    pq.write_table(pa.Table.from_pylist(rows), clash.with_suffix(".parquet"))
    columns = dict(carried_columns([str(clash), str(folder)]))  # no UsageError: the scan goes on
    assert "score" not in columns and columns["manifest_score"].name == "manifest_score"
    records, errors = read_unit(str(clash))
    assert not records and list(errors) == [str(clash)]
    assert "'score'" in errors[str(clash)] and "'manifest_score'" in errors[str(clash)]
    assert read_unit(written["shards"][0])[1] == {}


def test_nested_sidecar_values_are_carried_as_json_text(tmp_path):
    folder = tmp_path / "nested"
    written = write_img2dataset(folder, shards=1, per_shard=2)
    sidecar = folder / "00000.parquet"
    rows = pq.read_table(sidecar).to_pylist()
    rows = [{**row, "exif": {"make": "Canon", "iso": 100}, "tags": ["a", "b"]} for row in rows]
    pq.write_table(pa.Table.from_pylist(rows), sidecar)
    carried_fields = carried_columns([str(folder)])
    fields = dict(carried_fields)
    assert fields["exif"].type == pa.string() and fields["tags"].type == pa.string()
    records, _ = read_unit(written["shards"][0])
    row = carried_row(next(iter(records.values())).carried, carried_fields)
    assert json.loads(row["exif"]) == {"make": "Canon", "iso": 100}
    assert json.loads(row["tags"]) == ["a", "b"]


def test_a_csv_manifest_naming_a_column_twice_is_refused(tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text("uri,label,uri\n/a/first.jpg,real,/b/second.jpg\n")
    with pytest.raises(ManifestError, match=r"names the column\(s\) 'uri' more than once"):
        indexed_inputs([str(manifest)])
    [(kind, row)] = list(expand_input(str(manifest)))  # the listing's own read refuses it too
    assert kind == "error" and "more than once" in row["error"]


def test_a_brace_pattern_is_counted_not_expanded(tmp_path):
    pattern = str(tmp_path / "s" / "{0..9999999}.tar")
    tracemalloc.start()
    try:
        with pytest.raises(UsageError, match=r"names 10,000,000 files, more than 1,000,000"):
            indexed_inputs([pattern])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MIB, peak  # the list of names would take gigabytes
    nested = str(tmp_path / "{a,b{1..3}}-{00..99}.tar")
    assert len(indexed_inputs([nested])) == 400  # at the limit's side that expands: as braceexpand


def test_a_brace_pattern_past_the_limit_is_refused_from_the_cli(tmp_path, capsys):
    pattern = str(tmp_path / "s" / "{0..9999999}.tar")
    code = main(["score", "--input", pattern, "--anchor", "a.safetensors", "--output", str(tmp_path / "o")])
    assert code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "names 10,000,000 files, more than 1,000,000" in message
    assert pattern in message and os.listdir(tmp_path) == []


def test_a_csv_naming_uri_twice_is_refused_from_the_cli(fitted_anchor, tmp_path, capsys):
    anchor, _ = fitted_anchor
    manifest = tmp_path / "crawl.csv"
    manifest.write_text("uri,page_url,uri\n/a/first.jpg,http://p/1,/b/second.jpg\n")
    prefix = tmp_path / "out" / "scan"
    code = main(
        ["score", "--input", str(manifest), "--anchor", str(anchor), "--output", str(prefix), *RUNNER]
    )
    assert code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert str(manifest) in message and "'uri' more than once" in message
    assert not glob.glob(f"{prefix}*")


def test_hostile_shards_of_round_4_each_give_their_row_from_the_cli(fitted_anchor, tmp_path):
    """Five gzip bombs and two tar-header bombs beside good shards without sidecars (so the driver
    looks into the shards for columns), a shard of keys that would break URIs, a sidecar with a
    clashing column and one with nested values: the good samples scored, each bad shard a row,
    each URI in one table once."""
    anchor, _ = fitted_anchor
    corpus = tmp_path / "corpus"
    good = write_img2dataset(corpus / "1-good", shards=1, per_shard=2, sidecar=False)
    bombs = [corpus / "0-bombs" / f"{n}.tar.gz" for n in range(5)]
    (corpus / "0-bombs").mkdir(parents=True)
    for bomb in bombs:
        write_gzip_bomb(bomb, 256 * MIB)
    headers = [corpus / "0-bombs" / name for name in ("long_name.tar.gz", "pax.tar.gz")]
    for header, kind in zip(headers, (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE)):
        write_gzip_bomb(header, 16 * MIB, kind)
    (corpus / "2-keys").mkdir()
    keys = write_unsafe_keys(corpus / "2-keys" / "keys.tar")
    nested = write_img2dataset(corpus / "3-nested", shards=1, per_shard=2)
    sidecar = corpus / "3-nested" / "00000.parquet"
    rows = [{**row, "exif": {"make": "Canon", "iso": 100}} for row in pq.read_table(sidecar).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows), sidecar)
    clash = write_img2dataset(corpus / "4-clash", shards=1, per_shard=2)["shards"][0]
    clash_sidecar = corpus / "4-clash" / "00000.parquet"
    rows = [{**row, "score": 0.5, "manifest_score": 0.25} for row in pq.read_table(clash_sidecar).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows), clash_sidecar)

    prefix = str(tmp_path / "scan" / "night")
    limits = ["--max_bytes", str(HOSTILE_MAX_BYTES), "--max_skip_bytes", str(8 * MIB)]
    code = main(
        ["score", "--input", str(corpus), "--anchor", str(anchor), "--output", prefix, *limits, *RUNNER]
    )
    assert code == 0
    scores, errors = table_rows(f"{prefix}-scores-*.parquet"), table_rows(f"{prefix}-errors-*.parquet")
    scored, failed = [row["uri"] for row in scores], {row["uri"]: row["error"] for row in errors}
    assert len(scored) == len(set(scored)) and len(failed) == len(errors) and not set(scored) & set(failed)
    samples = [
        uri for written in (good, nested) for shard in written["shards"] for uri in written["samples"][shard]
    ]
    assert set(scored) == set(samples) | set(keys["scored"])
    for bomb in bombs:
        assert "more than --max_skip_bytes" in failed.pop(str(bomb))
        assert "larger than --max_bytes" in failed.pop(f"{bomb}#bomb")
    for header in headers:
        assert "declares 16,777,216 bytes" in failed.pop(str(header))
    for uri, words in keys["errors"].items():
        assert words in failed.pop(uri)
    assert "'manifest_score'" in failed.pop(clash)
    assert failed == {}
    row = next(row for row in scores if row["uri"] == nested["samples"][nested["shards"][0]][0])
    assert json.loads(row["exif"]) == {"iso": 100, "make": "Canon"}
