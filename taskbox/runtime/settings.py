"""Settings every process shares (where they are read from, logging), the task types
the api and the consumer know, and how a process that refuses its settings says why
without printing a secret.

The base of the settings plumbing: db and broker build their settings on ENV_CONFIG
from here, so this module imports neither."""

from __future__ import annotations

import re
import sys
from typing import Annotated, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from taskbox.runtime.logs import LogFormat

# Every settings class reads the environment and, when present, .env; names not its
# own are other processes' settings, not mistakes.
ENV_CONFIG = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")


class ProcessSettings(BaseSettings):
    model_config = ENV_CONFIG

    log_level: str = Field("INFO", pattern=r"(?i)^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    log_format: LogFormat = "text"


class TaskTypeSettings(BaseSettings):
    """Which task types a process knows: the api's (what it accepts) and the
    consumer's (what it runs). The relay moves tasks of any type and reads neither."""

    model_config = ENV_CONFIG

    task_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated modules that register extra task types, or "
        "module:name entries naming a TaskRegistry instance.",
    )
    builtin_task_types: bool = Field(
        True,
        description="Register the built-in demo types echo, sleep, sha256 and fail; "
        "false in production.",
    )

    @field_validator("task_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value


class MetricsSettings(BaseSettings):
    """Where the relay and the consumer serve /metrics, /healthz and /readyz."""

    model_config = ENV_CONFIG

    metrics_host: str = Field(
        "127.0.0.1", description="Address the metrics port binds (0.0.0.0 in a container)."
    )


EXIT_INVALID_SETTINGS = 2

# Settings that are URLs with a password in them: shown with the password masked, the
# rest (scheme, user, host) saying what is wrong.
_SECRET_URLS = frozenset({"DATABASE_URL", "AMQP_URL"})
# Settings whose whole value is secret (API_KEYS), by name so that a new one is covered.
_SECRET_NAME = re.compile(r"KEY|PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|secret)=)[^&#]*")
MASK = "***"


def mask_url(url: str) -> str:
    """``url`` with its password as ***: ``scheme://user:***@host/...``, and the value
    of a ``password=`` (or token, secret) query parameter too.

    Made for the URLs a setting rejects, so it assumes nothing is well formed:
    everything between ``://`` and the last ``@`` is the user and password, even when
    it holds an unescaped ``@``, ``/`` or ``:``.
    """
    start = url.find("://")
    start = 0 if start < 0 else start + 3
    at = url.rfind("@")
    if at >= start:
        user, colon, _ = url[start:at].partition(":")
        if colon:
            url = f"{url[:start]}{user}:{MASK}{url[at:]}"
    return _QUERY_SECRET.sub(rf"\g<1>{MASK}", url)


def shown_value(name: str, value: object) -> str:
    """How an error shows the value of setting ``name``: masked where it can hold a
    secret. Any text is read as a URL that may hold a password, whatever the
    setting: a URL pasted into the wrong one is still a secret."""
    if name not in _SECRET_URLS and _SECRET_NAME.search(name):
        return MASK
    if isinstance(value, str):
        return repr(mask_url(value))
    return repr(value)


def describe_invalid(exc: ValidationError) -> str:
    """Settings errors as the environment variables an operator sets, one per line,
    secrets masked (see ``shown_value``). Print this, never ``str(exc)``: pydantic
    repeats every rejected value there (``input_value=...``) as it was given."""
    lines = []
    for error in exc.errors(include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:
            # A rule across settings: its input is every setting (secrets included), so
            # only the message, which names the settings involved, is shown.
            lines.append(f"invalid settings: {message}")
            continue
        name = ".".join(str(part) for part in error["loc"]).upper()
        shown = shown_value(str(error["loc"][0]).upper(), error.get("input"))
        lines.append(f"invalid setting {name}={shown}: {message}")
    return "\n".join(lines)


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def settings_or_exit(settings_class: type[SettingsT]) -> SettingsT:
    """``settings_class()`` from the environment; when a setting is invalid, the
    reasons (``describe_invalid``) on stderr and exit 2, not pydantic's traceback."""
    try:
        return settings_class()
    except ValidationError as exc:
        print(describe_invalid(exc), file=sys.stderr)
        raise SystemExit(EXIT_INVALID_SETTINGS) from None
