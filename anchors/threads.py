"""numpy's BLAS and torch each start a thread per core; in one worker they then fight over the
cores (measured here: a 2048 x 2048 eigendecomposition 10x slower beside a busy backbone).
Workers keep BLAS on one thread; torch's threads do the heavy work."""

from __future__ import annotations

import threadpoolctl

_limits = None


def limit_blas_threads() -> None:
    global _limits
    if _limits is None:
        _limits = threadpoolctl.threadpool_limits(limits=1, user_api="blas")
