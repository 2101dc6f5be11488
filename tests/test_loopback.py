"""The suite's guard (conftest): nothing connects outside loopback, and a test in which
anything tries fails, even where the product turns the refusal into an error row."""

from __future__ import annotations

import socket

import pytest

from servers import LOOPBACK


def test_addresses_outside_loopback_are_refused_before_any_packet(loopback_guard):
    outside = [
        ("169.254.169.254", 80),  # the cloud metadata server
        ("10.1.2.3", 443),
        ("storage.googleapis.com", 443),
    ]
    for address in outside:
        with socket.socket() as sock, pytest.raises(ConnectionRefusedError, match="loopback only"):
            sock.connect(address)
    with socket.socket(socket.AF_INET6) as sock, pytest.raises(ConnectionRefusedError):
        sock.connect_ex(("2001:db8::1", 80, 0, 0))
    assert [address[0] for address in loopback_guard.refused] == [
        "169.254.169.254",
        "10.1.2.3",
        "storage.googleapis.com",
        "2001:db8::1",
    ]
    loopback_guard.refused.clear()  # refused on purpose here; the per-test check must pass


def test_loopback_connections_pass():
    with socket.socket() as server:
        server.bind((LOOPBACK, 0))
        server.listen(1)
        for host in (LOOPBACK, "localhost"):
            with socket.create_connection((host, server.getsockname()[1]), timeout=5):
                pass
