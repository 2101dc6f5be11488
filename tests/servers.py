"""Services the tests start on 127.0.0.1 and stop again: the GCS emulator, and a guard that
refuses (and records) any connection outside loopback."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
import time

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen | None = None, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before listening")
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {seconds:.0f} s")


@contextlib.contextmanager
def started(command: list[str], port: int, log_path, env: dict | None = None):
    """A service process listening on ``port``, terminated (then killed) on exit; its output
    goes to ``log_path``."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_port(port, process)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def storage_emulator(bucket: str, log_path):
    """PyPI's gcp-storage-emulator, in memory, with ``bucket`` created; yields its endpoint."""
    port = free_port()
    command = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", LOOPBACK,
               "--port", str(port), "--in-memory", "--default-bucket", bucket]
    with started(command, port, log_path):
        yield f"http://{LOOPBACK}:{port}"


def is_loopback(address) -> bool:
    """True for addresses on this machine: 127.0.0.0/8, ::1, 'localhost', and Unix sockets."""
    if not isinstance(address, tuple):
        return True  # AF_UNIX path
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a host name: resolving it would already leave the machine
        return False


class LoopbackGuard:
    """Patches socket.connect and connect_ex so that any address outside loopback raises
    ConnectionRefusedError before a packet is sent, and records the attempt."""

    def __init__(self):
        self.refused: list = []
        self._originals = None

    def install(self) -> None:
        connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
        self._originals = connect, connect_ex
        guard = self

        def guarded(original):
            def call(sock, address):
                if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(address):
                    guard.refused.append(address)
                    raise ConnectionRefusedError(
                        f"the test suite allows connections on loopback only, not to {address}")
                return original(sock, address)
            return call

        socket.socket.connect = guarded(connect)
        socket.socket.connect_ex = guarded(connect_ex)

    def uninstall(self) -> None:
        socket.socket.connect, socket.socket.connect_ex = self._originals


def environment_for_subprocesses() -> dict:
    """This environment with the venv's bin first on PATH (Beam's worker pool starts `python`)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env
