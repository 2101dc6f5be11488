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
import urllib.parse

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_for_port(
    port: int, process: subprocess.Popen | None = None, seconds: float = 30.0, host: str = LOOPBACK
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode} before listening")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {seconds:.0f} s")


@contextlib.contextmanager
def started(
    command: list[str],
    port: int,
    log_path,
    env: dict | None = None,
    host: str = LOOPBACK,
    seconds: float = 30.0,
):
    """A service process listening on ``host``:``port``, terminated (then killed) on exit; its
    output goes to ``log_path``."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_port(port, process, seconds, host)
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
    command = [
        sys.executable,
        "-m",
        "gcp_storage_emulator",
        "start",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--in-memory",
        "--default-bucket",
        bucket,
    ]
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
                        f"the test suite allows connections on loopback only, not to {address}"
                    )
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


class CrawlSite:
    """A web server on 127.0.0.1 with the failures a crawl meets, by path:

    /img/NAME        the bytes put in ``images[NAME]``
    /redirect/NAME   301 to /img/NAME
    /404             404 Not Found
    /flaky/NAME      500 on the first request for NAME, then /img/NAME
    /down            503 always
    /slow            answers after ``slow_seconds`` (headers and all)
    /stall           headers and 100 bytes, then nothing for ``slow_seconds``
    /drip            one byte every 0.1 s, without end
    /truncated       declares 10,000 bytes, sends 100 and closes
    /big             declares ``big_bytes`` and sends them
    /endless         no length, bytes until the client goes away (``disconnected`` then names it)
    /loop            302 to itself; /ping and /pong redirect to each other
    /hop/N           302 to /hop/N+1, without end
    /to-file         302 to file:///etc/passwd
    /away/URL        302 to URL (an absolute http URL: another host)
    /busy/NAME       /img/NAME after 0.3 s; ``max_in_flight`` records the most requests at once
    """

    def __init__(self, slow_seconds: float = 3.0, big_bytes: int = 5_000_000):
        import http.server
        import threading

        self.images: dict[str, bytes] = {}
        self.requests: dict[str, int] = {}
        self.disconnected: set[str] = set()
        self.in_flight = self.max_in_flight = 0
        self.slow_seconds, self.big_bytes = slow_seconds, big_bytes
        self._lock = threading.Lock()
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with site._lock:
                    site.requests[self.path] = site.requests.get(self.path, 0) + 1
                    count = site.requests[self.path]
                try:
                    site.respond(self, self.path, count)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
                    with site._lock:
                        site.disconnected.add(self.path)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _send(
        handler, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = None
    ) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        handler.wfile.write(body)

    def _redirect(self, handler, location: str, status: int = 302) -> None:
        self._send(handler, status, headers={"Location": location})

    def respond(self, handler, path: str, count: int) -> None:
        import time

        name = path.rsplit("/", 1)[-1]
        if path.startswith("/img/") and name in self.images:
            self._send(handler, 200, self.images[name], {"Content-Type": "image/png"})
        elif path.startswith("/redirect/"):
            self._redirect(handler, f"/img/{name}", 301)
        elif path.startswith("/flaky/"):
            if count == 1:
                self._send(handler, 500, b"try again")
            else:
                self._send(handler, 200, self.images[name])
        elif path == "/down":
            self._send(handler, 503, b"down")
        elif path == "/slow":
            time.sleep(self.slow_seconds)
            self._send(handler, 200, b"late")
        elif path == "/stall":
            self._send(handler, 200, b"x" * 100, length=10_000)
            handler.wfile.flush()
            time.sleep(self.slow_seconds)
        elif path == "/drip":
            handler.send_response(200)
            handler.end_headers()
            while True:
                handler.wfile.write(b"x")
                handler.wfile.flush()
                time.sleep(0.1)
        elif path == "/truncated":
            self._send(handler, 200, b"x" * 100, length=10_000)
        elif path == "/big":
            self._send(handler, 200, b"x" * self.big_bytes)
        elif path == "/endless":
            handler.send_response(200)
            handler.end_headers()
            while True:
                handler.wfile.write(b"x" * 65536)
        elif path == "/loop":
            self._redirect(handler, "/loop")
        elif path in ("/ping", "/pong"):
            self._redirect(handler, "/pong" if path == "/ping" else "/ping")
        elif path.startswith("/hop/"):
            self._redirect(handler, f"/hop/{int(name) + 1}")
        elif path == "/to-file":
            self._redirect(handler, "file:///etc/passwd")
        elif path.startswith("/away/"):
            self._redirect(handler, urllib.parse.unquote(path[len("/away/") :]))  # the client quotes [ ]
        elif path.startswith("/busy/"):
            with self._lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            time.sleep(0.3)
            with self._lock:
                self.in_flight -= 1
            self._send(handler, 200, self.images[name])
        else:
            self._send(handler, 404, b"<html>Not Found</html>", {"Content-Type": "text/html"})
