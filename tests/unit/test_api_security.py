"""The pure parts of API hardening: key matching, settings, payload string limits and
the declared-length gate."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from starlette.types import Message, Receive, Scope, Send

from api.auth import key_bytes, key_matches
from api.middleware import ContentLengthLimit
from api.settings import ApiSettings
from db.storable import MAX_STRING, UnstorablePayload, check_storable

# ------------------------------------------------------------------------- settings


def test_api_keys_are_comma_separated_and_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", " one , two,,three ")
    settings = ApiSettings()
    assert [k.get_secret_value() for k in settings.api_keys] == ["one", "two", "three"]
    assert key_bytes(settings) == (b"one", b"two", b"three")
    assert "one" not in repr(settings)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("API_KEYS", "METRICS_REQUIRE_AUTH", "MAX_BODY_BYTES", "MAX_PAYLOAD_STRING"):
        monkeypatch.delenv(name, raising=False)
    settings = ApiSettings(_env_file=None)
    assert settings.api_keys == []
    assert key_bytes(settings) == ()
    assert settings.metrics_require_auth is False
    assert settings.max_body_bytes == 1_048_576
    assert settings.max_payload_string == 65_536 == MAX_STRING


def test_connection_limits_have_bounded_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "API_MAX_HEADER_BYTES",
        "API_HEADER_TIMEOUT",
        "API_BODY_TIMEOUT",
        "API_KEEP_ALIVE_TIMEOUT",
        "API_CONCURRENCY_LIMIT",
    ):
        monkeypatch.delenv(name, raising=False)
    settings = ApiSettings(_env_file=None)
    assert settings.api_max_header_bytes == 16_384
    assert settings.api_header_timeout == 5.0
    assert settings.api_body_timeout == 30.0
    assert settings.api_keep_alive_timeout == 5.0
    assert settings.api_concurrency_limit == 512


def test_connection_timeouts_are_durations_and_never_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_HEADER_TIMEOUT", "500ms")
    monkeypatch.setenv("API_BODY_TIMEOUT", "1m")
    settings = ApiSettings(_env_file=None)
    assert (settings.api_header_timeout, settings.api_body_timeout) == (0.5, 60.0)
    for name in ("API_HEADER_TIMEOUT", "API_BODY_TIMEOUT", "API_KEEP_ALIVE_TIMEOUT"):
        monkeypatch.setenv(name, "0")
        with pytest.raises(ValidationError):
            ApiSettings(_env_file=None)
        monkeypatch.delenv(name)
    monkeypatch.setenv("API_MAX_HEADER_BYTES", "100")
    with pytest.raises(ValidationError):
        ApiSettings(_env_file=None)


def test_empty_api_keys_turn_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "")
    assert key_bytes(ApiSettings()) == ()


def test_keys_are_utf8_bytes() -> None:
    assert key_bytes(ApiSettings(api_keys=[SecretStr("kéy")])) == ("kéy".encode(),)


# ---------------------------------------------------------------------- key matching


@pytest.mark.parametrize(
    ("presented", "expected"),
    [
        (b"alpha", True),
        (b"beta", True),
        (b"gamma", False),
        (b"", False),
        (b"alph", False),
        (b"alphaa", False),
        (b"ALPHA", False),
        (b"alpha,beta", False),
    ],
)
def test_key_matches(presented: bytes, expected: bool) -> None:
    assert key_matches(presented, (b"alpha", b"beta")) is expected


def test_no_key_matches_an_empty_list() -> None:
    assert key_matches(b"", ()) is False
    assert key_matches(b"alpha", ()) is False


# ------------------------------------------------------------- payload string limits


@pytest.mark.parametrize(
    ("payload", "loc", "msg"),
    [
        ({"a": "xxxxx"}, ["a"], "string longer than 4 characters"),
        ({"a": ["ok", {"b": "xxxxx"}]}, ["a", 1, "b"], "string longer than 4 characters"),
        ("xxxxx", [], "string longer than 4 characters"),
        ({"a": {"kkkkk": 1}}, ["a"], "a key is longer than 4 characters"),
    ],
)
def test_strings_over_the_limit_are_unstorable(payload: Any, loc: list[Any], msg: str) -> None:
    with pytest.raises(UnstorablePayload) as caught:
        check_storable(payload, max_string=4)
    assert caught.value.loc == loc
    assert caught.value.msg == msg


def test_strings_at_the_limit_are_storable() -> None:
    check_storable({"kkkk": ["xxxx", {"yyyy": "zzzz"}]}, max_string=4)


def test_the_default_string_limit() -> None:
    check_storable({"a": "x" * MAX_STRING})
    with pytest.raises(UnstorablePayload):
        check_storable({"a": "x" * (MAX_STRING + 1)})


def test_the_limit_counts_characters_not_bytes() -> None:
    check_storable("é" * 4, max_string=4)


# ------------------------------------------------------------- declared-length gate


async def call_gate(headers: list[tuple[bytes, bytes]], limit: int) -> tuple[bool, list[Message]]:
    called = False

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal called
        called = True

    async def receive() -> Message:
        raise AssertionError("the gate must not read the body")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/v1/tasks",
        "raw_path": b"/api/v1/tasks",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("test", 80),
        "headers": headers,
    }
    await ContentLengthLimit(app, limit)(scope, receive, send)
    return called, sent


async def test_a_declared_length_over_the_limit_is_answered_without_the_app() -> None:
    called, sent = await call_gate([(b"content-length", b"11")], 10)
    assert not called
    start, body = sent
    assert start["status"] == 413
    assert (b"content-type", b"application/problem+json") in start["headers"]
    problem = json.loads(body["body"])
    assert problem["status"] == 413
    assert problem["instance"] == "/api/v1/tasks"


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"10")],
        [(b"content-length", b"0")],
        [],  # chunked: FastAPI's limit counts it
        [(b"content-length", b"not a number")],  # left to the server and FastAPI
    ],
)
async def test_other_requests_pass_the_gate(headers: list[tuple[bytes, bytes]]) -> None:
    called, sent = await call_gate(headers, 10)
    assert called
    assert sent == []
