"""Settings parsing, pagination cursors and the backoff: the small rules every process uses."""

from __future__ import annotations

import base64
import random
import uuid
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from taskbox.api import pagination
from taskbox.api.settings import ApiSettings
from taskbox.broker.settings import BrokerSettings
from taskbox.broker.topology import queue_arguments
from taskbox.consumer.settings import ConsumerSettings
from taskbox.db.settings import DatabaseSettings, plain_dsn
from taskbox.relay.settings import RelaySettings
from taskbox.runtime.backoff import backoff_delay
from taskbox.runtime.settings import ProcessSettings, TaskTypeSettings, describe_invalid, mask_url

# Variables a developer's shell or CI might export; each test starts without them.
SETTINGS_ENV = (
    "DATABASE_URL",
    "TASK_MODULES",
    "HEARTBEAT_INTERVAL",
    "TASK_STALE_AFTER",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "FORWARDED_ALLOW_IPS",
    "API_KEYS",
    "AMQP_URL",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)


# -- DATABASE_URL -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@db:5432/taskbox", "postgresql://u:p@db:5432/taskbox"),
        ("postgres://u:p@db:5432/taskbox", "postgresql://u:p@db:5432/taskbox"),
        (
            "postgresql+asyncpg://u:p@db/taskbox?ssl=require",
            "postgresql://u:p@db/taskbox?ssl=require",
        ),
    ],
    ids=["postgresql", "postgres", "postgresql+asyncpg"],
)
def test_database_url_is_normalised_to_plain_postgresql(given: str, expected: str) -> None:
    assert plain_dsn(given) == expected
    settings = DatabaseSettings(database_url=given, _env_file=None)
    assert settings.database_url == expected
    assert settings.sqlalchemy_url == "postgresql+asyncpg://" + expected[len("postgresql://") :]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (
            "postgresql://u@h1:5001,h2:5002/taskbox?target_session_attrs=read-write",
            "postgresql+asyncpg://u@/taskbox?host=h1:5001&host=h2:5002"
            "&target_session_attrs=read-write",
        ),
        # a host without its port gets libpq's default: SQLAlchemy wants one on each
        (
            "postgresql://u:p%40ss@h1,h2:5433/taskbox",
            "postgresql+asyncpg://u:p%40ss@/taskbox?host=h1:5432&host=h2:5433",
        ),
    ],
    ids=["read-write", "default-port"],
)
def test_a_list_of_hosts_reaches_sqlalchemy_as_host_parameters(given: str, expected: str) -> None:
    """Alembic goes through SQLAlchemy, which reads one host from the authority."""
    settings = DatabaseSettings(database_url=given, _env_file=None)
    assert settings.database_url == given  # asyncpg reads the list as it is
    assert settings.sqlalchemy_url == expected
    connect_args = make_url(expected).get_dialect()().create_connect_args(make_url(expected))[1]
    assert connect_args["host"] == ["h1", "h2"]


def test_database_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://app@10.0.0.5/tasks")
    assert DatabaseSettings(_env_file=None).database_url == "postgresql://app@10.0.0.5/tasks"


def test_database_url_default_works_against_a_local_postgres() -> None:
    settings = DatabaseSettings(_env_file=None)
    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/taskbox"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mysql://u:secret@db/taskbox", "mysql"),
        ("sqlite:///tmp/x.db", "sqlite"),
        ("postgresql+psycopg://u@db/t", "postgresql+psycopg"),
        ("db:5432", "no scheme"),
    ],
)
def test_a_foreign_database_url_is_rejected_with_a_clear_message(url: str, shown: str) -> None:
    message = (
        "DATABASE_URL must start with one of postgresql://, postgres://, "
        f"postgresql+asyncpg://; got {shown!r}"
    )
    with pytest.raises(ValueError, match=r"^DATABASE_URL must start") as direct:
        plain_dsn(url)
    assert str(direct.value) == message

    with pytest.raises(ValidationError) as caught:
        DatabaseSettings(database_url=url, _env_file=None)
    [error] = caught.value.errors()
    assert error["loc"] == ("database_url",)
    assert error["msg"] == f"Value error, {message}"
    assert "secret" not in str(direct.value)


def test_a_foreign_database_url_in_the_environment_is_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://root@localhost/tasks")
    with pytest.raises(ValidationError, match="DATABASE_URL must start with one of"):
        DatabaseSettings(_env_file=None)


