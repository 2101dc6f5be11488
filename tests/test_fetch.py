"""http(s):// inputs against a web server started here on 127.0.0.1 with the failures a crawl
meets: each outcome is an image's bytes or a read error that gives the status or the cause."""

from __future__ import annotations

import concurrent.futures
import io
import time

import pytest
from PIL import Image

from anchorscan.anchors.io import fetch as fetch_module
from anchorscan.anchors.io.fetch import FetchError, HttpConfig, fetch
from anchorscan.anchors.io.sources import ReadError, read_limited
from servers import CrawlSite

FAST = HttpConfig(timeout=0.5, retries=2, max_per_host=4, max_time=20.0)


def png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (seed * 40 % 256, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def site(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # a proxy in the environment is not ours
    monkeypatch.setattr(fetch_module, "BACKOFF_SECONDS", 0.05)
    with CrawlSite(slow_seconds=2.0, big_bytes=300_000) as crawl:
        crawl.images.update({"a.png": png(1), "b.png": png(2)})
        yield crawl


def test_an_image_and_a_followed_redirect(site):
    assert fetch(f"{site.url}/img/a.png", 10**6, FAST) == site.images["a.png"]
    assert fetch(f"{site.url}/redirect/b.png", 10**6, FAST) == site.images["b.png"]


def test_a_4xx_is_not_retried(site):
    with pytest.raises(FetchError, match=r"^HTTP 404 Not Found$"):
        fetch(f"{site.url}/404", 10**6, FAST)
    assert site.requests["/404"] == 1


def test_a_5xx_is_retried_with_backoff(site):
    assert fetch(f"{site.url}/flaky/a.png", 10**6, FAST) == site.images["a.png"]
    assert site.requests["/flaky/a.png"] == 2
    with pytest.raises(FetchError, match=r"^HTTP 503 Service Unavailable \(after 3 attempts\)$"):
        fetch(f"{site.url}/down", 10**6, FAST)
    assert site.requests["/down"] == 1 + FAST.retries


def test_slow_responses_time_out_and_are_retried(site):
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"^timed out \(after 3 attempts\)$"):
        fetch(f"{site.url}/slow", 10**6, FAST)
    assert site.requests["/slow"] == 3
    with pytest.raises(FetchError, match=r"^timed out while reading the response \(after 3 attempts\)$"):
        fetch(f"{site.url}/stall", 10**6, FAST)
    # Each attempt waits one timeout; between them 0.05 s, then 0.1 s of backoff. The 5 s of
    # margin absorbs a loaded machine's scheduling; an unbounded fetch would wait forever.
    assert time.monotonic() - started < 2 * (3 * FAST.timeout + 0.15) + 5.0


def test_a_response_that_never_ends_is_cut_at_max_time(site):
    config = HttpConfig(timeout=1.0, retries=3, max_time=1.5)
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"^gave up after --http_max_time 1.5 s$"):
        fetch(f"{site.url}/drip", 10**6, config)
    assert time.monotonic() - started < 1.5 + 5.0  # max_time, and margin for a loaded machine
    assert site.requests["/drip"] == 1  # running out of time is not retried


def test_truncated_bodies_are_retried_then_reported(site):
    with pytest.raises(FetchError, match=r"^truncated response \(.*\) \(after 3 attempts\)$"):
        fetch(f"{site.url}/truncated", 10**6, FAST)
    assert site.requests["/truncated"] == 3


def test_oversized_bodies_are_not_read_past_the_cap(site):
    with pytest.raises(
        FetchError, match=r"larger than --max_bytes 100,000 \(Content-Length 300,000\); not read"
    ):
        fetch(f"{site.url}/big", 100_000, FAST)
    with pytest.raises(FetchError, match=r"larger than --max_bytes 100,000; stopped reading"):
        fetch(f"{site.url}/endless", 100_000, FAST)
    # The client hung up at the cap; the server notices at its next write past its socket buffers.
    deadline = time.monotonic() + 5
    while "/endless" not in site.disconnected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "/endless" in site.disconnected


@pytest.mark.parametrize(
    "path, message",
    [
        ("/loop", r"^HTTP 302 redirect loop back to http://127\.0\.0\.1:\d+/loop$"),
        ("/ping", r"^HTTP 302 redirect loop back to http://127\.0\.0\.1:\d+/ping$"),
        ("/hop/0", r"^more than 5 redirects$"),
        ("/to-file", r"^HTTP 302 redirect to file:///etc/passwd: only http\(s\) redirects are followed$"),
    ],
)
def test_redirects_are_followed_only_to_http_and_a_few_times(site, path, message):
    with pytest.raises(FetchError, match=message):
        fetch(f"{site.url}{path}", 10**6, FAST)
    assert sum(site.requests.values()) <= 6


@pytest.fixture
def public_url(site, monkeypatch):
    """The site under the name localhost, which the redirect guard resolves to a public address
    (the requests still reach the loopback server): a public web server, as far as it knows."""
    resolve = fetch_module.host_addresses
    monkeypatch.setattr(
        fetch_module,
        "host_addresses",
        lambda host: {"93.184.216.34"} if host == "localhost" else resolve(host),
    )
    return site.url.replace("127.0.0.1", "localhost")


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/img/a.png",  # this machine, and a server that answers there
        "http://[::1]:{port}/img/a.png",
        "http://0.0.0.0:{port}/img/a.png",
        "http://10.1.2.3/admin",  # a private network
        "http://192.168.0.1/",
        "http://169.254.169.254/latest/meta-data/",  # link-local: a cloud's metadata server
        "http://[fe80::1]/",
        "http://[::ffff:127.0.0.1]:{port}/img/a.png",
    ],
)
def test_a_public_host_cannot_redirect_to_this_machine_or_its_network(site, public_url, target):
    target = target.format(port=site.url.rsplit(":", 1)[1])
    with pytest.raises(FetchError) as refused:
        fetch(f"{public_url}/away/{target}", 10**6, FAST)
    assert str(refused.value) == (
        f"HTTP 302 redirect from a public host to {target}, a loopback, private or link-local address: "
        "not followed"
    )
    with pytest.raises(ReadError, match="redirect from a public host"):
        read_limited(f"{public_url}/away/{target}", 10**6, FAST)
    assert site.requests.get("/img/a.png") is None  # never fetched
    # a public host's redirects to itself are followed, as a loopback host's to itself
    assert fetch(f"{public_url}/redirect/b.png", 10**6, FAST) == site.images["b.png"]
    assert fetch(f"{site.url}/away/{site.url}/img/b.png", 10**6, FAST) == site.images["b.png"]


def test_requests_to_one_host_are_capped(site):
    site.images.update({f"{i}.png": png(i) for i in range(8)})
    config = HttpConfig(timeout=5.0, retries=0, max_per_host=2, max_time=30.0)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda i: fetch(f"{site.url}/busy/{i}.png", 10**6, config), range(8)))
    assert bodies == [site.images[f"{i}.png"] for i in range(8)]
    assert site.max_in_flight == 2


def test_nothing_listening_is_a_cause_not_a_crash(site):
    from servers import free_port

    with pytest.raises(FetchError, match=r"^connection refused \(after 3 attempts\)$"):
        fetch(f"http://127.0.0.1:{free_port()}/a.png", 10**6, FAST)


def test_the_read_step_turns_fetch_failures_into_read_errors(site):
    assert read_limited(f"{site.url}/img/a.png", 10**6, FAST) == site.images["a.png"]
    with pytest.raises(ReadError, match=r"^HTTP 404 Not Found$"):
        read_limited(f"{site.url}/404", 10**6, FAST)
