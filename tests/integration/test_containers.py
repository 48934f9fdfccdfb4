"""The container stack (Dockerfile, docker-compose.yml) against the code it runs.

There is no Docker engine where the tests run, so the static tests read the two files
and compare them with the settings classes and the packaging, and the smoke test runs
the exact commands of the containers as local processes, with the `.env.example`
values a container gets, adapted to the local servers.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import yaml
from pydantic_settings import BaseSettings

from taskbox.api.auth import exposure_refusal
from taskbox.api.settings import ApiSettings
from taskbox.broker.settings import BrokerSettings
from taskbox.consumer.settings import ConsumerSettings
from taskbox.db.grants import Process
from taskbox.db.roles import DEFAULT_NAMES, PASSWORD_VARIABLES
from taskbox.db.settings import DatabaseSettings
from taskbox.relay.settings import RelaySettings
from tests.conftest import ADMIN_DSN, AMQP_URL, database_dsn
from tests.integration.conftest import poll_until_done
from tests.integration.processes import ServiceProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"

# The application services and the settings class each one's process reads.
APP_SETTINGS: dict[str, type[BaseSettings]] = {
    "migrate": DatabaseSettings,
    "roles": DatabaseSettings,
    "api": ApiSettings,
    "relay": RelaySettings,
    "consumer": ConsumerSettings,
}
# Further pools of a process: services that run it with a few settings of their own
# (docker-compose.yml merges the original service into them).
POOLS = {"consumer-media": "consumer"}
# What a process reads from its environment besides its settings class.
OTHER_VARIABLES = {"roles": set(PASSWORD_VARIABLES.values())}
COMMANDS = {
    "migrate": ["taskbox", "migrate"],
    "roles": ["taskbox", "roles"],
    "api": ["taskbox", "api"],
    "relay": ["taskbox", "relay"],
    "consumer": ["taskbox", "consumer"],
}
# The settings whose default (127.0.0.1) cannot work in a container: compose must set them.
NEED_CONTAINER_VALUE = {"DATABASE_URL", "AMQP_URL", "API_HOST", "METRICS_HOST"}
DOCKER_SECTION = "# --- docker compose"
# The cluster profile's further RabbitMQ nodes (docker compose --profile cluster).
RABBITMQ_PEERS = ("rabbitmq-2", "rabbitmq-3")


# --- reading the files ------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def service(name: str) -> dict[str, Any]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services[name]


def setting_names(settings: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads (pydantic-settings: upper-cased)."""
    return {name.upper() for name in settings.model_fields}


ALL_SETTINGS = set().union(*(setting_names(s) for s in APP_SETTINGS.values()))


def service_environment(name: str) -> dict[str, str | None]:
    """The service's ``environment``; None for a variable passed through by name (the
    value Compose finds in the shell or .env, or none at all)."""
    environment = service(name).get("environment", {})
    if isinstance(environment, list):  # the KEY=VALUE list form
        return {
            key: value if sep else None
            for key, sep, value in (item.partition("=") for item in environment)
        }
    return {key: None if value is None else str(value) for key, value in environment.items()}


def _key_value(item: str) -> tuple[str, str]:
    key, _, value = item.partition("=")
    return key, value


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """``.env.example`` as (the Taskbox settings, the docker compose section)."""
    settings: dict[str, str] = {}
    docker: dict[str, str] = {}
    target = settings
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.startswith(DOCKER_SECTION):
            target = docker
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, value = line.split("=", 1)
        target[key.strip()] = value.strip()
    return settings, docker