# -- TASK_MODULES -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("myapp.tasks", ["myapp.tasks"]),
        ("myapp.tasks,billing.jobs", ["myapp.tasks", "billing.jobs"]),
        ("  myapp.tasks , billing.jobs ,, ", ["myapp.tasks", "billing.jobs"]),
        ("", []),
        (" , ", []),
    ],
    ids=["one", "two", "spaces-and-empties", "empty", "only-separators"],
)
def test_task_modules_is_comma_separated(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]
) -> None:
    monkeypatch.setenv("TASK_MODULES", raw)
    assert TaskTypeSettings(_env_file=None).task_modules == expected


def test_task_modules_defaults_to_empty() -> None:
    assert TaskTypeSettings(_env_file=None).task_modules == []


def test_task_modules_given_as_a_list_is_kept() -> None:
    settings = TaskTypeSettings(task_modules=["a.b", "c"], _env_file=None)
    assert settings.task_modules == ["a.b", "c"]


def test_consumer_reads_task_modules_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASK_MODULES", "x.y,z")
    assert ConsumerSettings(_env_file=None).task_modules == ["x.y", "z"]


# -- consumer: heartbeat against staleness ----------------------------------------------


def test_consumer_defaults_are_coherent() -> None:
    settings = ConsumerSettings(_env_file=None)
    assert (settings.heartbeat_interval, settings.task_stale_after) == (5.0, 30.0)


@pytest.mark.parametrize(
    ("heartbeat", "stale_after"),
    [("5", "10"), ("5", "9.99"), ("5", "1"), ("0.5", "1")],
    ids=["exactly-twice", "just-under", "far-under", "sub-second"],
)
def test_consumer_rejects_stale_after_not_above_twice_the_heartbeat(
    monkeypatch: pytest.MonkeyPatch, heartbeat: str, stale_after: str
) -> None:
    monkeypatch.setenv("HEARTBEAT_INTERVAL", heartbeat)
    monkeypatch.setenv("TASK_STALE_AFTER", stale_after)
    with pytest.raises(ValidationError) as caught:
        ConsumerSettings(_env_file=None)
    [error] = caught.value.errors()
    assert error["msg"] == (
        "Value error, TASK_STALE_AFTER must exceed twice HEARTBEAT_INTERVAL, "
        "or live tasks get rescued"
    )


@pytest.mark.parametrize(("heartbeat", "stale_after"), [("5", "10.01"), ("1", "30")])
def test_consumer_accepts_stale_after_above_twice_the_heartbeat(
    monkeypatch: pytest.MonkeyPatch, heartbeat: str, stale_after: str
) -> None:
    monkeypatch.setenv("HEARTBEAT_INTERVAL", heartbeat)
    monkeypatch.setenv("TASK_STALE_AFTER", stale_after)
    settings = ConsumerSettings(_env_file=None)
    assert settings.heartbeat_interval == float(heartbeat)
    assert settings.task_stale_after == float(stale_after)


# -- pagination cursors -----------------------------------------------------------------


def _cursor_of(document: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(document)).decode().rstrip("=")


TASK_ID = uuid.UUID("9f1c2b3a-4d5e-4f60-8a7b-1c2d3e4f5a6b")


