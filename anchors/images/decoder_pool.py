"""Decoding in worker processes that can be stopped. A decoder that loops on a hostile file (a
progressive JPEG of 40,000 empty scans decodes for minutes) cannot be interrupted in a thread,
and a thread that is left to it holds its memory and the process's exit. Each decode runs in a
child process instead: past its timeout the child is killed and a fresh one takes its place, so
at most ``processes`` decodes exist at once and none outlives its timeout. A decoder that
crashes (a segfault in a C plugin) costs its own image too.

Children are fresh interpreters (``python -m anchorscan.anchors.images.decoder_pool``), not forks of
the worker, whose threads (gRPC, torch) a fork would copy mid-state, nor multiprocessing's
spawned processes, which re-import the caller's main script. A child exits when its parent
does, even in the middle of a decode."""

from __future__ import annotations

import atexit
import collections
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from anchorscan.anchors.errors import exception_name
from anchorscan.anchors.images.decode import DecodeError

# Starting an interpreter that imports numpy and Pillow: a second when idle, more when loaded.
START_TIMEOUT = 120.0


class DecodeFailed(DecodeError):
    """A decode that failed in a worker process; ``error_type`` names what stopped it: the
    decoder's exception class, ``TimeoutError`` or ``DecoderCrash``. ``escaped``: the decode
    function raised something other than DecodeError (a gap in its own error handling)."""

    def __init__(self, message: str, error_type: str, escaped: bool = False):
        super().__init__(message)
        self.error_type, self.escaped = error_type, escaped


def _serve(connection: Connection, decode: Callable[[bytes], Any]) -> None:
    """The child's loop: bytes in, (outcome, retire) out; outcome ("ok", result) or ("error" or
    "escape", type, message); ``retire``: the decode left a thread running (a metadata read
    past its deadline, see provenance.py), so this process is to be replaced."""
    threads = threading.active_count()
    while True:
        try:
            data = connection.recv_bytes()
        except (EOFError, OSError):  # the parent is gone
            return
        outcome: tuple
        try:
            outcome = ("ok", decode(data))
        except DecodeError as error:
            cause = error.__cause__
            outcome = ("error", exception_name(cause) if cause else "DecodeError", str(error))
        except Exception as error:  # whatever escapes the decoder is still this image's error
            outcome = (
                "escape",
                exception_name(error),
                f"cannot decode image: {exception_name(error)}: {error}",
            )
        connection.send((outcome, threading.active_count() > threads))


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _child_main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    connection = Connection(fd)
    sys.path[:] = connection.recv()  # before the decode function is unpickled
    decode = pickle.loads(connection.recv_bytes())
    connection.send("ready")
    _serve(connection, decode)


class Job:
    """One decode: waiting for a process, then running on one, then done (``outcome`` set)."""

    __slots__ = ("data", "outcome", "started")

    def __init__(self, data: bytes):
        self.data = data  # emptied once a process has it
        self.started = 0.0  # monotonic time it started running
        self.outcome: tuple | None = None


class _Worker:
    def __init__(self, decode: bytes):
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "anchorscan.anchors.images.decoder_pool", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.connection = Connection(ours.detach())
        self.connection.send(sys.path)
        self.connection.send_bytes(decode)
        self.job: Job | None = None

    def wait_ready(self) -> _Worker:
        """Ready before any decode's clock starts: a loaded machine may take seconds to start an
        interpreter, and that time is not the image's."""
        try:
            ready = self.connection.poll(START_TIMEOUT) and self.connection.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.stop()
            raise RuntimeError(f"a decoder process did not start within {START_TIMEOUT:g} s")
        return self

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()  # SIGKILL cannot be ignored: this returns at once
        self.connection.close()


_POOLS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """A process that ends without closing its pools leaves no decode running behind it."""
    for pool in list(_POOLS):
        pool.close()


class DecoderPool:
    """``decode`` (picklable, bytes -> anything) on ``processes`` worker processes, each call
    limited to ``timeout`` seconds of its own running time (time waiting for a free process
    does not count)."""

    def __init__(self, decode: Callable[[bytes], Any], processes: int, timeout: float):
        self.decode, self.timeout = pickle.dumps(decode), timeout
        self._workers = [
            worker.wait_ready() for worker in [_Worker(self.decode) for _ in range(max(processes, 1))]
        ]
        self._waiting: collections.deque[Job] = collections.deque()
        _POOLS.add(self)

    def submit(self, data: bytes) -> Job:
        job = Job(data)
        self._waiting.append(job)
        self._dispatch()
        return job

    def result(self, job: Job) -> Any:
        """The decode's result; DecodeFailed when it failed, timed out or crashed."""
        while job.outcome is None:
            self._dispatch()
            self._collect()
        if job.outcome[0] == "ok":
            return job.outcome[1]
        kind, error_type, message = job.outcome
        raise DecodeFailed(message, error_type, escaped=kind == "escape")

    def discard_waiting(self) -> None:
        """Drops the jobs not yet started (a retried bundle starts afresh)."""
        self._waiting.clear()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def _replace(self, worker: _Worker) -> None:
        worker.stop()
        self._workers[self._workers.index(worker)] = _Worker(self.decode).wait_ready()

    def _dispatch(self) -> None:
        for worker in list(self._workers):
            if worker.job is not None or not self._waiting:
                continue
            job = self._waiting[0]
            try:
                worker.connection.send_bytes(job.data)
            except OSError:  # the idle child died (killed from outside): start another
                self._replace(worker)
                continue
            self._waiting.popleft()
            job.data, job.started, worker.job = b"", time.monotonic(), job

    def _collect(self) -> None:
        """Waits until a running job ends or the first one runs out of time; records outcomes."""
        busy = [(worker, worker.job) for worker in self._workers if worker.job is not None]
        if not busy:
            raise RuntimeError("waiting for a decode that is neither queued nor running")
        deadline = min(job.started for _, job in busy) + self.timeout
        ready = wait([worker.connection for worker, _ in busy], max(deadline - time.monotonic(), 0.0))
        for worker, job in busy:
            if worker.connection in ready:
                try:
                    job.outcome, retire = worker.connection.recv()
                    worker.job = None
                    if not retire:
                        continue  # a retired process falls through to its replacement
                except (EOFError, OSError):
                    try:
                        code = worker.process.wait(1)
                    except subprocess.TimeoutExpired:
                        code = None
                    how = (
                        f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit status {code}"
                    )
                    job.outcome = (
                        "error",
                        "DecoderCrash",
                        f"the decoder crashed ({how}) on this file: a damaged file that "
                        "trips a bug in an image library",
                    )
            elif time.monotonic() - job.started >= self.timeout:
                job.outcome = (
                    "error",
                    "TimeoutError",
                    f"decoding took longer than --decode_timeout {self.timeout:g} s "
                    "(the decoder was stopped)",
                )
            else:
                continue
            self._replace(worker)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
