"""Database settings shared by every process."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from taskbox.runtime.settings import ENV_CONFIG

_ACCEPTED_SCHEMES = ("postgresql://", "postgres://", "postgresql+asyncpg://")


def plain_dsn(url: str) -> str:
    """Return ``url`` as the plain ``postgresql://`` DSN that asyncpg understands."""
    for scheme in _ACCEPTED_SCHEMES:
        if url.startswith(scheme):
            return "postgresql://" + url[len(scheme) :]
    scheme = url.split("://", 1)[0] if "://" in url else "no scheme"
    # Name only the scheme: the rest of the URL may hold a password.
    raise ValueError(
        f"DATABASE_URL must start with one of {', '.join(_ACCEPTED_SCHEMES)}; got {scheme!r}"
    )


class DatabaseSettings(BaseSettings):
    """Where Postgres is and how each process talks to it."""

    model_config = ENV_CONFIG

    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/taskbox",
        description="Postgres DSN; postgresql://, postgres:// and postgresql+asyncpg:// accepted.",
    )
    db_pool_min_size: int = Field(2, ge=0)
    db_pool_max_size: int = Field(10, ge=1)
    db_command_timeout: float = Field(
        30.0, gt=0, description="Seconds before a query is abandoned."
    )
    db_connect_timeout: float = Field(5.0, gt=0, description="Seconds to open a connection.")
    outbox_channel: str = Field(
        "taskbox_outbox",
        # 40 characters at most: the relay's self-check channel appends up to 23 to it
        # and Postgres cuts channel names at 63.
        pattern=r"^[a-z_][a-z0-9_]{0,39}$",
        description="Postgres NOTIFY channel that wakes the relays.",
    )

    @field_validator("database_url")
    @classmethod
    def _normalise_dsn(cls, value: str) -> str:
        return plain_dsn(value)

    @property
    def sqlalchemy_url(self) -> str:
        """The same DSN with the driver SQLAlchemy and alembic need."""
        return "postgresql+asyncpg://" + self.database_url[len("postgresql://") :]
