"""Settings every process shares: logging and task modules."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
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
