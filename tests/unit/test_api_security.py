"""The pure parts of API hardening: key matching, settings, payload string limits and
the declared-length gate."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from starlette.types import Message, Receive, Scope, Send

from taskbox.api import middleware
from taskbox.api.auth import exposure_refusal, key_bytes, key_matches, loopback_only
from taskbox.api.middleware import (
    DISCARD_LIMIT,
    ContentLengthLimit,
    JsonBodiesOnly,
    json_media_type_refusal,
)
from taskbox.api.settings import ApiSettings
from taskbox.db.storable import MAX_STRING, UnstorablePayload, check_storable

# ------------------------------------------------------------------------- settings


def test_api_keys_are_comma_separated_and_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", " k-one , k-two,,k-three ")
    settings = ApiSettings()
    assert [k.get_secret_value() for k in settings.api_keys] == ["k-one", "k-two", "k-three"]
    assert key_bytes(settings) == (b"k-one", b"k-two", b"k-three")
    # (a key "one" would be found in any None the settings show)
    assert "k-one" not in repr(settings)


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


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("192.168.0.10", False),
        ("fe80::1", False),
        ("api.example.com", False),
        ("", False),
    ],
)
def test_loopback_only(host: str, loopback: bool) -> None:
    assert loopback_only(host) is loopback


def test_without_keys_only_loopback_or_an_explicit_allowance_may_start() -> None:
    def refusal(**settings: Any) -> str | None:
        return exposure_refusal(ApiSettings.model_validate(settings))

    assert refusal(api_host="127.0.0.1", api_keys="") is None
    assert refusal(api_host="0.0.0.0", api_keys="k") is None
    assert refusal(api_host="0.0.0.0", api_keys="", allow_unauthenticated=True) is None
    message = refusal(api_host="0.0.0.0", api_keys="")
    assert message is not None
    assert message.startswith("API_KEYS is empty and API_HOST=0.0.0.0 listens beyond loopback")
    for remedy in ("Set API_KEYS", "API_HOST=127.0.0.1", "ALLOW_UNAUTHENTICATED=true"):
        assert remedy in message
    assert refusal(api_host="10.0.0.5", api_keys="") is not None


def test_allow_unauthenticated_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALLOW_UNAUTHENTICATED", raising=False)
    assert ApiSettings(_env_file=None).allow_unauthenticated is False


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


async def call_gate(
    headers: list[tuple[bytes, bytes]], limit: int | None, method: str = "POST"
) -> tuple[bool, list[Message]]:
    """Run a request with ``headers`` through the declared-length gate (``limit``) or,
    with ``limit`` None, the JSON media type gate; whether the app ran, what was sent."""
    called = False

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal called
        called = True

    async def receive() -> Message:
        # A refusing gate reads (and drops) the body before it answers: see answer_unread.
        return {"type": "http.request", "body": b"x" * 11, "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "method": method,
        "path": "/api/v1/tasks",
        "raw_path": b"/api/v1/tasks",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("test", 80),
        "headers": headers,
    }
    gate = JsonBodiesOnly(app) if limit is None else ContentLengthLimit(app, limit)
    await gate(scope, receive, send)
    return called, sent


async def test_a_body_past_the_discard_limit_is_left_unread() -> None:
    """Past DISCARD_LIMIT the answer goes out without reading: the server then closes."""
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the app must not run")

    async def receive() -> Message:
        raise AssertionError("a body past the discard limit must not be read")

    async def send(message: Message) -> None:
        sent.append(message)

    length = str(DISCARD_LIMIT + 1).encode()
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/v1/tasks",
        "raw_path": b"/api/v1/tasks",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("test", 80),
        "headers": [(b"content-length", length)],
    }
    await ContentLengthLimit(app, 10)(scope, receive, send)
    assert sent[0]["status"] == 413


async def test_a_trickled_body_is_answered_after_the_discard_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that stops sending mid-body gets its answer after DISCARD_SECONDS, not
    at API_BODY_TIMEOUT: a refusal is not a way to hold a connection."""
    monkeypatch.setattr(middleware, "DISCARD_SECONDS", 0.05)
    sent: list[Message] = []
    stalled = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the app must not run")

    async def receive() -> Message:
        await stalled.wait()  # never set: the rest of the body never comes
        raise AssertionError("unreachable")

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
        "headers": [(b"content-length", b"1000")],
    }
    async with asyncio.timeout(5):
        await ContentLengthLimit(app, 10)(scope, receive, send)
    assert sent[0]["status"] == 413


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


# ------------------------------------------------------------------ JSON media type


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/json",
        b"application/json; charset=utf-8",
        b"APPLICATION/JSON",
        b" application/json ;charset=UTF-8",
        b"application/problem+json",
        b"application/vnd.example.task+json; version=2",
    ],
)
def test_json_media_types_pass(content_type: bytes) -> None:
    assert json_media_type_refusal(content_type) is None


@pytest.mark.parametrize(
    ("content_type", "named"),
    [
        (None, "no Content-Type"),
        (b"", "no Content-Type"),
        (b"  ", "no Content-Type"),
        (b"application/x-www-form-urlencoded", "'application/x-www-form-urlencoded'"),
        (b"multipart/form-data; boundary=b", "'multipart/form-data'"),
        (b"text/plain;charset=utf-8", "'text/plain'"),
        (b"text/json", "'text/json'"),
        (b"application/json-seq", "'application/json-seq'"),
        (b"application/jsonp", "'application/jsonp'"),
        (b"json", "'json'"),
        (b"application/+jsonx", "'application/+jsonx'"),
    ],
)
def test_other_media_types_are_refused_by_name(content_type: bytes | None, named: str) -> None:
    refusal = json_media_type_refusal(content_type)
    assert refusal is not None
    assert named in refusal
    assert "application/json" in refusal
    assert "--json" in refusal  # what to do with curl, whose -d sends a form type


def test_a_long_media_type_is_cut_in_the_refusal() -> None:
    refusal = json_media_type_refusal(b"text/" + b"x" * 5000)
    assert refusal is not None
    assert len(refusal) < 300


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"2"), (b"content-type", b"text/plain")],
        [(b"content-length", b"2")],
        [(b"transfer-encoding", b"chunked")],
        [
            (b"transfer-encoding", b"chunked"),
            (b"content-type", b"application/x-www-form-urlencoded"),
        ],
        [(b"content-length", b"junk"), (b"content-type", b"text/plain")],
    ],
)
async def test_a_body_not_declared_json_is_a_415_without_the_app(
    headers: list[tuple[bytes, bytes]],
) -> None:
    called, sent = await call_gate(headers, None)
    assert not called
    start, body = sent
    assert start["status"] == 415
    assert (b"content-type", b"application/problem+json") in start["headers"]
    assert json.loads(body["body"])["status"] == 415


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("POST", [(b"content-length", b"2"), (b"content-type", b"application/json")]),
        ("POST", []),  # no body: nothing to type (FastAPI answers 422 for the missing body)
        ("POST", [(b"content-length", b"0")]),
        ("POST", [(b"content-length", b"0"), (b"content-type", b"text/plain")]),
        ("GET", [(b"content-length", b"2"), (b"content-type", b"text/plain")]),
        ("DELETE", [(b"content-length", b"2")]),
    ],
)
async def test_json_bodies_and_requests_without_one_pass(
    method: str, headers: list[tuple[bytes, bytes]]
) -> None:
    called, sent = await call_gate(headers, None, method)
    assert called
    assert sent == []