@pytest.mark.parametrize(
    "created_at",
    [
        datetime(2026, 11, 26, 12, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 11, 26, 17, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ],
    ids=["utc-microsecond", "offset", "old"],
)
def test_cursor_round_trip(created_at: datetime) -> None:
    cursor = pagination.encode(created_at, TASK_ID)
    # URL-safe and unpadded: it travels as a query parameter untouched.
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    decoded_at, decoded_id = pagination.decode(cursor)
    assert decoded_id == TASK_ID
    assert decoded_at == created_at
    assert decoded_at.utcoffset() == created_at.utcoffset()


def test_cursor_is_the_position_as_json() -> None:
    cursor = pagination.encode(datetime(2026, 1, 1, tzinfo=UTC), TASK_ID)
    assert cursor == _cursor_of(["2026-01-01T00:00:00+00:00", str(TASK_ID)])


VALID = pagination.encode(datetime(2026, 1, 1, tzinfo=UTC), TASK_ID)


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "x",
        "%%%%",
        "é",
        VALID[:-4],
        VALID[:10] + ("A" if VALID[10] != "A" else "B") + VALID[11:],
        _cursor_of(["2026-01-01T00:00:00", str(TASK_ID)]),
        _cursor_of(["2026-01-01T00:00:00+00:00", "not-a-uuid"]),
        _cursor_of(["yesterday", str(TASK_ID)]),
        _cursor_of([20260101, str(TASK_ID)]),
        _cursor_of(["2026-01-01T00:00:00+00:00"]),
        _cursor_of(["2026-01-01T00:00:00+00:00", str(TASK_ID), 1]),
        _cursor_of(None),
        _cursor_of(42),
    ],
    ids=[
        "empty",
        "one-char",
        "not-base64",
        "non-ascii",
        "truncated",
        "flipped-char",
        "naive-timestamp",
        "bad-uuid",
        "bad-timestamp",
        "numeric-timestamp",
        "one-element",
        "three-elements",
        "null",
        "number",
    ],
)
def test_tampered_cursors_are_rejected(cursor: str) -> None:
    with pytest.raises(pagination.InvalidCursor) as caught:
        pagination.decode(cursor)
    assert str(caught.value) == "cursor is not one this API issued; use next_cursor as given"


@pytest.mark.parametrize("task_id", [123, ["x"], {"a": 1}], ids=["int", "list", "object"])
def test_a_cursor_with_a_non_string_task_id_is_rejected(task_id: object) -> None:
    with pytest.raises(pagination.InvalidCursor):
        pagination.decode(_cursor_of(["2026-01-01T00:00:00+00:00", task_id]))


# -- backoff ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "base", "cap", "ceiling"),
    [
        (1, 1.0, 300.0, 1.0),
        (2, 1.0, 300.0, 2.0),
        (3, 1.0, 300.0, 4.0),
        (6, 0.5, 300.0, 16.0),
        (9, 1.0, 300.0, 256.0),
        (10, 1.0, 300.0, 300.0),
        (25, 1.0, 300.0, 300.0),
        (0, 2.0, 60.0, 2.0),
        (-3, 2.0, 60.0, 2.0),
        (1, 100.0, 60.0, 60.0),
    ],
)
def test_backoff_draws_between_half_the_ceiling_and_the_ceiling(
    monkeypatch: pytest.MonkeyPatch, attempt: int, base: float, cap: float, ceiling: float
) -> None:
    draws: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return high

    monkeypatch.setattr(random, "uniform", uniform)
    assert backoff_delay(attempt, base, cap) == ceiling
    assert draws == [(ceiling / 2, ceiling)]


def test_backoff_stays_within_bounds_and_is_jittered() -> None:
    for attempt in range(1, 16):
        ceiling = min(60.0, 0.2 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 0.2, 60.0) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), attempt
        assert len(set(delays)) > 150  # full jitter: spread, not a constant


def test_backoff_is_capped_for_any_attempt_count() -> None:
    assert 30.0 <= backoff_delay(1025, 1.0, 60.0) <= 60.0


# ------------------------------------------------------------------ queue priorities


def test_a_classic_queue_honours_every_task_priority_by_default() -> None:
    settings = BrokerSettings()
    assert settings.max_priority == 9
    assert queue_arguments(settings)["x-max-priority"] == 9


def test_a_quorum_queue_has_no_priorities_by_default() -> None:
    settings = BrokerSettings(queue_type="quorum")
    assert settings.max_priority == 0
    assert "x-max-priority" not in queue_arguments(settings)


def test_a_quorum_queue_gets_an_explicit_delivery_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert queue_arguments(BrokerSettings(queue_type="quorum"))["x-delivery-limit"] == 20
    limited = BrokerSettings(queue_type="quorum", queue_delivery_limit=5)
    assert queue_arguments(limited)["x-delivery-limit"] == 5
    # Classic queues have no delivery limit: the argument is never sent.
    assert "x-delivery-limit" not in queue_arguments(BrokerSettings(queue_type="classic"))
    # Empty leaves the broker's default (for a quorum queue made before the setting).
    monkeypatch.setenv("QUEUE_DELIVERY_LIMIT", "")
    assert "x-delivery-limit" not in queue_arguments(BrokerSettings(queue_type="quorum"))


