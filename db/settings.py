"""Database settings shared by every process."""

from __future__ import annotations

from urllib.parse import quote

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


def sqlalchemy_dsn(dsn: str) -> str:
    """The plain DSN ``dsn`` as the URL SQLAlchemy's asyncpg dialect (alembic) reads.

    libpq and asyncpg take several hosts in the authority, ``h1:p1,h2:p2`` (a primary
    and its standbys, with ``target_session_attrs`` picking the writable one); SQLAlchemy
    parses the authority as one host and one port and fails on the comma. It takes the
    same list as repeated ``host=h:p`` query parameters and hands them, with the other
    parameters, to ``asyncpg.connect``: one connection logic for the migrations and the
    processes.
    """
    rest = plain_dsn(dsn)[len("postgresql://") :]
    authority, _, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    if "," not in hosts:
        return "postgresql+asyncpg://" + rest
    if "[" in hosts:
        # SQLAlchemy splits each host=... at its first ":"; name such hosts by DNS.
        raise ValueError("DATABASE_URL: IPv6 literals in a list of hosts are not supported")
    database, _, query = path.partition("?")
    # SQLAlchemy wants a port on every listed host; libpq's default where none is given.
    listed = "&".join(
        "host=" + quote(host if ":" in host else f"{host}:5432", safe=":")
        for host in hosts.split(",")
    )
    query = f"{listed}&{query}" if query else listed
    return f"postgresql+asyncpg://{userinfo}{at}/{database}?{query}"


class DatabaseSettings(BaseSettings):
    """Where Postgres is and how each process talks to it."""

    model_config = ENV_CONFIG

    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/taskbox",
        description=(
            "Postgres DSN; postgresql://, postgres:// and postgresql+asyncpg:// accepted. "
            "Several hosts (h1:p1,h2:p2) with ?target_session_attrs=read-write follow a "
            "failover to whichever is the primary."
        ),
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
        return sqlalchemy_dsn(self.database_url)
