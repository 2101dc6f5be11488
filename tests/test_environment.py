"""When the environment stops a command (issue #20): a full disk, a read-only file system, a
permission denied on an output are exit status 3 with one line naming the path, found before any
work where they can be; nothing half-written is left (no .tmp-*, beam-temp-* or partial tables);
a rerun once space is freed completes. Real small file systems where this machine lets the tests
mount one (tmpfs: root with CAP_SYS_ADMIN, as in CI's containers that allow it); injected errors
otherwise and for the paths no mount reaches."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess

import apache_beam as beam
import pytest
from test_updating import CONFIG, SPEC, real

from anchorscan.anchors.anchor_file import anchor_to_bytes
from anchorscan.anchors.errors import EnvironmentFailure, environment_failure
from anchorscan.anchors.federation import delta_to_bytes, export_delta
from anchorscan.anchors.io import storage
from anchorscan.anchors.tables import error_row
from anchorscan.pipelines.cli import main
from anchorscan.transforms.sinks import WriteErrors, cleaned_on_failure
from helpers import RUNNER, fit_by_hash, update_by_hash


@contextlib.contextmanager
def mounted(folder, options: str):
    """A tmpfs at ``folder`` with ``options``; the test is skipped, saying why, where this
    machine does not let it mount one."""
    folder.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True
    )
    if result.returncode:
        pytest.skip(f"cannot mount a small file system here ({result.stderr.strip() or 'mount failed'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def leftovers(folder) -> list[str]:
    return sorted(
        name for name in os.listdir(folder) if ".tmp-" in name or "beam-temp" in name or "probe" in name
    )


def fill(folder, keep_free: int) -> str:
    """Fills ``folder``'s file system but ``keep_free`` bytes; returns the filler's path."""
    status = os.statvfs(folder)
    filler = os.path.join(folder, "filler")
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, status.f_bavail * status.f_frsize - keep_free))
    return filler


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    base = fit_by_hash(SPEC, *real(500, 1, "coordinator"), CONFIG)
    site = update_by_hash(base, *real(300, 10, "site"))
    (folder / "base.safetensors").write_bytes(anchor_to_bytes(base))
    (folder / "site.safetensors").write_bytes(anchor_to_bytes(site))
    (folder / "site.delta").write_bytes(delta_to_bytes(export_delta(site, base)))
    return folder


def run_cli(argv) -> tuple[int, str]:
    error = io.StringIO()
    with contextlib.redirect_stderr(error), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, error.getvalue().strip()


def one_line(message: str) -> str:
    lines = [line for line in message.splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and "Traceback" not in message, message
    return lines[0]


def test_merge_on_a_full_disk_exits_3_before_the_work_and_a_rerun_completes(federation, tmp_path):
    with mounted(tmp_path / "tiny", "size=1m") as tiny:
        filler = fill(tiny, keep_free=16 * 1024)  # room for the probe, not for the anchor
        output = tiny / "merged.safetensors"
        argv = [
            "merge",
            str(federation / "base.safetensors"),
            str(federation / "site.delta"),
            "--output",
            str(output),
        ]
        code, message = run_cli(argv)
        assert code == 3, message
        line = one_line(message)
        assert str(output) in line and "no space left" in line
        assert not output.exists() and leftovers(tiny) == []
        os.unlink(filler)
        assert run_cli(argv)[0] == 0 and output.exists()


def test_export_delta_on_a_full_disk_and_a_write_that_fails_midway(federation, tmp_path, monkeypatch):
    with mounted(tmp_path / "tiny", "size=1m") as tiny:
        fill(tiny, keep_free=0)
        output = tiny / "site.delta"
        argv = [
            "export-delta",
            "--anchor",
            str(federation / "site.safetensors"),
            "--since",
            str(federation / "base.safetensors"),
            "--output",
            str(output),
        ]
        code, message = run_cli(argv)
        assert code == 3 and "no space left" in one_line(message) and leftovers(tiny) == []
    # A disk that fills while the file is written (after the checks): the temporary file goes.
    real_replace = os.replace

    def disk_filled(source, target):
        if str(target) == str(tmp_path / "late.delta"):
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_replace(source, target)

    monkeypatch.setattr(storage.os, "replace", disk_filled)
    argv[-1] = str(tmp_path / "late.delta")
    code, message = run_cli(argv)
    assert code == 3 and str(tmp_path / "late.delta") in one_line(message)
    assert leftovers(tmp_path) == [] and not (tmp_path / "late.delta").exists()


def test_a_read_only_file_system_exits_3_before_any_work(federation, tmp_path):
    with mounted(tmp_path / "ro", "size=1m,ro") as read_only:
        code, message = run_cli(
            [
                "merge",
                str(federation / "base.safetensors"),
                str(federation / "site.delta"),
                "--output",
                str(read_only / "merged.safetensors"),
            ]
        )
        assert code == 3 and "read-only" in one_line(message)


def test_permission_denied_on_an_output_is_the_environments(federation, tmp_path, monkeypatch):
    # The tests run as root, whom chmod does not stop: the denial is injected at the probe.
    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(storage, "open", denied, raising=False)
    code, message = run_cli(["keygen", "--output", str(tmp_path / "site")])
    assert code == 3 and "permission denied" in one_line(message)


def test_a_workers_environment_failure_is_exit_3_in_any_wrapping(monkeypatch):
    from anchorscan.pipelines import info

    def full(_):
        raise OSError(errno.ENOSPC, "No space left on device", "/out/scan-scores-00000.parquet")

    def pipeline_that_fills_the_disk(argv=None):
        with beam.Pipeline(runner="FnApiRunner") as pipeline:
            _ = pipeline | beam.Create([1]) | beam.Map(full)

    monkeypatch.setattr(info, "run", pipeline_that_fills_the_disk)
    code, message = run_cli(["info", "anything"])
    assert code == 3 and one_line(message).endswith(
        "/out/scan-scores-00000.parquet: no space left on the device: free space and run the command again"
    )
    # what a portable runner's worker sends back is text only
    wrapped = RuntimeError("Pipeline failed: OSError: [Errno 30] Read-only file system: '/out/x.parquet'")
    assert (
        str(environment_failure(wrapped))
        == "/out/x.parquet: the file system is read-only: write elsewhere, or make it writable"
    )
    assert environment_failure(RuntimeError("OSError: [Errno 2] No such file")) is None
    assert isinstance(environment_failure(OSError(errno.EDQUOT, "Disk quota exceeded")), EnvironmentFailure)


def test_a_failed_pipeline_leaves_no_temporary_folders_or_partial_tables(tmp_path, monkeypatch):
    from apache_beam.io import parquetio

    def disk_full(self, writer, value):  # the shard's temporary file is open by now
        raise OSError(errno.ENOSPC, "No space left on device", "shard")

    monkeypatch.setattr(parquetio._ParquetSink, "write_record", disk_full)
    prefix = str(tmp_path / "scan")
    (tmp_path / "other-errors-00000-of-00001.parquet").write_bytes(b"not ours")
    with pytest.raises(Exception) as failure, cleaned_on_failure([f"{prefix}-errors"]):
        pipeline = beam.Pipeline(runner="FnApiRunner")
        rows = pipeline | beam.Create([error_row(f"u{i}", "read", "x") for i in range(50)])
        _ = rows | WriteErrors(prefix)
        pipeline.run().wait_until_finish()
    assert environment_failure(failure.value) is not None
    assert sorted(os.listdir(tmp_path)) == ["other-errors-00000-of-00001.parquet"]


@pytest.mark.slow
def test_score_on_a_full_disk_exits_3_leaves_nothing_and_a_rerun_completes(
    fitted_anchor, real_photos, tmp_path
):
    anchor, _ = fitted_anchor
    with mounted(tmp_path / "tiny", "size=2m") as tiny:
        filler = fill(tiny, keep_free=12 * 1024)  # the probe and the lock fit, the tables do not
        argv = [
            "score",
            "--input",
            str(real_photos),
            "--anchor",
            str(anchor),
            "--output",
            str(tiny / "scan"),
            *RUNNER,
        ]
        code, message = run_cli(argv)
        assert code == 3, message
        assert "no space left" in message.strip().splitlines()[-1]
        assert sorted(os.listdir(tiny)) == ["filler"]  # no lock, no temporary folder, no table
        os.unlink(filler)
        assert run_cli(argv)[0] == 0
        assert [name for name in os.listdir(tiny) if name.startswith("scan-scores-")]