_SUBSTITUTION = re.compile(
    r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<rest>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def substitutions(value: object) -> list[tuple[str, str]]:
    """Every ``${NAME...}`` or ``$NAME`` in the values of a parsed compose file, as (NAME,
    what follows the name); ``$$`` skipped. Compose interpolates neither comments nor keys."""
    if isinstance(value, str):
        return [
            (m["name"] or m["bare"], m["rest"] or "")
            for m in _SUBSTITUTION.finditer(value)
            if m["name"] or m["bare"]
        ]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [found for item in value for found in substitutions(item)]
    return []


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is unset or empty: Compose stops with the
    message before it creates anything."""


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR:?message}`` and ``$$``
    (enough for this file)."""

    def replace(match: re.Match[str]) -> str:
        if match["bare"] is not None:
            return variables.get(match["bare"], "")
        if match["name"] is None:
            return "$"
        name, rest = match["name"], match["rest"]
        if rest.startswith(":-"):
            return variables.get(name) or rest[2:]
        if rest.startswith(":?"):
            if not variables.get(name):
                raise MissingVariable(f"{name}: {rest[2:]}")
            return variables[name]
        assert not rest, f"unsupported substitution ${{{name}{rest}}}"
        return variables.get(name, "")

    return _SUBSTITUTION.sub(replace, value)


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, (INSTRUCTION, arguments), grouped by stage."""
    logical: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for instruction in logical:
        keyword, _, arguments = instruction.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), arguments.strip()))
    return stages  # stages[0]: the ARGs before the first FROM


def dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in stage:
        if keyword == "ENV":
            env.update(_key_value(item) for item in shlex.split(arguments))
    return env


def seconds(duration: str) -> float:
    """A compose duration such as ``45s`` or ``1m30s``."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


# --- docker-compose.yml -------------------------------------------------------------------


def test_compose_file_has_the_stack_and_no_version_key() -> None:
    spec = compose()
    assert "version" not in spec  # obsolete in the Compose specification
    assert set(spec["services"]) == {"postgres", "rabbitmq", *RABBITMQ_PEERS, *APP_SETTINGS, *POOLS}
    assert service("postgres")["image"] == "postgres:15"
    assert service("rabbitmq")["image"] == "rabbitmq:3.10-management"
    assert "15672:15672" in " ".join(service("rabbitmq")["ports"])
    assert any(str(p).endswith(":${API_PORT:-8000}") for p in service("api")["ports"])


@pytest.mark.parametrize(("pool", "process"), sorted(POOLS.items()))
def test_a_pool_is_its_process_service_serving_other_queues(pool: str, process: str) -> None:
    """Two consumer pools (README, "Queues"): the second is the consumer service in all
    but CONSUMER_QUEUES, which names the queues it serves."""
    original, other = service(process), service(pool)
    assert {k: v for k, v in other.items() if k != "environment"} == {
        k: v for k, v in original.items() if k != "environment"
    }
    environment, own = service_environment(process), service_environment(pool)
    assert {k: v for k, v in own.items() if k != "CONSUMER_QUEUES"} == {
        k: v for k, v in environment.items() if k != "CONSUMER_QUEUES"
    }
    assert environment["CONSUMER_QUEUES"] is None  # from .env: default when empty
    assert own["CONSUMER_QUEUES"] == "${MEDIA_CONSUMER_QUEUES:-media:4}"
    assert secrets_seen(pool) == NEEDED_SECRETS[process]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_service_command_is_the_process_entry_point(name: str) -> None:
    assert service(name)["command"] == COMMANDS[name]


@pytest.mark.parametrize("name", sorted(APP_SETTINGS))
def test_compose_sets_only_settings_the_process_reads(name: str) -> None:
    reads = setting_names(APP_SETTINGS[name]) | OTHER_VARIABLES.get(name, set())
    ignored = set(service_environment(name)) - reads
    assert not ignored, f"{name} gets {sorted(ignored)}, which its process does not read"


@pytest.mark.parametrize("name", sorted(APP_SETTINGS))
def test_settings_without_a_container_default_are_provided(name: str) -> None:
    environment = service_environment(name)
    needed = NEED_CONTAINER_VALUE & setting_names(APP_SETTINGS[name])
    assert needed <= set(environment), f"{name} lacks {sorted(needed - set(environment))}"
    # Whatever .env holds for the host, the containers reach the compose services: the
    # one-shots as the database owner, the others as their roles (see below).
    user = r"\$\{POSTGRES_USER:-\w+\}:\$\{POSTGRES_PASSWORD:\?[^}]+\}"
    if name not in ("migrate", "roles"):
        user = rf"taskbox_{name}:\$\{{TASKBOX_{name.upper()}_PASSWORD:\?[^}}]+\}}"
    if "DATABASE_URL" in needed:
        assert re.fullmatch(
            rf"postgresql://{user}@postgres:5432/\$\{{POSTGRES_DB:-\w+\}}",
            environment["DATABASE_URL"] or "",
        ), environment["DATABASE_URL"]
    if "AMQP_URL" in needed:
        # every node of the cluster profile, in order (README, "Running on a RabbitMQ cluster")
        node = r"amqp://\$\{RABBITMQ_DEFAULT_USER:-\w+\}:\$\{RABBITMQ_DEFAULT_PASS:\?[^}]+\}"
        assert re.fullmatch(
            rf"{node}@rabbitmq:5672/,{node}@rabbitmq-2:5672/,{node}@rabbitmq-3:5672/",
            environment["AMQP_URL"] or "",
        ), environment["AMQP_URL"]
    if "API_HOST" in needed:
        assert environment["API_HOST"] == "0.0.0.0"  # inside the container
    if "METRICS_HOST" in needed:
        assert environment["METRICS_HOST"] == "0.0.0.0"  # scraped from other containers


# -- secrets: each service sees the ones it needs, and no other ---------------------

# Every secret an operator sets for the stack.
SECRETS = {
    "API_KEYS",
    "POSTGRES_PASSWORD",
    "RABBITMQ_DEFAULT_PASS",
    "RABBITMQ_ERLANG_COOKIE",
    "TASKBOX_API_PASSWORD",
    "TASKBOX_RELAY_PASSWORD",
    "TASKBOX_CONSUMER_PASSWORD",
}
NEEDED_SECRETS = {
    "postgres": {"POSTGRES_PASSWORD"},
    "rabbitmq": {"RABBITMQ_DEFAULT_PASS", "RABBITMQ_ERLANG_COOKIE"},
    "rabbitmq-2": {"RABBITMQ_DEFAULT_PASS", "RABBITMQ_ERLANG_COOKIE"},
    "rabbitmq-3": {"RABBITMQ_DEFAULT_PASS", "RABBITMQ_ERLANG_COOKIE"},
    # the database owner's: migrations, and the roles and their passwords
    "migrate": {"POSTGRES_PASSWORD"},
    "roles": {
        "POSTGRES_PASSWORD",
        "TASKBOX_API_PASSWORD",
        "TASKBOX_RELAY_PASSWORD",
        "TASKBOX_CONSUMER_PASSWORD",
    },
    # each its own role's password; the api its keys, relay and consumer the broker's
    "api": {"TASKBOX_API_PASSWORD", "API_KEYS"},
    "relay": {"TASKBOX_RELAY_PASSWORD", "RABBITMQ_DEFAULT_PASS"},
    "consumer": {"TASKBOX_CONSUMER_PASSWORD", "RABBITMQ_DEFAULT_PASS"},
}


def secrets_seen(name: str) -> set[str]:
    """The secrets the ``name`` container can read: those its definition interpolates
    (environment, command, health check, anything), those passed through by name, and
    every one if it reads an env_file (an operator's .env holds them all)."""
    spec = service(name)
    if "env_file" in spec:
        return set(SECRETS)
    interpolated = {variable for variable, _ in substitutions(spec)}
    passed = {key for key, value in service_environment(name).items() if value is None}
    return (interpolated | passed) & SECRETS


def test_no_service_reads_an_env_file() -> None:
    for name, spec in compose()["services"].items():
        assert "env_file" not in spec, f"{name} reads an env_file: every secret in .env"


@pytest.mark.parametrize("name", sorted(NEEDED_SECRETS))
def test_each_service_sees_only_the_secrets_it_needs(name: str) -> None:
    assert secrets_seen(name) == NEEDED_SECRETS[name]


@pytest.mark.parametrize("process", ["api", "relay", "consumer"])
def test_api_relay_and_consumer_connect_as_their_own_roles(process: Process) -> None:
    """Not as the database owner (a superuser in the postgres image): as the role
    ``taskbox roles`` made for the process, with that role's password."""
    url = service_environment(process)["DATABASE_URL"]
    assert url == (
        f"postgresql://{DEFAULT_NAMES[process]}:${{{PASSWORD_VARIABLES[process]}:?"
        f"set {PASSWORD_VARIABLES[process]} in .env}}@postgres:5432/${{POSTGRES_DB:-taskbox}}"
    )
    roles = service_environment("roles")
    assert roles["DATABASE_URL"] == service_environment("migrate")["DATABASE_URL"]
    assert roles[PASSWORD_VARIABLES[process]] == (
        f"${{{PASSWORD_VARIABLES[process]}:?set {PASSWORD_VARIABLES[process]} in .env}}"
    )


@pytest.mark.parametrize("name", ["api", "relay", "consumer"])
def test_every_setting_the_process_reads_can_be_set_in_dotenv(name: str) -> None:
    """Without an env_file, a setting reaches a container only when its service names
    it: the container-bound ones with a value, every other passed through by name (the
    value from .env or the shell, or none, and the process's own default)."""
    environment = service_environment(name)
    # WEBHOOK_CALLBACK_SECRET is an optional secret, and a secret is passed only as a
    # required ${VAR:?...} (test_no_password_or_key_has_a_default): an operator who
    # wants callback_url adds it to the api and relay services (README, "Webhooks").
    left_out = {
        "api": {"ALLOW_UNAUTHENTICATED", "WEBHOOK_CALLBACK_SECRET"},
        "relay": {"WEBHOOK_CALLBACK_SECRET"},
    }.get(name, set())
    assert setting_names(APP_SETTINGS[name]) - left_out == set(environment)
    for key, value in environment.items():
        if value is None:
            assert key not in SECRETS | NEED_CONTAINER_VALUE, (name, key)


# What an operator must set (in .env, or the environment) before Compose starts
# anything: no password and no open api by default.
REQUIRED = SECRETS


def test_every_substitution_has_a_default_or_is_required_with_a_message() -> None:
    """A default for everything but REQUIRED, which stop Compose with a message saying
    where to set them; every variable is one .env.example documents."""
    settings, docker = env_example()
    found = substitutions(compose())
    assert found
    required = set()
    for name, rest in found:
        if rest.startswith(":?"):
            required.add(name)
            assert ".env" in rest, f"${{{name}{rest}}} does not say where to set it"
        else:
            assert re.fullmatch(r":-.+", rest), f"${{{name}{rest}}} has no default"
        assert name in settings or name in docker, f"{name} is not in .env.example"
    assert required == REQUIRED


def test_no_password_or_key_has_a_default() -> None:
    secret = re.compile(r"PASS|KEY|SECRET|TOKEN|COOKIE")
    for name, rest in substitutions(compose()):
        if secret.search(name):
            assert rest.startswith(":?"), f"${{{name}{rest}}}: a secret with a default"
    for name in ("postgres", "rabbitmq", *APP_SETTINGS):
        for key, value in service_environment(name).items():
            if secret.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", value or ""), (name, key, value)
    # .env.example leaves them empty, so a copy nobody edited is refused, not run with
    # a password everybody knows.
    settings, docker = env_example()
    assert {name: {**settings, **docker}[name] for name in REQUIRED} == dict.fromkeys(REQUIRED, "")


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_compose_refuses_to_start_without_each_required_variable(name: str) -> None:
    settings, docker = env_example()
    operator = {**settings, **docker, **dict.fromkeys(REQUIRED, "set-by-the-operator")}
    texts = _string_values(compose())
    for text in texts:
        interpolate(text, operator)  # everything set: nothing missing
    unset = {**operator, name: ""}
    with pytest.raises(MissingVariable, match=rf"^{name}: .*\.env"):
        interpolate("\n".join(texts), unset)


def _string_values(value: object) -> list[str]:
    """Every string value of the parsed compose file (what Compose interpolates)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [found for item in value for found in _string_values(item)]
    return []


def published_ports(variables: dict[str, str]) -> list[tuple[str, str]]:
    """(service, "host_ip:published:target") of every published port, interpolated."""
    published = []
    for name, spec in compose()["services"].items():
        for port in spec.get("ports", []):
            if isinstance(port, dict):  # the long syntax
                port = f"{port.get('host_ip', '')}:{port['published']}:{port['target']}"
            published.append((name, interpolate(str(port), variables)))
    return published


def test_published_ports_bind_loopback_unless_the_operator_says_otherwise() -> None:
    # Docker publishes a port past the host's firewall: the default must be this host.
    ports = published_ports({})
    assert {name for name, _ in ports} == {"api", "rabbitmq"}
    for name, port in ports:
        host, _, _ = port.rpartition(":")[0].rpartition(":")
        assert host == "127.0.0.1", (name, port)
    # Each address is a variable the operator may change, documented in .env.example.
    _, docker = env_example()
    assert docker["API_BIND"] == docker["RABBITMQ_MANAGEMENT_BIND"] == "127.0.0.1"
    exposed = dict(published_ports({"API_BIND": "0.0.0.0", "API_PORT": "8080"}))
    assert exposed["api"] == "0.0.0.0:8080:8080"
    assert exposed["rabbitmq"] == "127.0.0.1:15672:15672"


def test_the_api_container_gets_the_keys_compose_requires() -> None:
    """Inside its container the api listens on 0.0.0.0, which it refuses without keys
    (api.auth.exposure_refusal); compose passes API_KEYS, which it requires."""
    environment = service_environment("api")
    assert environment["API_HOST"] == "0.0.0.0"
    assert (environment["API_KEYS"] or "").startswith("${API_KEYS:?")
    assert "ALLOW_UNAUTHENTICATED" not in environment
    settings, docker = env_example()
    dotenv = {**settings, **docker, **dict.fromkeys(REQUIRED, "k1")}
    env = {
        k: interpolate(v, dotenv)
        for k, v in environment.items()
        if k in ("API_HOST", "API_KEYS") and v is not None
    }
    assert (
        exposure_refusal(ApiSettings.model_validate({k.lower(): v for k, v in env.items()})) is None
    )


def test_env_example_documents_settings_and_the_compose_variables() -> None:
    settings, docker = env_example()
    assert set(settings) == ALL_SETTINGS  # every setting, nothing the code ignores
    assert set(docker) == {name for name, _ in substitutions(compose())} - {*settings}
    assert not set(docker) & ALL_SETTINGS


def test_own_database_and_broker_users_not_the_defaults() -> None:
    postgres = service("postgres")["environment"]
    rabbitmq = service("rabbitmq")["environment"]
    assert postgres["POSTGRES_USER"].startswith("${POSTGRES_USER:-")
    assert postgres["POSTGRES_USER"] != "${POSTGRES_USER:-postgres}"
    assert rabbitmq["RABBITMQ_DEFAULT_USER"].startswith("${RABBITMQ_DEFAULT_USER:-")
    assert rabbitmq["RABBITMQ_DEFAULT_USER"] != "${RABBITMQ_DEFAULT_USER:-guest}"
    _, docker = env_example()
    assert docker["RABBITMQ_DEFAULT_USER"] != "guest"
    assert docker["POSTGRES_USER"] != "postgres"


def test_servers_are_healthchecked_and_keep_their_data_in_named_volumes() -> None:
    volumes = set(compose()["volumes"])
    for name, test in (("postgres", "pg_isready"), ("rabbitmq", "rabbitmq-diagnostics")):
        assert test in " ".join(service(name)["healthcheck"]["test"])
        (volume,) = service(name)["volumes"]
        assert volume.split(":", 1)[0] in volumes


def test_the_cluster_profile_adds_two_rabbitmq_nodes_that_join_the_first() -> None:
    """docker compose --profile cluster: rabbitmq and two peers, one Erlang cookie, each
    peer its own volume and health check, joining rabbit@rabbitmq once; the relays and
    consumers list all three nodes (above). Without the profile nothing changes."""
    volumes = set(compose()["volumes"])
    for name in RABBITMQ_PEERS:
        peer = service(name)
        assert peer["profiles"] == ["cluster"]
        assert peer["image"] == service("rabbitmq")["image"]
        assert peer["hostname"] == name
        assert (
            peer["environment"]["RABBITMQ_ERLANG_COOKIE"]
            == (service("rabbitmq")["environment"]["RABBITMQ_ERLANG_COOKIE"])
        )
        assert "join_cluster rabbit@rabbitmq" in " ".join(peer["command"])
        assert peer["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}
        assert "rabbitmq-diagnostics" in " ".join(peer["healthcheck"]["test"])
        (volume,) = peer["volumes"]
        assert volume.split(":", 1)[0] in volumes
        assert "ports" not in peer
    for name, spec in compose()["services"].items():
        if name not in RABBITMQ_PEERS:
            assert "profiles" not in spec, name


def test_start_order_migrations_once_before_the_api_and_workers() -> None:
    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in service(name)["depends_on"].items()}

    assert conditions("migrate") == {"postgres": "service_healthy"}
    # the roles after every migration, and the processes only once their roles are
    assert conditions("roles") == {"migrate": "service_completed_successfully"}
    assert conditions("api")["roles"] == "service_completed_successfully"
    for name in ("relay", "consumer"):
        assert conditions(name) == {
            "roles": "service_completed_successfully",
            "rabbitmq": "service_healthy",
        }
    for name in ("migrate", "roles"):
        assert "deploy" not in service(name)  # one container, never one per replica
        assert service(name)["restart"] == "no"


def test_api_healthcheck_uses_its_health_endpoint() -> None:
    assert "/healthz" in " ".join(service("api")["healthcheck"]["test"])


@pytest.mark.parametrize("name", ["relay", "consumer"])
def test_workers_are_replicated_restarted_and_stopped_gracefully(name: str) -> None:
    spec = service(name)
    assert int(spec["deploy"]["replicas"]) >= 2
    assert spec["restart"] in {"always", "unless-stopped", "on-failure"}
    settings, _ = env_example()
    default = ConsumerSettings.model_fields["shutdown_grace"].default
    grace = max(float(default), float(settings["SHUTDOWN_GRACE"]))
    assert seconds(spec["stop_grace_period"]) > grace
    # the image's HEALTHCHECK asks the api; these ask their own metrics port's /healthz
    check = " ".join(spec["healthcheck"]["test"])
    assert "/healthz" in check
    assert f"{name.upper()}_METRICS_PORT" in check
    assert "ports" not in spec
    assert "container_name" not in spec


# --- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python() -> None:
    args, *stages = dockerfile_stages()
    assert len(stages) >= 2
    image = dict(_key_value(a) for k, a in args if k == "ARG")["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", image), image
    assert all(stage[0][1].split()[0] == "${PYTHON_IMAGE}" for stage in stages)


def test_final_stage_runs_the_venv_as_a_non_root_user() -> None:
    final = dockerfile_stages()[-1]
    env = dockerfile_env(final)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["API_HOST"] == "0.0.0.0"
    assert env["PATH"].startswith("/opt/venv/bin:")
    # the image sets no setting but API_HOST, and no secret at all
    assert {k for k in env if k in ALL_SETTINGS} == {"API_HOST"}
    assert set(env) <= {"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "API_HOST"}
    (user,) = [a for k, a in final if k == "USER"]
    assert user.split(":")[0] not in {"root", "0"}
    copies = [a for k, a in final if k == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    assert not [a for k, a in final if k == "RUN" and ("apt-get" in a or "pip" in a)]
    (cmd,) = [a for k, a in final if k == "CMD"]
    assert json.loads(cmd) == COMMANDS["api"]
    (healthcheck,) = [a for k, a in final if k == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    assert "API_PORT" in healthcheck


def test_builder_installs_the_pinned_dependencies_then_the_project() -> None:
    builder = dockerfile_stages()[1]
    installs = [a for k, a in builder if k == "RUN" and " install " in a]
    assert len(installs) == 2
    pinned, project = installs
    assert "--no-deps -r requirements.lock" in pinned
    assert "--no-deps ." in project
    for install in installs:
        assert "--no-cache-dir" in install
        assert "-e " not in install
        assert "[dev]" not in install


def test_the_lock_pins_every_runtime_dependency_exactly() -> None:
    """requirements.lock names each dependency of pyproject.toml with an exact version."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[name.lower().replace("_", "-")] = version
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for requirement in config["project"]["dependencies"]:
        name = requirement.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip()
        assert name.lower().replace("_", "-") in pins, f"{name} missing from requirements.lock"


def test_every_first_party_package_the_processes_import_ships() -> None:
    """In the wheel (packages.find), in the build context (.dockerignore) and COPYed."""
    # Each first-party module loaded: its name, and the root folder its file really is
    # in (taskbox/api is a link to api/, so taskbox.api.* lives in api/).
    probe = (
        "import sys, os, json, taskbox.api.asgi, taskbox.api.__main__, taskbox.relay.__main__, "
        "taskbox.consumer.__main__, taskbox.db.__main__, taskbox.db.migrations, taskbox.cli\n"
        f"root = {str(ROOT)!r}\n"
        "files = {n: os.path.realpath(getattr(m, '__file__', None) or '') for n, m in"
        " list(sys.modules.items())}\n"
        "print(json.dumps(sorted([n, os.path.relpath(f, root).split(os.sep)[0]]"
        " for n, f in files.items() if f.startswith(root + os.sep))))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    # (.venv is under the root too: its packages are not ours)
    modules = {name: folder for name, folder in json.loads(found.stdout) if folder != ".venv"}
    folders = set(modules.values())
    assert {"api", "relay", "consumer", "db", "taskbox"} <= folders, folders
    assert all(name.split(".")[0] == "taskbox" for name in modules), modules
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    allowed = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    copied = {a for k, a in dockerfile_stages()[1] if k == "COPY"}
    for name in sorted(modules):
        assert any(fnmatch.fnmatch(name, pattern) for pattern in include), name
    for folder in sorted(folders):
        assert f"!{folder}/" in allowed, folder
        assert f"{folder}/ {folder}/" in copied, folder


# --- smoke test: the containers' commands as local processes ----------------------------


# What an operator fills in a copy of .env.example before `make run` (REQUIRED).
OPERATOR_VALUES = {
    "API_KEYS": "smoke-test-key-5b1e",
    "POSTGRES_PASSWORD": "smoke-test-postgres",
    "RABBITMQ_DEFAULT_PASS": "smoke-test-rabbitmq",
    "RABBITMQ_ERLANG_COOKIE": "smoke-test-cookie",
    "TASKBOX_API_PASSWORD": "smoke-test-api",
    "TASKBOX_RELAY_PASSWORD": "smoke-test-relay",
    "TASKBOX_CONSUMER_PASSWORD": "smoke-test-consumer",
}
assert set(OPERATOR_VALUES) == REQUIRED


def with_user(dsn: str, user: str) -> str:
    """``dsn`` with ``user`` and no password (the local server trusts 127.0.0.1)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rsplit('@', 1)[-1]}"))


def container_environment(
    name: str, local: dict[str, str], local_roles: dict[str, str] | None = None
) -> dict[str, str]:
    """What the ``name`` container's process sees, with ``local`` for the host-bound values.

    The image's ENV, then the service's ``environment``: each value interpolated from
    ``.env`` (a copy of .env.example with OPERATOR_VALUES filled in), each variable
    passed through by name taken from it (none if .env lacks it). Nothing else: no
    env_file. Finally the values that name the compose hosts are replaced by the local
    servers, databases and queues, and the database user by ``local_roles``' name for
    it (the test's own role names: roles are shared by every database on the server).
    """
    settings, docker = env_example()
    dotenv = {**settings, **docker, **OPERATOR_VALUES}
    image_env = dockerfile_env(dockerfile_stages()[-1])
    image_env.pop("PATH")
    env = {k: v for k, v in os.environ.items() if k not in ALL_SETTINGS | set(dotenv)}
    env.pop("TASKBOX_FAILPOINTS", None)
    env.update(image_env)
    for key, value in service_environment(name).items():
        if value is not None:
            env[key] = interpolate(value, dotenv)
        elif key in dotenv:
            env[key] = dotenv[key]
    user = urlsplit(env.get("DATABASE_URL", "")).username
    env.update({k: v for k, v in local.items() if k in env})
    if local_roles and user in local_roles:
        env["DATABASE_URL"] = with_user(env["DATABASE_URL"], local_roles[user])
    return env


def run_command(command: list[str]) -> list[str]:
    """The image's command run here: its console script or its python, from this venv."""
    assert command[0] in {"python", "taskbox"}, command
    if command[0] == "taskbox":
        return [str(Path(sys.executable).parent / "taskbox"), *command[1:]]
    return [sys.executable, *command[1:]]


@pytest.fixture
async def fresh_database() -> AsyncIterator[str]:
    """A database name that does not exist yet: the migrate command creates it."""
    name = f"taskbox_ctr_{uuid.uuid4().hex[:12]}"
    yield name
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def local_roles(fresh_database: str) -> AsyncIterator[dict[str, str]]:
    """The compose role names (taskbox_api...), each mapped to a name of this test's
    own; the roles go at teardown, after the database that holds their grants."""
    suffix = uuid.uuid4().hex[:10]
    names = {DEFAULT_NAMES[p]: f"tbx_ctr_{p}_{suffix}" for p in DEFAULT_NAMES}
    yield names
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{fresh_database}" WITH (FORCE)')
        for role in names.values():
            await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        await conn.close()


async def run_one_shot(name: str, env: dict[str, str], *extra: str) -> str:
    """Run the ``name`` service's command to completion (a one-shot: migrate, roles)."""
    process = await asyncio.create_subprocess_exec(
        *run_command(service(name)["command"]),
        *extra,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        output, _ = await process.communicate()
    assert process.returncode == 0, (name, output.decode())
    return output.decode()


async def test_container_commands_run_a_task_to_done(
    fresh_database: str, local_roles: dict[str, str], broker_settings: BrokerSettings
) -> None:
    port = free_port()
    local = {
        "DATABASE_URL": database_dsn(fresh_database),
        "AMQP_URL": AMQP_URL,
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "OUTBOX_CHANNEL": f"outbox_{uuid.uuid4().hex[:10]}",
        "EXCHANGE_NAME": broker_settings.exchange_name,
        "QUEUE_NAME": broker_settings.queue_name,
        "DEAD_LETTER_EXCHANGE": broker_settings.dead_letter_exchange,
        "DEAD_LETTER_QUEUE": broker_settings.dead_letter_queue,
        "METRICS_HOST": "127.0.0.1",
        "RELAY_METRICS_PORT": str(free_port()),
        "CONSUMER_METRICS_PORT": str(free_port()),
    }
    # the migrate service, then the roles one, each run to completion first
    # (depends_on: service_completed_successfully); the roles get the test's own names
    output = await run_one_shot("migrate", container_environment("migrate", local))
    assert "database is at the latest migration" in output
    names = [f"--{p}-role={local_roles[DEFAULT_NAMES[p]]}" for p in DEFAULT_NAMES]
    output = await run_one_shot("roles", container_environment("roles", local), *names)
    for process, role in DEFAULT_NAMES.items():
        variable = PASSWORD_VARIABLES[process]
        assert f"{local_roles[role]} ({process}): created, password set from {variable}" in output

    processes: dict[str, ServiceProcess] = {}
    try:
        for name in ("api", "relay", "consumer"):
            command = service(name)["command"]
            assert command == ["taskbox", name]
            env = container_environment(name, local, local_roles)
            # as its own role, on the test's database
            role = local_roles[DEFAULT_NAMES[name]]
            assert env["DATABASE_URL"] == with_user(local["DATABASE_URL"], role)
            processes[name] = await ServiceProcess(name, env, argv=run_command(command)).start()
        key = {"Authorization": f"Bearer {OPERATOR_VALUES['API_KEYS']}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=key) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            # the keys compose requires are the api's
            anonymous = await client.get("/api/v1/tasks", headers={"Authorization": ""})
            assert anonymous.status_code == 401, anonymous.text
            created = await client.post(
                "/api/v1/tasks", json={"type": "echo", "payload": {"from": "containers"}}
            )
            assert created.status_code == 201, created.text
            location = created.headers["location"]
            task = await poll_until_done(client, location, within=10)
            assert task["result"] == {"from": "containers"}
        # the relay's and the consumer's compose health checks, run as compose runs them
        for name in ("relay", "consumer"):
            kind, *command = service(name)["healthcheck"]["test"]
            assert kind == "CMD"
            probe = await asyncio.create_subprocess_exec(
                *run_command(command),
                env=container_environment(name, local, local_roles),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            async with asyncio.timeout(10):
                probe_output, _ = await probe.communicate()
            assert probe.returncode == 0, (name, probe_output.decode())
    finally:
        for name in ("consumer", "relay"):
            if name in processes:
                code = await processes[name].stop(signal.SIGTERM)
                assert code == 0, processes[name].output
        if "api" in processes:
            api = processes["api"]
            # uvicorn re-raises the signal once its graceful shutdown is complete
            assert await api.stop(signal.SIGTERM) in (0, -signal.SIGTERM), api.output
            assert "Application shutdown complete" in api.output
