"""AMQP_URL as a list of a cluster's nodes, parsed and checked.

``AMQP_URL`` names one broker, or several whole URLs separated by commas (one per node of
a RabbitMQ cluster): ``amqp://u:p@rabbit1:5672/,amqp://u:p@rabbit2:5672/``. Only a comma
followed by a scheme (``amqp://``) separates two URLs, so a single URL parses as it
always did, a comma in its password included. Messages never repeat a URL but its
scheme: it may hold a password.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_AMQP_SCHEMES = ("amqp", "amqps")

# A comma that starts another URL (whitespace around it allowed: a list may be wrapped).
# Any scheme, so that a wrong one in a list is named as such rather than read as part
# of the URL before it.
_SEPARATOR = re.compile(r"\s*,\s*(?=[a-z][a-z0-9+.-]*://)", re.IGNORECASE)


def check_amqp_url(url: str, where: str = "AMQP_URL") -> str:
    """``url`` if aio-pika can connect with it; else a ValueError that names what is
    wrong without repeating any part of the URL but its scheme (it may hold a password)."""
    scheme = url.split("://", 1)[0] if "://" in url else "no scheme"
    if scheme.lower() not in _AMQP_SCHEMES:
        raise ValueError(f"{where} must start with amqp:// or amqps://; got {scheme!r}")
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None  # an unclosed [IPv6 host]: said below
    if parts is not None and "," in parts.netloc.rpartition("@")[2]:
        # amqp://h1:5672,h2:5672/ (the form some clients take) would reach no host.
        raise ValueError(
            f"{where} lists several hosts in one URL; give each node a whole URL, "
            "separated by commas: amqp://user:pass@rabbit1:5672/,amqp://user:pass@rabbit2:5672/"
        )
    try:
        urlsplit(url).port  # noqa: B018 - parsed on access: raises for a port that is not one
    except ValueError:
        # urlsplit's own message quotes the port, which may be a piece of a password
        # with an unescaped / or @ in it.
        raise ValueError(
            f"{where} is not a valid URL: a port that is not a number up to 65535, an "
            "unclosed [IPv6 host], or a / ? # in the password (percent-encode them)"
        ) from None
    return url


def parse_amqp_urls(value: str) -> tuple[str, ...]:
    """The URLs of ``AMQP_URL``, in the order given; ValueError for a bad list."""
    value = value.strip()
    if value.endswith(",") or value.startswith(","):
        raise ValueError("AMQP_URL starts or ends with a comma: an empty entry in the list")
    entries = _SEPARATOR.split(value)
    if len(entries) == 1:
        return (check_amqp_url(entries[0]),)
    urls = []
    for number, entry in enumerate(entries, start=1):
        if entry.endswith(","):
            raise ValueError("AMQP_URL has two commas in a row: an empty entry in the list")
        urls.append(check_amqp_url(entry, f"AMQP_URL (URL {number} of {len(entries)})"))
    if len(set(urls)) < len(urls):
        raise ValueError("AMQP_URL names the same URL twice: each node once")
    return tuple(urls)


def where(url: str) -> str:
    """host:port/vhost of a URL, without user or password (for logs and screens)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.hostname}{port}{parts.path if parts.path not in ('', '/') else ''}"
