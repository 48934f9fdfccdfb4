"""Settings every process shares: logging and task modules."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode

from db.settings import ENV_CONFIG
from runtime.logs import LogFormat


class ProcessSettings(BaseSettings):
    model_config = ENV_CONFIG

    log_level: str = Field("INFO", pattern=r"(?i)^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    log_format: LogFormat = "text"
    task_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated modules that register extra task types.",
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


def describe_invalid(exc: ValidationError) -> str:
    """Settings errors as the environment variables an operator sets, one per line."""
    lines = []
    for error in exc.errors(include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:
            # A rule across settings: its input is every setting (secrets included), so
            # only the message, which names the settings involved, is shown.
            lines.append(f"invalid settings: {message}")
            continue
        name = ".".join(str(part) for part in error["loc"]).upper()
        lines.append(f"invalid setting {name}={error.get('input')!r}: {message}")
    return "\n".join(lines)
