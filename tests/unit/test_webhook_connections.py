"""The delivery worker's connection reuse: the sender connects to an address and names
the host only as the TLS server name, so a kept-alive https connection could carry a
delivery to another host at that address over a session verified for the first."""

from __future__ import annotations

from taskbox.relay.webhooks import delivery_limits


def test_https_connections_are_never_kept_for_another_delivery() -> None:
    limits = delivery_limits(16, "https")
    assert limits.max_keepalive_connections == 0
    assert limits.max_connections == 16


def test_plain_http_connections_are_kept() -> None:
    limits = delivery_limits(16, "http")
    assert limits.max_keepalive_connections == 16
    assert limits.max_connections == 16
