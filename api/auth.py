"""API keys: ``Authorization: Bearer <key>`` on every /api/v1 route.

The keys are read once, at startup, into ``app.state.api_keys`` as bytes; an empty
tuple turns authentication off. The dependency is ``async def`` (FastAPI runs a plain
``def`` dependency in a worker thread) and compares the presented key with every
configured one in constant time, so neither the match nor its position leaks through
timing.

``api.middleware.ApiKeyGate`` applies the rule to every ``/api/`` request before
FastAPI reads its body; the task routes have no dependency of their own for it (a
security dependency cost the create route ~20% of its CPU, bench/BASELINE.md), and
``api.app`` declares the scheme on their operations in the OpenAPI document. The
dependency serves ``/metrics``, which the gate does not cover.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Sequence
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.exceptions import HTTPException

from taskbox.api.settings import ApiSettings

BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from the `API_KEYS` setting, as `Authorization: Bearer <key>`.",
)
CHALLENGE = {"WWW-Authenticate": "Bearer"}

Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]


# ``name:key`` names a key; the name is what the audit trail records as who acted (a
# pause, a resume), never the key. A key without a name is ``key-N``, N its position.
_KEY_NAME = re.compile(r"([A-Za-z0-9_.-]{1,64}):(.+)", re.DOTALL)


def named_keys(settings: ApiSettings) -> tuple[tuple[str, bytes], ...]:
    """(name, the bytes a header carries) of each configured key, in order."""
    found = []
    for number, entry in enumerate(settings.api_keys, 1):
        text = entry.get_secret_value()
        named = _KEY_NAME.fullmatch(text)
        name, key = (named.group(1), named.group(2)) if named else (f"key-{number}", text)
        found.append((name, key.encode()))
    return tuple(found)


def key_bytes(settings: ApiSettings) -> tuple[bytes, ...]:
    """The configured keys as the bytes a header carries."""
    return tuple(key for _, key in named_keys(settings))


def caller_name(authorization: str | None, keys: Sequence[tuple[str, bytes]]) -> str:
    """The name of the key a request presents (every key compared, in constant time);
    ``anonymous`` when authentication is off. Only for a request the gate let through."""
    if not keys:
        return "anonymous"
    token = bearer_token(authorization)
    presented = token.encode("latin-1") if token is not None else b""
    name = "unknown"
    for key_name, key in keys:
        if hmac.compare_digest(presented, key):
            name = key_name
    return name


def key_matches(presented: bytes, keys: Sequence[bytes]) -> bool:
    """Whether ``presented`` is one of ``keys``, compared with every key in constant time."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found


def bearer_token(authorization: str | None) -> str | None:
    """The key in an ``Authorization`` header, read exactly as ``BEARER`` reads it."""
    scheme, credentials = get_authorization_scheme_param(authorization)
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials


def refusal(token: str | None, keys: Sequence[bytes]) -> str | None:
    """Why a request presenting ``token`` is refused, or None when it may pass."""
    if not keys:
        return None
    if token is None:
        return "an API key is required: Authorization: Bearer <key>"
    # Header values arrive decoded as latin-1; encoding back gives the bytes sent.
    if not key_matches(token.encode("latin-1"), keys):
        return "the API key is not valid"
    return None


def _check(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    detail = refusal(credentials.credentials if credentials else None, request.app.state.api_keys)
    if detail is not None:
        raise HTTPException(401, detail, CHALLENGE)


async def require_metrics_key(request: Request, credentials: Credentials) -> None:
    """Dependency of /metrics: a valid key only when METRICS_REQUIRE_AUTH is set."""
    if request.app.state.metrics_require_auth:
        _check(request, credentials)


def loopback_only(host: str) -> bool:
    """Whether listening on ``host`` (API_HOST) reaches this machine alone.

    A loopback address (127.0.0.0/8, ::1) or ``localhost``; anything else, the wildcard
    addresses 0.0.0.0 and ``::``, an interface's address and host names, may be reached
    from the network.
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_refusal(settings: ApiSettings) -> str | None:
    """Why the api must not start with these settings, or None.

    Without API keys, anyone who reaches the port can create, read and cancel tasks.
    On loopback that is this machine's users; beyond it, the network, which only an
    explicit ALLOW_UNAUTHENTICATED=true accepts (authentication done in front of the
    api, say).
    """
    if settings.api_keys or settings.allow_unauthenticated or loopback_only(settings.api_host):
        return None
    return (
        f"API_KEYS is empty and API_HOST={settings.api_host} listens beyond loopback: anyone "
        "who can reach the port could create, read and cancel tasks. Set API_KEYS "
        "(comma-separated keys, sent as Authorization: Bearer <key>), or listen on "
        "API_HOST=127.0.0.1, or set ALLOW_UNAUTHENTICATED=true if something in front of "
        "the api authenticates its clients"
    )
