"""A command keeps numpy's BLAS on one thread (anchors/threads.py): beside torch's threads and
the decoder processes, BLAS's own threads cost several times the CPU (docs/BENCHMARKS.md)."""

from __future__ import annotations

import os
import subprocess
import sys

BLAS_THREADS = (
    "max(pool['num_threads'] for pool in threadpoolctl.threadpool_info() if pool['user_api'] == 'blas')"
)


def test_a_command_runs_with_blas_on_one_thread(fitted_anchor):
    anchor, _ = fitted_anchor
    code = (
        "import numpy, threadpoolctl\n"
        "from anchorscan.pipelines.cli import main\n"
        f"before = {BLAS_THREADS}\n"
        f"status = main(['info', {str(anchor)!r}])\n"
        f"print(before, status, {BLAS_THREADS})\n"
    )
    # Two BLAS threads to start with, whatever this machine's cores: the command must lower them.
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "2"},
    )
    assert result.stdout.split()[-3:] == ["2", "0", "1"], result.stdout[-2000:] + result.stderr[-2000:]