def test_a_quorum_queue_dead_letters_at_least_once_unless_told_otherwise() -> None:
    arguments = queue_arguments(BrokerSettings(queue_type="quorum"))
    # at-least-once needs reject-publish: with drop-head RabbitMQ falls back to at-most-once
    assert arguments["x-dead-letter-strategy"] == "at-least-once"
    assert arguments["x-overflow"] == "reject-publish"
    plain = queue_arguments(
        BrokerSettings(queue_type="quorum", queue_dead_letter_strategy="at-most-once")
    )
    assert "x-dead-letter-strategy" not in plain
    assert "x-overflow" not in plain
    # Classic queues have no dead-letter strategy: neither argument is sent.
    classic = queue_arguments(BrokerSettings(queue_type="classic"))
    assert "x-dead-letter-strategy" not in classic
    assert "x-overflow" not in classic


def test_the_dead_letter_watch_queue_is_named_after_the_dead_letter_queue() -> None:
    settings = BrokerSettings(dead_letter_queue="ops.dead")
    assert settings.dead_letter_watch_queue == "ops.dead.watch"


def test_priorities_can_be_narrowed_or_turned_off() -> None:
    assert queue_arguments(BrokerSettings(queue_max_priority=3))["x-max-priority"] == 3
    assert "x-max-priority" not in queue_arguments(BrokerSettings(queue_max_priority=0))


def test_asking_a_quorum_queue_for_priorities_says_what_to_fix() -> None:
    with pytest.raises(ValidationError, match="QUEUE_MAX_PRIORITY must be 0"):
        BrokerSettings(queue_type="quorum", queue_max_priority=5)
    assert BrokerSettings(queue_type="quorum", queue_max_priority=0).max_priority == 0


def test_a_rule_across_settings_is_described_without_echoing_every_setting() -> None:
    with pytest.raises(ValidationError) as caught:
        BrokerSettings(
            queue_type="quorum",
            queue_max_priority=5,
            amqp_url="amqp://user:s3cret@broker:5672/",
        )
    described = describe_invalid(caught.value)
    assert "QUEUE_MAX_PRIORITY" in described
    assert "s3cret" not in described


def test_the_scheduling_horizon_is_a_duration_up_to_a_century() -> None:
    assert ApiSettings(max_schedule_delay="30d").max_schedule_delay == 30 * 86400
    assert ApiSettings().max_schedule_delay == 365 * 86400
    with pytest.raises(ValidationError, match="less than or equal"):
        ApiSettings(max_schedule_delay="40000d")  # past it, date arithmetic overflows


# -- FORWARDED_ALLOW_IPS ------------------------------------------------------------------


def test_no_proxy_is_believed_by_default() -> None:
    assert ApiSettings(_env_file=None).forwarded_allow_ips == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("127.0.0.1", ["127.0.0.1"]),
        (" 10.0.0.5 , 10.1.0.0/16,::1,, ", ["10.0.0.5", "10.1.0.0/16", "::1"]),
        ("*", ["*"]),
        ("", []),
    ],
)
def test_forwarded_allow_ips_lists_addresses_and_networks(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]
) -> None:
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", raw)
    assert ApiSettings(_env_file=None).forwarded_allow_ips == expected


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("proxy.internal", "'proxy.internal' is not an IP address or network"),
        ("10.0.0.1/8", "'10.0.0.1/8' is not an IP address or network"),
        ("10.0.0.1,*", "\\* trusts every peer; give it alone"),
    ],
    ids=["hostname", "host-bits-set", "star-among-others"],
)
def test_forwarded_allow_ips_refuses_what_uvicorn_would_silently_ignore(
    monkeypatch: pytest.MonkeyPatch, raw: str, why: str
) -> None:
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", raw)
    with pytest.raises(ValidationError, match=f"FORWARDED_ALLOW_IPS: {why}"):
        ApiSettings(_env_file=None)


