"""The HTML report: self-contained, and it renders in a real browser without console errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from anchorscan.pipelines import report, score
from helpers import RUNNER

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def scanned(fitted_anchor, real_photos, tmp_path_factory):
    anchor, _ = fitted_anchor
    folder = tmp_path_factory.mktemp("report")
    prefix = str(folder / "scan")
    score.run(
        [
            "--input",
            str(real_photos),
            "--input",
            str(folder / "missing-*.jpg"),
            "--anchor",
            str(anchor),
            "--output",
            prefix,
            *RUNNER,
        ]
    )
    labels = folder / "labels.csv"
    paths = sorted(real_photos.iterdir())
    # labels for the ROC panel: call half the photos "fake" (the curve only has to be drawn)
    labels.write_text(
        "uri,label,generator\n"
        + "".join(
            f"{p},{'fake' if i % 2 else 'real'},{'gen' if i % 2 else 'real'}\n" for i, p in enumerate(paths)
        )
    )
    page = folder / "report.html"
    report.run(
        [
            "--scores",
            prefix,
            "--output",
            str(page),
            "--anchor",
            str(anchor),
            "--labels",
            str(labels),
            "--gallery",
            "4",
        ]
    )
    return page


def test_report_is_self_contained(scanned):
    page = scanned.read_text()
    assert page.count('src="data:image/png;base64,') == 3  # distributions, folders, ROC
    assert page.count('src="data:image/jpeg;base64,') == 8  # 4 most and 4 least suspicious
    assert not re.search(r'src="(?!data:)', page)  # nothing fetched from elsewhere
    assert "list: 1" in page  # the unmatched input is counted
    table = page[page.index("Flagged per label") :]
    assert re.search(r"<th>gen</th><td>\d+</td><td>[\d.]+ %</td><td>[\d.]+ %</td>", table)
    assert "<th>real</th>" in table


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs it)")
def test_report_renders_in_chromium(scanned, tmp_path):
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1300,2400",
            f"--screenshot={shot}",
            f"file://{scanned}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 20  # plots and thumbnails, not a blank page
    dom = subprocess.run(
        [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--dump-dom",
            f"file://{scanned}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.stdout.count("<img") == 11 and "Most suspicious" in dom.stdout


def test_every_value_a_hand_made_table_holds_is_escaped(tmp_path, capsys):
    """A scores table made by hand, markup in every string column (anchor_id and head were
    written raw), and an errors table likewise: the page holds the text, never the markup."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anchorscan.anchors.tables import ERROR_SCHEMA, SCORE_SCHEMA
    from anchorscan.pipelines.cli import main

    def hostile(schema: pa.Schema, count: int) -> pa.Table:
        columns = {}
        for field in schema:
            if pa.types.is_string(field.type):
                columns[field.name] = [
                    f'<script>alert("{field.name} {i}")</script><img src=x>' for i in range(count)
                ]
            elif pa.types.is_boolean(field.type):
                columns[field.name] = [i % 2 == 0 for i in range(count)]
            else:
                columns[field.name] = [float(i) for i in range(count)]
        return pa.Table.from_pydict(columns).cast(schema)

    pq.write_table(hostile(SCORE_SCHEMA, 6), tmp_path / "hand-scores-00000-of-00001.parquet")
    pq.write_table(hostile(ERROR_SCHEMA, 2), tmp_path / "hand-errors-00000-of-00001.parquet")
    page = tmp_path / "report.html"
    assert main(["report", "--scores", str(tmp_path / "hand"), "--output", str(page), "--gallery", "3"]) == 0
    text = page.read_text()
    assert "<script" not in text and "<img src=x" not in text
    for column in ("anchor_id", "head", "stage", "uri"):
        assert f"&lt;script&gt;alert(&quot;{column} 0&quot;)&lt;/script&gt;" in text, column


def test_the_gallery_reads_each_sample_of_a_shard_once(tmp_path, monkeypatch):
    """Thumbnails of several samples of the same shards: each shard is gone through once for all
    of its thumbnails (each sample read once, not the shard from its start per thumbnail), and
    every thumbnail is drawn."""
    import collections

    import pyarrow as pa
    import pyarrow.parquet as pq

    from anchorscan.anchors.tables import ERROR_SCHEMA, SCORE_SCHEMA
    from anchorscan.pipelines.cli import main
    from shard_fixtures import write_img2dataset

    written = write_img2dataset(tmp_path / "crawl", shards=2, per_shard=5)
    uris = [uri for shard in written["shards"] for uri in written["samples"][shard]]
    defaults = {pa.types.is_string: "", pa.types.is_boolean: False, pa.types.is_floating: 0.0}
    defaults[pa.types.is_integer] = 0
    columns = {
        field.name: [next(v for kind, v in defaults.items() if kind(field.type))] * len(uris)
        for field in SCORE_SCHEMA
    }
    columns.update(uri=uris, score=[float(i) for i in range(len(uris))], anchor_id=["a" * 16] * len(uris))
    pq.write_table(pa.table(columns).cast(SCORE_SCHEMA), tmp_path / "scan-scores-00000-of-00001.parquet")
    pq.write_table(ERROR_SCHEMA.empty_table(), tmp_path / "scan-errors-00000-of-00001.parquet")
    reads: collections.Counter = collections.Counter()
    streamed = report.samples

    def counted(stream, limits):
        for sample in streamed(stream, limits):
            reads[sample.key] += 1
            yield sample

    monkeypatch.setattr(report, "samples", counted)
    page = tmp_path / "report.html"
    # The 4 highest and the 4 lowest scores: 8 of the 10 samples, 4 in each shard.
    assert main(["report", "--scores", str(tmp_path / "scan"), "--output", str(page), "--gallery", "4"]) == 0
    text = page.read_text()
    assert text.count('alt="thumbnail"') == 8 and 'class="missing"' not in text
    wanted = {uri.rsplit("#", 1)[1] for uri in uris[:4] + uris[-4:]}
    assert wanted <= set(reads) and set(reads.values()) == {1}, reads
