"""Every third-party module the code imports comes from a distribution pyproject.toml
declares: the processes' code from a runtime dependency, the tests and benchmarks from a
runtime or dev one. A module that only arrives because another package happens to
depend on it (aiormq under aio-pika, starlette under FastAPI) breaks when that package
stops depending on it, and its version is then bounded by nobody."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections import defaultdict
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The server's folders (taskbox/client is the client extra's, checked on its own)
PROCESS_PACKAGES = (
    "api",
    "relay",
    "consumer",
    "db",
    "taskbox/broker",
    "taskbox/runtime",
    "taskbox/schedules",
    "taskbox/tasktypes",
    "taskbox/webhooks",
    "tasktypes",
)
LOCAL = frozenset({"taskbox", "tasktypes", "tests", "bench"})
# The benchmark's peer processes run in .venv-peers, whose pins are its own
# (bench/peers/requirements.txt): what they import is checked against that file.
PEERS = ROOT / "bench" / "peers"
PEER_SIDE = frozenset([*PEERS.glob("*_peer.py"), PEERS / "kit.py", PEERS / "serve.py"])


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> set[str]:
    """The distribution names in ``requirements`` (PEP 508 strings), normalised."""
    names = set()
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        assert match, f"pyproject.toml: cannot read {requirement!r}"
        names.add(normalise(match.group(1)))
    return names


def project() -> dict[str, list[str]]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        table = tomllib.load(file)["project"]
    return {"runtime": table["dependencies"], "dev": table["optional-dependencies"]["dev"]}


def third_party_imports(
    folders: tuple[str, ...], skip: frozenset[Path] = frozenset()
) -> dict[str, set[str]]:
    """Top-level module -> the files that import it, for every module under ``folders``
    (but the files in ``skip``) that is neither the standard library nor Taskbox's own."""
    found: dict[str, set[str]] = defaultdict(set)
    for folder in folders:
        for path in sorted(set((ROOT / folder).rglob("*.py")) - skip):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".", 1)[0]
                    if top not in sys.stdlib_module_names and top not in LOCAL:
                        found[top].add(str(path.relative_to(ROOT)))
    return found


def undeclared(
    folders: tuple[str, ...], allowed: set[str], skip: frozenset[Path] = frozenset()
) -> dict[str, str]:
    providers = metadata.packages_distributions()
    missing = {}
    for module, files in sorted(third_party_imports(folders, skip).items()):
        distributions = {normalise(d) for d in providers.get(module, [])}
        if not distributions & allowed:
            source = ", ".join(sorted(distributions)) or "no installed distribution"
            missing[module] = f"from {source}, imported by {', '.join(sorted(files))}"
    return missing


def test_the_reader_finds_what_the_processes_import() -> None:
    # Guards the test below against passing because it reads nothing.
    modules = third_party_imports(PROCESS_PACKAGES)
    assert {"aiormq", "pamqp", "asyncpg", "fastapi"} <= modules.keys()
    assert "taskbox/broker/pipeline.py" in modules["aiormq"]


def test_every_module_the_processes_import_is_a_declared_runtime_dependency() -> None:
    missing = undeclared(PROCESS_PACKAGES, declared(project()["runtime"]))
    assert not missing, f"declare these in [project] dependencies: {missing}"


def test_every_module_the_tests_and_benchmarks_import_is_declared() -> None:
    requirements = project()
    missing = undeclared(
        ("tests", "bench"),
        declared(requirements["runtime"]) | declared(requirements["dev"]),
        skip=PEER_SIDE,
    )
    assert not missing, f"declare these in the dev extra (or as runtime dependencies): {missing}"


def test_every_module_the_peer_processes_import_is_pinned_for_their_venv() -> None:
    # Their distributions are not installed here, so a module's distribution is taken
    # to share its name, as each of theirs does (celery, kombu, pgqueuer, uvicorn ...).
    lines = (PEERS / "requirements.txt").read_text().splitlines()
    pinned = declared([line for line in lines if line.strip() and not line.startswith("#")])
    imported = third_party_imports(("bench/peers",), skip=frozenset(PEERS.glob("*.py")) - PEER_SIDE)
    assert {"celery", "pgqueuer", "procrastinate"} <= imported.keys()
    missing = {m: sorted(files) for m, files in imported.items() if normalise(m) not in pinned}
    assert not missing, f"pin these in bench/peers/requirements.txt: {missing}"
