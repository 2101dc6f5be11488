"""http(s):// inputs, as crawled manifests list them: fetched with requests, with timeouts,
bounded retries, a size cap, a per-host concurrency cap and guarded redirects (http(s) only, a
few, never from a public host to this machine's or a private network's addresses). Every
failure is a FetchError whose message gives the status or the cause."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import socket
import threading
import time
import urllib.parse

import requests
import urllib3

from anchorscan.anchors.io.uris import Location

MAX_REDIRECTS = 5
BACKOFF_SECONDS = 0.5  # before the first retry; doubles with each further one
CHUNK_BYTES = 1 << 16


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    timeout: float = 30.0  # seconds to connect, and between two reads of a response
    retries: int = 3  # on 5xx, timeouts, refused or reset connections and truncated bodies
    max_per_host: int = 4  # requests in flight to one host from one worker process
    max_time: float = 300.0  # one URI, all attempts and redirects together


class FetchError(OSError):
    """The URI could not be fetched; the message says why (status or cause); ``status_code``:
    the server's answer, where it gave one."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


class _Transient(Exception):
    """A failure worth another attempt."""


def host_addresses(host: str) -> set[str]:
    """The IP addresses ``host`` resolves to (none where it does not resolve: the request
    itself then says so). Tests replace it to give a loopback server a public address."""
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError, ValueError):
        return set()


