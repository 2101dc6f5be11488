"""numpy's BLAS and torch each start a thread per core; in one worker they then fight over the
cores (measured here: a 2048 x 2048 eigendecomposition 10x slower beside a busy backbone).
Workers keep BLAS on one thread; torch's threads do the heavy work."""

from __future__ import annotations

import logging
import os

import threadpoolctl

_limits = None


def limit_blas_threads() -> None:
    """BLAS on one thread: those loaded now by threadpoolctl, those loaded later (scipy brings
    its own OpenBLAS) by the variable OpenBLAS reads when it loads."""
    global _limits
    if _limits is None:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        _limits = threadpoolctl.threadpool_limits(limits=1, user_api="blas")


# Processes and threads past this many per core only add waiting (and, past hundreds, load
# that stalls the machine): a worker caps --decode_processes and --torch_threads at this
# multiple of its cores.
CORES_MULTIPLE = 4


def capped_to_cores(requested: int, flag: str) -> int:
    """``requested`` or CORES_MULTIPLE times this machine's cores, whichever is smaller (with a
    warning when it caps)."""
    cap = CORES_MULTIPLE * (os.cpu_count() or 1)
    if requested > cap:
        logging.warning(
            "%s %d is more than %d x this worker's cores: using %d", flag, requested, CORES_MULTIPLE, cap
        )
        return cap
    return requested
