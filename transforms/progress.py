"""Progress of long local runs on standard error: images done of the total, rate and ETA.

Each worker process reports what passed through it; on a distributed runner, use the runner's
own monitoring instead."""
from __future__ import annotations

import sys
import threading
import time

import apache_beam as beam

_lock = threading.Lock()
_state = {"done": 0, "started": None, "last": 0.0}


class ReportProgress(beam.DoFn):
    def __init__(self, label: str, every_seconds: float = 10.0):
        self.label, self.every_seconds = label, every_seconds

    def process(self, element, total: int):
        with _lock:
            now = time.monotonic()
            if _state["started"] is None:
                _state["started"] = _state["last"] = now
            _state["done"] += 1
            if now - _state["last"] >= self.every_seconds:
                _state["last"] = now
                done = _state["done"]
                rate = done / max(now - _state["started"], 1e-9)
                eta = max(total - done, 0) / max(rate, 1e-9)
                print(f"{self.label}: {done}/{total} images, {rate:.1f}/s, ETA {eta / 60:.1f} min",
                      file=sys.stderr, flush=True)
        yield element