def is_internal(url: str) -> bool:
    """Whether ``url``'s host is or resolves to a loopback, private, link-local or unspecified
    address: this machine, its network, a cloud's metadata server."""
    host = urllib.parse.urlsplit(url).hostname or ""
    for text in host_addresses(host):
        address = ipaddress.ip_address(text.split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address.is_loopback or address.is_private or address.is_link_local or address.is_unspecified:
            return True
    return False


_local = threading.local()
_slots: dict[str, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def _session() -> requests.Session:
    # A session per thread: connections are reused, and no session is shared between threads.
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
        _local.session.headers.update({"User-Agent": "anchorscan", "Accept-Encoding": "identity"})
    return _local.session


def _host_slot(url: str, max_per_host: int) -> threading.BoundedSemaphore:
    parts = urllib.parse.urlsplit(url)
    key = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
    with _slots_lock:
        if key not in _slots:
            _slots[key] = threading.BoundedSemaphore(max_per_host)
        return _slots[key]


def _remaining(deadline: float, config: HttpConfig) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(f"gave up after --http_max_time {config.max_time:g} s")
    return left


def _read_body(response: requests.Response, max_bytes: int, deadline: float, config: HttpConfig) -> bytes:
    header = response.headers.get("Content-Length")
    declared = int(header) if header and header.isdigit() else None
    if declared is not None and declared > max_bytes:
        raise FetchError(
            f"response is larger than --max_bytes {max_bytes:,} (Content-Length {declared:,}); not read"
        )
    body = bytearray()
    try:
        # read1 returns what one read brings, so a response that drips bytes still meets the
        # deadline check (iter_content would wait to fill each chunk).
        while chunk := response.raw.read1(CHUNK_BYTES):
            body += chunk
            if len(body) > max_bytes:
                raise FetchError(f"response is larger than --max_bytes {max_bytes:,}; stopped reading")
            _remaining(deadline, config)
    except FetchError:
        raise
    except urllib3.exceptions.ReadTimeoutError:
        raise _Transient("timed out while reading the response") from None
    except (urllib3.exceptions.HTTPError, OSError) as error:  # reset, or closed early
        truncated = error
    else:
        if declared is None or len(body) >= declared:
            return bytes(body)
    if declared is not None:
        raise _Transient(f"truncated response ({len(body):,} of {declared:,} bytes)")
    raise _Transient(f"truncated response ({len(body):,} bytes, then {_cause(truncated)})")


def _chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and the errors it wraps (reason, arguments, cause), outermost first."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        nested = [arg for arg in getattr(error, "args", ()) if isinstance(arg, BaseException)]
        reason = getattr(error, "reason", None)
        error = (
            reason
            if isinstance(reason, BaseException)
            else nested[0]
            if nested
            else error.__cause__ or error.__context__
        )
    return chain


def _cause(error: BaseException) -> str:
    """The root of a requests/urllib3 error, in a few words."""
    chain = _chain(error)
    for kind, words in (
        (ConnectionRefusedError, "connection refused"),
        (ConnectionResetError, "connection reset by the server"),
        (socket.gaierror, "host name not resolved"),
    ):
        if any(isinstance(e, kind) for e in chain):
            return words
    # urllib3's NewConnectionError derives from its ConnectTimeoutError without being a timeout.
    if any(
        isinstance(e, (TimeoutError, urllib3.exceptions.TimeoutError))
        and not isinstance(e, urllib3.exceptions.NewConnectionError)
        for e in chain
    ):
        return "timed out"
    return f"{type(chain[-1]).__name__}: {chain[-1]}"


@contextlib.contextmanager
def _ok_response(uri: str, deadline: float, config: HttpConfig):
    """The response of ``uri`` after redirects, once its status says a body follows; its
    host's slot is held until the block ends."""
    url, seen = uri, {uri}
    for _ in range(MAX_REDIRECTS + 1):
        slot = _host_slot(url, config.max_per_host)
        if not slot.acquire(timeout=_remaining(deadline, config)):
            raise FetchError(f"no free connection to the host within --http_max_time {config.max_time:g} s")
        try:
            timeout = min(config.timeout, _remaining(deadline, config))
            try:
                response = _session().get(url, stream=True, allow_redirects=False, timeout=(timeout, timeout))
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as error:
                raise _Transient(_cause(error)) from None  # refused, reset or timed out
            except requests.exceptions.RequestException as error:  # e.g. a malformed URL
                raise FetchError(_cause(error)) from None
            with response:
                if response.is_redirect:
                    target = urllib.parse.urljoin(url, response.headers["Location"])
                    if not Location.parse(target).is_http:
                        raise FetchError(
                            f"HTTP {response.status_code} redirect to {target}: only "
                            f"http(s) redirects are followed"
                        )
                    if target in seen:
                        raise FetchError(f"HTTP {response.status_code} redirect loop back to {target}")
                    # As a remote manifest may name no local file, a public server may send the
                    # scan to no address inside this machine or its network.
                    if is_internal(target) and not is_internal(uri):
                        raise FetchError(
                            f"HTTP {response.status_code} redirect from a public host to {target}, a "
                            "loopback, private or link-local address: not followed"
                        )
                    url = target
                    seen.add(url)
                    continue
                status = f"HTTP {response.status_code} {response.reason or ''}".rstrip()
                if response.status_code >= 500:
                    raise _Transient(status)
                if response.status_code >= 400:
                    raise FetchError(status, response.status_code)
                yield response
                return
        finally:
            slot.release()
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


def _fetch_once(uri: str, max_bytes: int, deadline: float, config: HttpConfig) -> bytes:
    with _ok_response(uri, deadline, config) as response:
        return _read_body(response, max_bytes, deadline, config)


def _retried(attempt_once, config: HttpConfig):
    """``attempt_once(deadline)``, retried on transient failures with exponential backoff,
    never past ``config.max_time``."""
    deadline, attempt = time.monotonic() + config.max_time, 0
    while True:
        try:
            return attempt_once(deadline)
        except _Transient as error:
            attempts = f" (after {attempt + 1} attempts)" if attempt else ""
            if attempt == config.retries:
                raise FetchError(f"{error}{attempts}") from None
            pause = BACKOFF_SECONDS * 2**attempt
            if time.monotonic() + pause >= deadline:
                raise FetchError(
                    f"{error}{attempts}; no time left for a retry within "
                    f"--http_max_time {config.max_time:g} s"
                ) from None
            time.sleep(pause)
            attempt += 1


def fetch(uri: str, max_bytes: int, config: HttpConfig = HttpConfig()) -> bytes:
    """The body of ``uri``: at most ``max_bytes``, retried on transient failures with
    exponential backoff, never past ``config.max_time``."""
    return _retried(lambda deadline: _fetch_once(uri, max_bytes, deadline, config), config)


class _Body:
    """A response body as a file object that is read as it arrives: each read waits at most
    ``config.timeout``; a stall, a reset or a body cut short is a FetchError."""

    def __init__(self, response: requests.Response):
        self.raw = response.raw

    def read(self, size: int = -1) -> bytes:
        try:
            return self.raw.read(None if size < 0 else size)
        except urllib3.exceptions.ReadTimeoutError:
            raise FetchError("timed out while reading the response") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise FetchError(f"the response was cut short ({_cause(error)})") from None


@contextlib.contextmanager
def open_stream(uri: str, config: HttpConfig = HttpConfig()):
    """The body of ``uri`` as a readable file object, for inputs too large to hold (a tar
    shard): the request is retried as ``fetch``'s until the body starts; the body itself is read
    once, each read within ``config.timeout``, with no size cap (the reader caps what it keeps)."""
    with contextlib.ExitStack() as stack:
        response = _retried(lambda deadline: stack.enter_context(_ok_response(uri, deadline, config)), config)
        yield _Body(response)
