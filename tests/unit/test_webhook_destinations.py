"""The webhook destination rules (SSRF) and Standard Webhooks signing, without services."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

import pytest
import standardwebhooks

from taskbox.webhooks import (
    AllowList,
    InvalidWebhookUrl,
    UnsafeDestination,
    check_url,
    new_secret,
    refusal_reason,
    resolve_destination,
    secret_key,
    sign,
)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.255.0.9", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("100.100.100.200", "a cloud metadata address"),
        ("169.254.1.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("0.0.0.0", "the unspecified address"),
        ("::", "the unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("100.64.0.1", "a carrier-grade NAT (shared) address"),
        ("10.0.0.1", "a private address"),
        ("172.16.5.4", "a private address"),
        ("192.168.1.1", "a private address"),
        ("fc00::1", "a private address"),
        ("::ffff:10.0.0.1", "a private address"),
        ("240.0.0.1", "a private address"),  # reserved, which Python counts as private
        ("198.18.0.1", "a private address"),  # benchmarking
        ("192.0.2.1", "a private address"),  # documentation
        ("fec0::1", "a site-local address"),
        ("192.88.99.1", "a 6to4 relay (anycast) address"),
        # transition addresses: judged by the IPv4 they carry
        ("2002:a00:1::", "a private address inside a 6to4 address"),  # 10.0.0.1
        ("2002:7f00:1::1", "a loopback address inside a 6to4 address"),  # 127.0.0.1
        ("2002:a9fe:a9fe::", "a cloud metadata address inside a 6to4 address"),
        # Teredo: server 65.54.227.120 and client 10.0.0.1 (stored inverted: f5ff:fffe)
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "a private address inside a Teredo address"),
        # Teredo: server 127.0.0.1, client 8.8.8.8
        ("2001:0:7f00:1:8000:63bf:f7f7:f7f7", "a loopback address inside a Teredo address"),
        ("64:ff9b::a00:1", "a private address inside a NAT64 address"),  # 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "a cloud metadata address inside a NAT64 address"),
        ("64:ff9b::7f00:1", "a loopback address inside a NAT64 address"),
    ],
)
def test_internal_addresses_are_refused_with_their_reason(address: str, reason: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address",
    [
        "93.184.215.14",
        "1.1.1.1",
        "2606:4700:4700::1111",
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8: how an IPv6-only network reaches it
    ],
)
def test_global_addresses_pass(address: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) is None


def test_the_allow_list_names_hosts_and_networks() -> None:
    allow = AllowList(["Receiver.internal", "10.1.0.0/16", "127.0.0.1"])
    assert allow.allows_host("receiver.internal") and allow.allows_host("receiver.internal.")
    assert not allow.allows_host("other.internal")
    assert allow.allows_address(ipaddress.ip_address("10.1.200.3"))
    assert allow.allows_address(ipaddress.ip_address("127.0.0.1"))
    assert not allow.allows_address(ipaddress.ip_address("10.2.0.1"))


async def test_literal_addresses_are_checked_without_dns() -> None:
    # a literal may be named: the subscriber wrote it
    with pytest.raises(UnsafeDestination, match=r"10\.0\.0\.1 is a private address"):
        await resolve_destination(check_url("http://10.0.0.1/"), AllowList())
    allowed = await resolve_destination(check_url("http://10.0.0.1/"), AllowList(["10.0.0.0/8"]))
    assert allowed == [ipaddress.ip_address("10.0.0.1")]
    assert await resolve_destination(check_url("https://[2606:4700::1]/"), AllowList()) == [
        ipaddress.ip_address("2606:4700::1")
    ]


async def test_a_name_resolving_inside_is_refused_without_saying_to_what() -> None:
    with pytest.raises(UnsafeDestination) as refused:
        await resolve_destination(check_url("http://localhost:9/"), AllowList())
    message = str(refused.value)
    assert "'localhost' resolves to an address webhooks may not reach" in message
    for revealing in ("127.0.0.1", "::1", "a loopback address"):
        assert revealing not in message


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/", "http:// or https://"),
        ("http:///path", "names a host"),
        ("http://user:pw@example.com/", "no user name or password"),
        ("http://example.com/#top", "no #fragment"),
        ("http://example.com:99999/", "not a URL"),
        ("http://exa mple.com/", "whitespace"),
        ("http://example.com/\x00", "control characters"),
        ("https://example.com/" + "a" * 2100, "at most 2048"),
    ],
)
def test_urls_that_are_never_sent(url: str, message: str) -> None:
    with pytest.raises(InvalidWebhookUrl, match=message):
        check_url(url)


def test_a_target_keeps_host_port_and_query_for_the_request() -> None:
    target = check_url("https://Hooks.Example.com:8443/in?x=1")
    assert (target.host, target.port, target.path) == ("hooks.example.com", 8443, "/in?x=1")
    assert target.host_header == "hooks.example.com:8443"
    assert (
        target.url_for(ipaddress.ip_address("2606:4700::1")) == "https://[2606:4700::1]:8443/in?x=1"
    )
    assert check_url("http://example.com").host_header == "example.com"


def test_signatures_verify_with_the_standard_webhooks_library() -> None:
    old, new = new_secret(), new_secret()
    body = b'{"type":"task.done"}'
    header = sign([new, old], "d1", 1_700_000_000, body)
    headers = {
        "webhook-id": "d1",
        "webhook-timestamp": "1700000000",
        "webhook-signature": header,
    }
    for secret in (old, new):
        # the library checks the timestamp against the clock; the signature is what we test
        hook = standardwebhooks.Webhook(secret)
        expected = hook.sign("d1", datetime.fromtimestamp(1_700_000_000, tz=UTC), body.decode())
        assert expected in header.split(" ")
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_secret()).verify(body, headers)


def test_secrets_are_whsec_base64_of_enough_key() -> None:
    assert len(secret_key(new_secret())) == 32
    for bad in ("abc", "whsec_!!!", "whsec_" + "QUJD"):
        with pytest.raises(ValueError, match="webhook secret"):
            secret_key(bad)
