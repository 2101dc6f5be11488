"""Crawled manifests: http(s):// URIs fetched from a web server on 127.0.0.1, and the manifests'
other columns carried to the score rows under their own names."""

from __future__ import annotations

import datetime
import pathlib

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from anchorscan.anchors.io import fetch as fetch_module
from anchorscan.anchors.tables import SCORE_SCHEMA
from anchorscan.pipelines import score
from anchorscan.transforms.carried import carried_columns, carried_row, score_schema
from anchorscan.transforms.listing import ListInputs
from helpers import RUNNER, listed, read_parquet_rows, write_crops
from servers import CrawlSite

CRAWLED_AT = datetime.datetime(2026, 3, 1, 12, 30, tzinfo=datetime.timezone.utc)


def write_parquet_manifest(path, uris, crawl_ids):
    pq.write_table(
        pa.table(
            {
                "crawl_id": pa.array(crawl_ids, pa.int64()),
                "uri": uris,
                "crawled_at": pa.array([CRAWLED_AT] * len(uris), pa.timestamp("us", tz="UTC")),
                "licence": pa.array(
                    ["cc-by", None, *["cc0"] * (len(uris) - 2)][: len(uris)]
                ).dictionary_encode(),
            }
        ),
        path,
    )


def test_columns_and_types_come_from_the_manifest_headers(tmp_path):
    (tmp_path / "a.csv").write_text("page_url,uri,crawl_id,score\nhttp://p/1,x.jpg,7,0.5\n")
    write_parquet_manifest(tmp_path / "b.parquet", ["y.jpg", "z.jpg"], [1, 2])
    (tmp_path / "c.txt").write_text("x.jpg\n")
    carried = carried_columns(
        [
            str(tmp_path / "c.txt"),
            str(tmp_path / "a.csv"),
            str(tmp_path / "b.parquet"),
            str(tmp_path / "missing.csv"),
            str(tmp_path / "*.jpg"),
        ]
    )
    assert [(name, field.name, field.type) for name, field in carried] == [
        ("page_url", "page_url", pa.string()),
        ("crawl_id", "crawl_id", pa.string()),  # a string in the CSV, int64 in the Parquet file
        ("score", "manifest_score", pa.string()),  # `score` is a score column
        ("crawled_at", "crawled_at", pa.timestamp("us", tz="UTC")),
        ("licence", "licence", pa.string()),  # dictionary-encoded in the file
    ]
    schema = score_schema(carried)
    assert schema.names[: len(SCORE_SCHEMA)] == SCORE_SCHEMA.names
    assert schema.names[len(SCORE_SCHEMA) :] == [
        "page_url",
        "crawl_id",
        "manifest_score",
        "crawled_at",
        "licence",
    ]


def test_rows_carry_the_columns_of_the_first_manifest_that_lists_their_uri(tmp_path):
    write_parquet_manifest(
        tmp_path / "first.parquet", [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")], [1, 2]
    )
    (tmp_path / "second.csv").write_text("uri,crawl_id\na.jpg,99\nc.jpg,3\n")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "d.jpg").write_bytes(b"x")  # listed by a folder: no manifest columns
    patterns = [str(tmp_path / "first.parquet"), str(tmp_path / "second.csv"), str(tmp_path / "more")]
    carried = carried_columns(patterns)
    names = tuple(name for name, _ in carried)
    with beam.Pipeline(options=PipelineOptions(RUNNER)) as pipeline:
        units, _, _ = pipeline | ListInputs(patterns, names)
        rows = units | beam.Map(lambda unit: {"uri": unit.uri, **carried_row(unit.carried, carried)})
        assert_that(
            rows,
            equal_to(
                [
                    {
                        "uri": str(tmp_path / "a.jpg"),
                        "crawl_id": "1",
                        "crawled_at": CRAWLED_AT,
                        "licence": "cc-by",
                    },
                    {
                        "uri": str(tmp_path / "b.jpg"),
                        "crawl_id": "2",
                        "crawled_at": CRAWLED_AT,
                        "licence": None,
                    },
                    {"uri": str(tmp_path / "c.jpg"), "crawl_id": "3", "crawled_at": None, "licence": None},
                    {
                        "uri": str(tmp_path / "more/d.jpg"),
                        "crawl_id": None,
                        "crawled_at": None,
                        "licence": None,
                    },
                ]
            ),
        )


