"""The read step: listed units -> records (URI, bytes, carried columns), each from the byte
source that claims the unit (``anchors/io/sources.py``), and an error row for anything that
cannot be read. Reads run on a daemon thread with a time limit, so no input can hold a worker;
a read past it is told to stop, and one that is working (a shard decompressing) stops at its next
chunk."""

from __future__ import annotations

import queue
import threading

import apache_beam as beam

from anchorscan.anchors.errors import exception_name
from anchorscan.anchors.io.registry import source_for
from anchorscan.anchors.io.sources import (
    ReadError,
    ReadFailure,
    ReadLimits,
    Unit,
    stopped_by,
)
from anchorscan.anchors.io.uris import Location
from anchorscan.anchors.tables import error_row

ERRORS = "errors"
# A read that outlives its timeout is told to stop and left to its daemon thread (a read stuck in
# the kernel cannot be stopped); past this many at once, further reads fail at once instead of
# piling up.
MAX_STUCK_READS = 4


class _ReaderThread:
    """A daemon thread that runs one call at a time for the read step, so that a call can be
    given up after a timeout; a thread left in a stuck call is told to ``stop`` (its reads end at
    their next chunk, and the thread with them) and replaced, never joined."""

    def __init__(self):
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True, name="anchorscan-read").start()

    def _serve(self):
        with stopped_by(self.stop):
            while not self.stop.is_set():
                call, outcome, done = self.calls.get()
                try:
                    outcome["value"] = call()
                except BaseException as error:
                    outcome["error"] = error
                finally:
                    done.set()

    def run(self, call, timeout: float) -> tuple[bool, dict, threading.Event]:
        outcome: dict = {}
        done = threading.Event()
        self.calls.put((call, outcome, done))
        return done.wait(timeout), outcome, done


class ReadFn(beam.DoFn):
    """Unit -> Record for each image it holds; error rows tagged ERRORS (the unit's own URI when
    the unit cannot be read at all, the image's when one inside it cannot)."""

    def __init__(self, limits: ReadLimits):
        self.limits = limits

    def setup(self):
        self._thread = _ReaderThread()
        self._stuck: list[threading.Event] = []

    def _next(self, items, uri: str):
        """``next(items)`` on the reader thread, given up after the read timeout."""
        self._stuck = [done for done in self._stuck if not done.is_set()]
        if len(self._stuck) >= MAX_STUCK_READS:
            raise ReadError(
                f"not read: {len(self._stuck)} earlier reads on this worker are stuck past "
                "--read_timeout (the storage is not answering)",
                "TimeoutError",
            )
        # A web server gets its own overall limit (--http_max_time), retries included.
        timeout = self.limits.http.max_time if Location.parse(uri).is_http else self.limits.read_timeout
        finished, outcome, done = self._thread.run(lambda: next(items), timeout)
        if not finished:
            self._stuck.append(done)
            self._thread.stop.set()
            self._thread = _ReaderThread()
            raise ReadError(
                f"reading took longer than --read_timeout {self.limits.read_timeout:g} s "
                "(a stalled disk or network?)",
                "TimeoutError",
            )
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def process(self, unit: Unit):
        items = iter(source_for(unit.uri).read(unit, self.limits))
        while True:
            try:
                item = self._next(items, unit.uri)
            except StopIteration:
                return
            except Exception as error:  # one input's trouble is its own row, whatever it was
                error_type = getattr(error, "error_type", exception_name(error))
                message = (
                    str(error) if isinstance(error, ReadError) else f"cannot read file: {error_type}: {error}"
                )
                yield beam.pvalue.TaggedOutput(ERRORS, error_row(unit.uri, "read", message, error_type))
                return
            if isinstance(item, ReadFailure):
                yield beam.pvalue.TaggedOutput(
                    ERRORS, error_row(item.uri, "read", item.message, item.error_type)
                )
            else:
                yield item


class _SamplesApart(beam.PartitionFn):
    """Records of tar shards' samples to partition 1, others to 0."""

    def partition_for(self, element, num_partitions, *args, **kwargs) -> int:
        return int(Location.parse(element.uri).shard_and_key is not None)


class SpreadSamples(beam.PTransform):
    """A shard is read by one worker; its samples are then redistributed (a Reshuffle), so that
    decoding and scoring 10,000 samples do not sit on the core that read them. Other records
    come from units that the listing spread already and pass as they are."""

    def expand(self, records):
        parts = records | "FromShards" >> beam.Partition(_SamplesApart(), 2)
        spread = parts[1] | "Spread" >> beam.Reshuffle()
        return (parts[0], spread) | "Records" >> beam.Flatten()


class ReadInputs(beam.PTransform):
    """Units -> (records, error rows); ``spread``: shards' samples redistributed over the
    workers (on distributed runners: Beam's local runner holds a shuffle's whole input in
    memory, which would hold every sample of a shard)."""

    def __init__(self, limits: ReadLimits, spread: bool = False):
        super().__init__()
        self.limits, self.spread = limits, spread

    def expand(self, units):
        outputs = units | beam.ParDo(ReadFn(self.limits)).with_outputs(ERRORS, main="records")
        records = outputs.records | "SpreadSamples" >> SpreadSamples() if self.spread else outputs.records
        return records, outputs[ERRORS]
