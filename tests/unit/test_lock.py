"""One source of versions: the environment the tests run in has every package pinned in
requirements.lock at exactly its version, as the image does (the Dockerfile installs
the lock; `make install` installs the dev venv with it as constraints). A venv that
drifted, or a lock left behind after a dependency changed, fails here instead of
testing versions the image never runs."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parents[2] / "requirements.lock"


def pins() -> dict[str, str]:
    pinned = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, separator, version = line.partition("==")
            assert separator, f"requirements.lock: {line!r} is not pinned with =="
            pinned[name.strip()] = version.strip()
    return pinned


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def test_every_locked_package_is_installed_at_its_locked_version() -> None:
    pinned = pins()
    assert "uvicorn" in pinned
    drift = {
        name: f"locked {version}, installed {installed(name) or 'nothing'}"
        for name, version in pinned.items()
        if installed(name) != version
    }
    assert not drift, (
        f"this environment differs from requirements.lock: {drift}; run `make install` "
        "(installs with the lock as constraints), or `make lock` if the lock is behind"
    )
