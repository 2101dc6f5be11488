"""Progress of long local runs on standard error: images done of the total, rate and ETA.

Each worker process reports what passed through it; on a distributed runner, use the runner's
own monitoring instead."""

from __future__ import annotations

import collections
import sys
import threading
import time
import uuid

import apache_beam as beam

_lock = threading.Lock()
# Per pipeline run: the DoFn's copies in one process share a count, and a second pipeline in
# the same process (tests, notebooks) starts from zero.
_runs: dict[str, dict] = collections.defaultdict(lambda: {"done": 0, "started": None, "last": 0.0})


class ReportProgress(beam.DoFn):
    def __init__(self, label: str, every_seconds: float = 10.0):
        self.label, self.every_seconds = label, every_seconds
        self.run_id = uuid.uuid4().hex

    def process(self, element, total: int):
        with _lock:
            state = _runs[self.run_id]
            now = time.monotonic()
            if state["started"] is None:
                state["started"] = state["last"] = now
            state["done"] += 1
            if now - state["last"] >= self.every_seconds:
                state["last"] = now
                done = state["done"]
                rate = done / max(now - state["started"], 1e-9)
                eta = max(total - done, 0) / max(rate, 1e-9)
                print(
                    f"{self.label}: {done}/{total} images, {rate:.1f}/s, ETA {eta / 60:.1f} min",
                    file=sys.stderr,
                    flush=True,
                )
        yield element