# -- secrets in settings errors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("mysql://admin:S3cretPW@db/x", "mysql://admin:***@db/x"),
        ("amqp://u:S3cretPW@h:5672/vhost", "amqp://u:***@h:5672/vhost"),
        # unescaped @ / : in the password: the last @ ends it
        ("amqp://u:S3c@ret/P:W@h:5672/", "amqp://u:***@h:5672/"),
        ("redis://:S3cretPW@h", "redis://:***@h"),
        ("admin:S3cretPW@db:5432/x", "admin:***@db:5432/x"),
        (
            "postgresql://db/x?user=u&password=S3cretPW&ssl=1",
            "postgresql://db/x?user=u&password=***&ssl=1",
        ),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
        ("amqp://h:5672/", "amqp://h:5672/"),
        ("not a url", "not a url"),
    ],
)
def test_mask_url_hides_the_password_and_keeps_what_locates_the_server(
    url: str, masked: str
) -> None:
    assert mask_url(url) == masked
    assert "S3c" not in mask_url(url)


def test_a_wrong_database_url_is_described_with_its_password_masked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://admin:S3cretPW@db/x")
    with pytest.raises(ValidationError) as caught:
        RelaySettings(_env_file=None)
    assert describe_invalid(caught.value) == (
        "invalid setting DATABASE_URL='mysql://admin:***@db/x': DATABASE_URL must start with "
        "one of postgresql://, postgres://, postgresql+asyncpg://; got 'mysql'"
    )


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://u:S3cretPW@h/", "AMQP_URL must start with amqp:// or amqps://; got 'http'"),
        ("u:S3cretPW@h:5672/", "AMQP_URL must start with amqp:// or amqps://; got 'no scheme'"),
        ("amqp://u:S3cretPW@h:notaport/", "AMQP_URL is not a valid URL: a port that is not"),
        ("amqp://u:S3cretPW@h:99999/", "AMQP_URL is not a valid URL: a port that is not"),
        ("amqp://u:S3c/retPW@h/", "AMQP_URL is not a valid URL: a port that is not"),
        ("amqp://u:S3cretPW@[::1/", "AMQP_URL is not a valid URL: a port that is not"),
    ],
    ids=["wrong-scheme", "no-scheme", "port-not-a-number", "port-too-large", "slash", "ipv6"],
)
def test_a_malformed_amqp_url_is_refused_and_described_without_its_password(
    monkeypatch: pytest.MonkeyPatch, url: str, why: str
) -> None:
    monkeypatch.setenv("AMQP_URL", url)
    with pytest.raises(ValidationError) as caught:
        BrokerSettings(_env_file=None)
    described = describe_invalid(caught.value)
    assert described.startswith("invalid setting AMQP_URL=")
    assert why in described
    assert "S3c" not in described


@pytest.mark.parametrize(
    "url", ["amqp://guest:guest@127.0.0.1:5672/", "amqps://u:p%2Fq@rabbit/vhost", "amqp://"]
)
def test_amqp_urls_aio_pika_reads_are_accepted(url: str) -> None:
    assert BrokerSettings(amqp_url=url, _env_file=None).amqp_url == url


@pytest.mark.parametrize("bad", ["S3cret key", "S3cret\tkey", "S3cret\x07", "S3\u2028cret"])
def test_an_api_key_no_header_can_carry_is_refused_and_never_shown(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("API_KEYS", f"first-key, {bad}")
    with pytest.raises(ValidationError) as caught:
        ApiSettings(_env_file=None)
    described = describe_invalid(caught.value)
    assert described == (
        "invalid setting API_KEYS=***: API_KEYS: key 2 of 2 holds whitespace or a control "
        "character, which a bearer key in an Authorization header cannot carry"
    )
    assert "first-key" not in described


def test_any_setting_named_like_a_secret_is_masked_whole() -> None:
    class WithToken(ProcessSettings):
        webhook_token: int = 0

    with pytest.raises(ValidationError) as caught:
        WithToken(webhook_token="S3cretPW", _env_file=None)
    assert describe_invalid(caught.value).startswith("invalid setting WEBHOOK_TOKEN=***: ")


def test_a_url_with_a_password_is_masked_in_any_setting_and_other_values_shown() -> None:
    with pytest.raises(ValidationError) as caught:
        ProcessSettings(log_level="amqp://u:S3cretPW@h/", _env_file=None)
    assert describe_invalid(caught.value).startswith(
        "invalid setting LOG_LEVEL='amqp://u:***@h/': String should match pattern"
    )
    with pytest.raises(ValidationError) as caught:
        BrokerSettings(exchange_name="", _env_file=None)
    assert describe_invalid(caught.value).startswith("invalid setting EXCHANGE_NAME='': ")
