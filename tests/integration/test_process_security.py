"""What the real processes believe and print: proxy headers only from the proxies in
FORWARDED_ALLOW_IPS, and no secret in the message of a process refusing its settings.

``python -m api|relay|consumer|db`` as an operator starts them, over the real Postgres
and RabbitMQ.
"""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.integration.processes import ServiceProcess, free_port, run_command

CLIENT = "203.0.113.7"  # what a client claims to be, in X-Forwarded-For


# -- X-Forwarded-For -------------------------------------------------------------------


async def access_line(service_env: dict[str, str], **extra_env: str) -> str:
    """The access log line of one request from 127.0.0.1 claiming to come from CLIENT."""
    port = free_port()
    api = await ServiceProcess(
        "api", service_env, API_PORT=str(port), LOG_FORMAT="text", **extra_env
    ).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            response = await client.get("/healthz", headers={"X-Forwarded-For": CLIENT})
            assert response.status_code == 200, response.text
        await api.wait_for('"GET /healthz HTTP/1.1" 200', timeout=5)
    finally:
        assert await api.stop(signal.SIGTERM) in (0, -signal.SIGTERM), api.output
    (line,) = [line for line in api.lines if '"GET /healthz HTTP/1.1" 200' in line]
    return line


@pytest.mark.parametrize(
    "proxies",
    [None, "10.20.30.40", "10.0.0.0/8,::1"],
    ids=["none-configured", "another-proxy", "other-networks"],
)
async def test_the_api_ignores_x_forwarded_for_from_a_peer_that_is_not_a_proxy(
    service_env: dict[str, str], proxies: str | None
) -> None:
    extra = {} if proxies is None else {"FORWARDED_ALLOW_IPS": proxies}
    env = {k: v for k, v in service_env.items() if k != "FORWARDED_ALLOW_IPS"}
    line = await access_line(env, **extra)
    assert CLIENT not in line, line
    assert " 127.0.0.1:" in line, line


async def test_the_api_believes_x_forwarded_for_from_a_configured_proxy(
    service_env: dict[str, str],
) -> None:
    line = await access_line(service_env, FORWARDED_ALLOW_IPS="127.0.0.1")
    assert f" {CLIENT}:" in line, line


# -- secrets in the message of a process refusing its settings -------------------------

DB_PASSWORD = "Db-S3cret-pw"
AMQP_PASSWORD = "Mq-S3cret-pw"
API_KEY = "Key-S3cret"
SECRETS = (DB_PASSWORD, AMQP_PASSWORD, API_KEY)

WRONG_SCHEME = {"DATABASE_URL": f"mysql://admin:{DB_PASSWORD}@db.internal/taskbox"}
DATABASE_URL_REASON = (
    "invalid setting DATABASE_URL='mysql://admin:***@db.internal/taskbox': "
    "DATABASE_URL must start with one of postgresql://, postgres://, postgresql+asyncpg://; "
    "got 'mysql'"
)
# A port that is not one: aio-pika would fail on it only when it connects.
MALFORMED_AMQP_URL = {"AMQP_URL": f"amqp://taskbox:{AMQP_PASSWORD}@rabbitmq:notaport/"}
AMQP_URL_REASON = (
    "invalid setting AMQP_URL='amqp://taskbox:***@rabbitmq:notaport/': AMQP_URL is not a valid URL"
)
# A key pasted with a line break in it: no Authorization header can carry it.
MALFORMED_API_KEYS = {"API_KEYS": f"first-key,{API_KEY}\r\nsecond-half"}
API_KEYS_REASON = "invalid setting API_KEYS=***: API_KEYS: key 2 of 2 holds whitespace"


def refusing_env(settings: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TASKBOX_FAILPOINTS", *settings)}
    return {**env, **settings, "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize(
    ("command", "settings", "reasons"),
    [
        (
            ["api"],
            {**WRONG_SCHEME, **MALFORMED_API_KEYS},
            [DATABASE_URL_REASON, API_KEYS_REASON],
        ),
        # what each uvicorn worker does: import the app, which reads the settings
        (
            ["uvicorn", "taskbox.api.asgi:app", "--port", "0"],
            {**WRONG_SCHEME, **MALFORMED_API_KEYS},
            [DATABASE_URL_REASON, API_KEYS_REASON],
        ),
        (
            ["relay"],
            {**WRONG_SCHEME, **MALFORMED_AMQP_URL},
            [DATABASE_URL_REASON, AMQP_URL_REASON],
        ),
        (
            ["relay", "status"],
            {**WRONG_SCHEME, **MALFORMED_AMQP_URL},
            [DATABASE_URL_REASON, AMQP_URL_REASON],
        ),
        (
            ["consumer"],
            {**WRONG_SCHEME, **MALFORMED_AMQP_URL},
            [DATABASE_URL_REASON, AMQP_URL_REASON],
        ),
        (
            ["db", "migrate"],
            WRONG_SCHEME,
            # db prints no value at all
            ["invalid setting DATABASE_URL: DATABASE_URL must start with one of"],
        ),
    ],
    ids=["api", "api-asgi-import", "relay", "relay-status", "consumer", "db-migrate"],
)
async def test_a_process_refusing_its_settings_says_why_without_a_secret(
    command: list[str], settings: dict[str, str], reasons: list[str]
) -> None:
    module, *args = command
    result = await run_command(module, args, refusing_env(settings), timeout=30)
    output = result.stdout + result.stderr
    for secret in SECRETS:
        assert secret not in output, result
    assert "input_value" not in output, result  # pydantic's own text, value and all
    assert "Traceback" not in output, result
    for reason in reasons:
        assert reason in result.stderr, result
    assert result.code == 2, result


@pytest.mark.parametrize("module", ["relay", "consumer"])
async def test_a_process_retrying_its_broker_logs_no_password(
    service_env: dict[str, str], module: str
) -> None:
    # Trust authentication lets the password in DATABASE_URL through; the broker refuses
    # the one in AMQP_URL, so the process logs its retries (aio-pika names the URL).
    database_url = service_env["DATABASE_URL"].replace("//postgres@", f"//postgres:{DB_PASSWORD}@")
    assert DB_PASSWORD in database_url
    process = ServiceProcess(
        module,
        service_env,
        DATABASE_URL=database_url,
        AMQP_URL=f"amqp://guest:{AMQP_PASSWORD}@127.0.0.1:5672/",
        LOG_LEVEL="DEBUG",
    )
    await process.start(until="cannot reach RabbitMQ yet")
    process.kill()
    await process.wait(timeout=10)
    assert "amqp://guest:******@127.0.0.1:5672/" in process.output  # the URL was logged
    for secret in SECRETS:
        assert secret not in process.output, process.output
