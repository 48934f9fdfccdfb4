"""Where a webhook may be sent: the URL rules and the address check against SSRF.

A webhook URL is chosen by whoever holds an API key, and the relay that sends it sits
inside the network: without a check, a subscription to http://169.254.169.254/ or
http://10.0.0.5:5432/ would make Taskbox probe its own infrastructure and store the
answers where the subscriber can read them. So a destination's host is resolved and
every address it resolves to must be a global one; loopback, private, link-local
(cloud metadata), CGNAT, multicast, reserved and unspecified addresses are refused
unless ``WEBHOOK_ALLOWED_HOSTS`` names the host or a network holding the address.

The check runs when a subscription is made or changed (to answer a 422 at once) and
again before each delivery, since DNS answers change; the sender then connects to the
very address it checked, so a name that resolves differently a moment later (DNS
rebinding) cannot slip an internal address in between.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL = 2048
RESOLVE_TIMEOUT = 5.0
UNREACHABLE = (
    "an address webhooks may not reach (loopback, private, link-local, shared, multicast, "
    "reserved or otherwise not global)"
)

# Named for the message: the metadata services of the large clouds. Each is also in a
# refused range (link-local, unique-local, CGNAT); the name only makes the 422 clearer.
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# Deprecated anycast of 6to4 relays (RFC 7526): whoever answers there is not a receiver.
_SIX_TO_FOUR_RELAY = ipaddress.ip_network("192.88.99.0/24")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix (RFC 6052)


class InvalidWebhookUrl(ValueError):
    """The URL itself is not one Taskbox sends to (scheme, credentials, length)."""


class UnsafeDestination(ValueError):
    """The host resolves to an address deliveries may not reach, or does not resolve."""


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    scheme: str
    host: str  # lower case, without brackets
    port: int
    path: str  # path and query, as sent in the request line

    def url_for(self, address: IPAddress) -> str:
        """The URL with the host replaced by ``address``: what the sender connects to."""
        literal = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{literal}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        literal = f"[{self.host}]" if ":" in self.host else self.host
        return literal if self.port == default else f"{literal}:{self.port}"


def check_url(url: str) -> Target:
    """``url`` read as a webhook destination, or InvalidWebhookUrl saying what is wrong."""
    if len(url) > MAX_URL:
        raise InvalidWebhookUrl(f"a webhook URL is at most {MAX_URL} characters")
    if any(char.isspace() or not char.isprintable() for char in url):
        raise InvalidWebhookUrl("a webhook URL holds no whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidWebhookUrl(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidWebhookUrl("a webhook URL starts with http:// or https://")
    if not parts.hostname:
        raise InvalidWebhookUrl("a webhook URL names a host")
    if parts.username is not None or parts.password is not None:
        # They would be sent as Basic credentials and shown wherever the URL is shown.
        raise InvalidWebhookUrl("a webhook URL carries no user name or password")
    if parts.fragment:
        raise InvalidWebhookUrl("a webhook URL has no #fragment (it is never sent)")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    default = 443 if parts.scheme == "https" else 80
    return Target(url, parts.scheme, parts.hostname.lower(), port or default, path)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, list[ipaddress.IPv4Address]]:
    """The IPv4 addresses a transition address carries, and the name of its kind: a
    packet to it ends up at (or goes through) those, so they are what is judged."""
    if address.sixtofour is not None:
        return "6to4", [address.sixtofour]
    if address.teredo is not None:
        return "Teredo", list(address.teredo)  # its server and its client
    if address in _NAT64:
        return "NAT64", [ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)]
    return "", []


def refusal_reason(address: IPAddress) -> str | None:
    """Why deliveries may not go to ``address``; None for a global address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return refusal_reason(address.ipv4_mapped)  # ::ffff:127.0.0.1 is 127.0.0.1
        kind, wrapped = _embedded_ipv4(address)
        for ipv4 in wrapped:
            reason = refusal_reason(ipv4)
            if reason is not None:
                return f"{reason} inside a {kind} address"
        if kind == "NAT64":
            # 64:ff9b::/96 is reserved to Python, but a NAT64 gateway is how an
            # IPv6-only network reaches the IPv4 internet: the IPv4 inside decides.
            return None
    if address in _METADATA:
        return "a cloud metadata address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.version == 4 and address in _CGNAT:
        return "a carrier-grade NAT (shared) address"
    if address.version == 4 and address in _SIX_TO_FOUR_RELAY:
        return "a 6to4 relay (anycast) address"
    if address.version == 6 and address.is_site_local:
        return "a site-local address"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "not a global address"
    return None


class AllowList:
    """WEBHOOK_ALLOWED_HOSTS: host names (exact, any case) and networks (CIDR or one
    address) that deliveries may reach although the rules above refuse them."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.hosts: frozenset[str] = frozenset()
        networks: list[Network] = []
        hosts: set[str] = set()
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        self.hosts = frozenset(hosts)
        self.networks = tuple(networks)

    def allows_host(self, host: str) -> bool:
        return host.rstrip(".") in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def resolve_destination(target: Target, allow: AllowList) -> list[IPAddress]:
    """The addresses ``target`` may be delivered to, in resolver order; raises
    UnsafeDestination when the host does not resolve or any address is refused.

    Every address must pass, not just the first: a name may resolve to a public and
    an internal address, and the connection could take either.
    """
    literal = _literal(target.host)
    if literal is not None:
        addresses = [literal]
    else:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                infos = await loop.getaddrinfo(
                    target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
                )
        except (OSError, TimeoutError, UnicodeError):
            raise UnsafeDestination(f"host {target.host!r} does not resolve") from None
        addresses = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise UnsafeDestination(f"host {target.host!r} does not resolve")
    if allow.allows_host(target.host):
        return addresses
    for address in addresses:
        reason = refusal_reason(address)
        if reason is not None and not allow.allows_address(address):
            if literal is None:
                # Neither the address nor which kind it is: what an internal name
                # resolves to is a map of the network for whoever can subscribe.
                shown = f"{target.host!r} resolves to {UNREACHABLE}"
            else:
                shown = f"{address} is {reason}"
            raise UnsafeDestination(
                f"{shown}: webhooks are not sent there unless "
                "WEBHOOK_ALLOWED_HOSTS names the host or its network"
            )
    return addresses
