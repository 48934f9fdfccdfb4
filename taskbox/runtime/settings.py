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


class TracingSettings(BaseSettings):
    """The standard OpenTelemetry variables Taskbox reads to decide whether to trace and
    where to send spans (runtime.telemetry). Tracing is off unless OTEL_TRACES_EXPORTER
    names an exporter, or it is unset and an OTLP endpoint is set; OTEL_SDK_DISABLED=true
    turns it off whatever else says. The SDK reads the other OTEL_* variables itself
    (OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, _COMPRESSION, OTEL_BSP_*, OTEL_TRACES_SAMPLER,
    OTEL_RESOURCE_ATTRIBUTES), from the environment only."""

    model_config = ENV_CONFIG

    otel_sdk_disabled: bool = Field(False, description="true: no tracing at all.")
    otel_traces_exporter: str = Field(
        "", description="Comma-separated: otlp, console or none; empty: otlp if an endpoint is set."
    )
    otel_exporter_otlp_endpoint: str = Field(
        "", description="OTLP/HTTP base URL; spans go to <url>/v1/traces."
    )
    otel_exporter_otlp_traces_endpoint: str = Field(
        "", description="OTLP/HTTP URL spans are posted to, as is (wins over the base URL)."
    )
    otel_exporter_otlp_protocol: str = Field("", description="Only http/protobuf is supported.")
    otel_exporter_otlp_traces_protocol: str = Field("", description="As above, for traces.")
    otel_service_name: str = Field(
        "", description="service.name; empty: taskbox-api, taskbox-relay or taskbox-consumer."
    )

    @field_validator("otel_traces_exporter")
    @classmethod
    def _known_exporters(cls, value: str) -> str:
        names = [name.strip().lower() for name in value.split(",") if name.strip()]
        unknown = sorted(set(names) - _TRACE_EXPORTERS)
        if unknown:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER names {', '.join(unknown)}; Taskbox exports spans with "
                f"{', '.join(sorted(_TRACE_EXPORTERS))}"
            )
        return ",".join(names)

    @field_validator("otel_exporter_otlp_protocol", "otel_exporter_otlp_traces_protocol")
    @classmethod
    def _http_protobuf_only(cls, value: str) -> str:
        # The exporter Taskbox ships is OTLP over HTTP with protobuf bodies; a collector's
        # gRPC port (4317) would silently receive nothing, so say so at start instead.
        value = value.strip().lower()
        if value not in ("", "http/protobuf"):
            raise ValueError(
                f"{value!r} is not supported: Taskbox sends OTLP as http/protobuf "
                "(a collector's port 4318, not gRPC's 4317)"
            )
        return value

    @field_validator("otel_exporter_otlp_endpoint", "otel_exporter_otlp_traces_endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("an OTLP/HTTP endpoint must start with http:// or https://")
        return value

    def trace_exporters(self) -> list[str]:
        """The exporters to send spans to; empty when tracing is off."""
        if self.otel_sdk_disabled:
            return []
        names = [name for name in self.otel_traces_exporter.split(",") if name]
        if not names:
            # Unset, the specification's default would be otlp: Taskbox is off by default
            # instead, and an endpoint alone is taken as asking for spans.
            endpoint = self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint
            return ["otlp"] if endpoint else []
        return [] if "none" in names else names

    def otlp_traces_endpoint(self) -> str:
        if self.otel_exporter_otlp_traces_endpoint:
            return self.otel_exporter_otlp_traces_endpoint
        if self.otel_exporter_otlp_endpoint:
            return self.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        return "http://localhost:4318/v1/traces"  # the specification's default


_TRACE_EXPORTERS = frozenset({"otlp", "console", "none"})


class ProcessSettings(TracingSettings):
    model_config = ENV_CONFIG

    log_level: str = Field("INFO", pattern=r"(?i)^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    log_format: LogFormat = "text"


class TaskTypeSettings(BaseSettings):
    """Which task types a process knows: the api's (what it accepts), the consumer's
    (what it runs) and the relay's (the schedules its task modules declare, for its
    scheduler; it moves tasks of any type)."""

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


# A comma that begins another URL of a list.
_NEXT_URL = re.compile(r"\s*,\s*(?=[a-z][a-z0-9+.-]*://)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with its password as ***: ``scheme://user:***@host/...``, and the value
    of a ``password=`` (or token, secret) query parameter too.

    Made for the URLs a setting rejects, so it assumes nothing is well formed:
    everything between ``://`` and the last ``@`` is the user and password, even when
    it holds an unescaped ``@``, ``/`` or ``:``. A list of URLs (AMQP_URL naming a
    cluster's nodes) is masked URL by URL, so each keeps its host.
    """
    several = _NEXT_URL.split(url)
    if len(several) > 1:
        return ",".join(mask_url(one) for one in several)
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