@pytest.fixture
def crawl(monkeypatch, tmp_path):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(fetch_module, "BACKOFF_SECONDS", 0.05)
    with CrawlSite(slow_seconds=3.0, big_bytes=3_000_000) as site:
        (tmp_path / "crops").mkdir()
        for path in write_crops(tmp_path / "crops", count_per_photo=1, seed=7)[:3]:
            site.images[path.rsplit("/", 1)[1]] = pathlib.Path(path).read_bytes()
        yield site


def test_a_crawled_manifest_is_scored_with_its_columns(fitted_anchor, crawl, tmp_path, monkeypatch):
    anchor, _ = fitted_anchor
    good = sorted(crawl.images)
    # The site under the name localhost is a public host to the redirect guard (the requests
    # still reach 127.0.0.1): its redirect to the cloud metadata server is not followed.
    resolve = fetch_module.host_addresses
    monkeypatch.setattr(
        fetch_module,
        "host_addresses",
        lambda host: {"93.184.216.34"} if host == "localhost" else resolve(host),
    )
    public = crawl.url.replace("127.0.0.1", "localhost")
    metadata_server = "http://169.254.169.254/latest/meta-data/"
    pages = {
        f"{crawl.url}/img/{good[0]}": "p0",
        f"{crawl.url}/redirect/{good[1]}": "p1",
        f"{crawl.url}/flaky/{good[2]}": "p2",
        f"{crawl.url}/404": "p3",
        f"{crawl.url}/to-file": "p4",
        f"{crawl.url}/loop": "p5",
        f"{crawl.url}/truncated": "p6",
        f"{crawl.url}/big": "p7",
        f"{crawl.url}/slow": "p8",
        f"{public}/away/{metadata_server}": "p9",
    }
    manifest = tmp_path / "crawl.csv"
    manifest.write_text(
        "uri,page_url,crawl_id\n"
        + "".join(f"{uri},https://example.org/{page},{i}\n" for i, (uri, page) in enumerate(pages.items()))
    )
    prefix = str(tmp_path / "scan")
    summary = score.run(
        [
            "--input",
            str(manifest),
            "--anchor",
            str(anchor),
            "--output",
            prefix,
            "--http_timeout",
            "1",
            "--http_retries",
            "1",
            "--max_bytes",
            "2000000",
            *RUNNER,
        ]
    )

    rows = {row["uri"]: row for row in read_parquet_rows(prefix + "-scores-*.parquet")}
    errors = {row["uri"]: row for row in read_parquet_rows(prefix + "-errors-*.parquet")}
    assert sorted([*rows, *errors]) == sorted(pages)
    assert set(rows) == set(list(pages)[:3]) and summary["scored"] == 3
    for uri, row in rows.items():
        assert (row["page_url"], row["crawl_id"]) == (
            f"https://example.org/{pages[uri]}",
            str(list(pages).index(uri)),
        )
    schema = pq.read_schema(next((tmp_path).glob("scan-scores-*.parquet")))
    assert schema.names == [*SCORE_SCHEMA.names, "page_url", "crawl_id"]
    expected = {
        "404": "HTTP 404 Not Found",
        "to-file": "HTTP 302 redirect to file:///etc/passwd: only http(s) redirects are followed",
        "loop": f"HTTP 302 redirect loop back to {crawl.url}/loop",
        "truncated": "truncated response (100 of 10,000 bytes) (after 2 attempts)",
        "big": "response is larger than --max_bytes 2,000,000 (Content-Length 3,000,000); not read",
        "slow": "timed out (after 2 attempts)",
        "": f"HTTP 302 redirect from a public host to {metadata_server}, a loopback, private or "
        "link-local address: not followed",
    }
    assert {uri.rsplit("/", 1)[1]: row["error"] for uri, row in errors.items()} == expected
    assert {row["stage"] for row in errors.values()} == {"read"}
    assert crawl.requests[f"/flaky/{good[2]}"] == 2 and crawl.requests["/404"] == 1


def test_an_http_input_is_one_image_and_an_http_manifest_is_read(crawl):
    from anchorscan.transforms.listing import expand_input

    assert listed(expand_input(f"{crawl.url}/img/a.png")) == [("uri", f"{crawl.url}/img/a.png")]
    crawl.images["list.txt"] = f"{crawl.url}/img/b.png\nrelative.png\n".encode()
    assert [value for _, value in listed(expand_input(f"{crawl.url}/img/list.txt"))] == [
        f"{crawl.url}/img/b.png",
        f"{crawl.url}/img/relative.png",
    ]
