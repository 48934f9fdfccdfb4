"""A PostgreSQL cluster of a test's own, on loopback: its own data directory, port and
socket directory, so a test can crash it (``pg_ctl stop -m immediate``: no checkpoint,
no flush of what is still in Postgres's WAL buffers; what it already handed to the OS
survives, unlike a power cut) and start it again, which the machine's own server
must never go through. Durable settings as in production: ``fsync`` and
``synchronous_commit`` on.

A cluster can also be a primary with a streaming standby of its own (``standby()``:
pg_basebackup -R with a replication slot), which a test kills with SIGKILL (``kill()``:
the postmaster and every child, as a machine failure) and replaces by promoting the
standby (``promote()``), as Patroni or a managed service would.

Run as root (the CI), the server runs as the ``postgres`` user, as initdb demands.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.integration.processes import free_port


def _bin_dir() -> Path:
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
    if out.returncode == 0 and (Path(out.stdout.strip()) / "initdb").exists():
        return Path(out.stdout.strip())
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries (initdb) on this machine")
    return found[-1].parent


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a postmaster's backends and workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")"
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


class OwnPostgres:
    def __init__(self, name: str = "primary", **settings: str) -> None:
        """``name`` is its cluster_name, which a standby reports to its primary as its
        application_name (what ``synchronous_standby_names`` lists); ``settings`` are
        server settings on its command line."""
        self.bin = _bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix=f"taskbox-pg-{name}-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.name = name
        self.settings = {"cluster_name": name, **settings}
        self.as_postgres = os.geteuid() == 0  # initdb refuses to run as root

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)

    @property
    def host(self) -> str:
        """``host:port``, one entry of a DSN's list of hosts."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}/taskbox"

    def _own_root(self) -> None:
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def create(self) -> None:
        self._own_root()
        # initdb's pg_hba.conf trusts local replication connections too (pg_basebackup).
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start()

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=on -c synchronous_commit=on -c max_connections=200"
        )
        options += "".join(f" -c {key}={value}" for key, value in self.settings.items())
        log = str(self.root / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def crash(self) -> None:
        """Stop at once: what the WAL had not flushed is gone."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def standby(self, name: str = "standby") -> OwnPostgres:
        """A hot standby of this (running) cluster, streaming through a replication slot
        of its own, started. Whether its commits wait for it is the primary's
        ``synchronous_standby_names``, which names it by ``name``."""
        replica = OwnPostgres(name)
        replica._own_root()
        # -R writes primary_conninfo and standby.signal, -C -S the slot (so the primary
        # keeps the WAL the standby has not received yet).
        self._run(
            "pg_basebackup",
            *("-D", str(replica.data), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"),
            *("-R", "-C", "-S", name, "-X", "stream", "--checkpoint=fast"),
        )
        replica.start()
        return replica

    def wal_sender(self, standby: str) -> int:
        """The pid of the process streaming this primary's WAL to ``standby``."""
        out = self._run(
            "psql", "-h", str(self.root), "-p", str(self.port), "-U", "postgres", "-d", "postgres",
            "-Atc", f"SELECT pid FROM pg_stat_replication WHERE application_name = '{standby}'",
        )  # fmt: skip
        return int(out.stdout.strip())

    def wal_record_stats(self, start: str, end: str) -> str:
        """``pg_waldump --stats=record`` of the WAL between two LSNs (bench/pg_cost.py)."""
        pg_wal = str(self.data / "pg_wal")
        return self._run(
            "pg_waldump", "--stats=record", "-p", pg_wal, "-s", start, "-e", end
        ).stdout

    def promote(self) -> None:
        """End recovery: this standby becomes a primary that accepts writes."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "promote")

    def kill(self) -> None:
        """SIGKILL the postmaster and all its children at once, as when the machine
        dies: no shutdown, no reply to a commit waiting for its standby."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        children = _children(pid)  # before the kill: orphans are re-parented
        for victim in (pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)

    def kill_and_restart(self) -> None:
        """``kill()``, then start again once every process of the old server is gone (a
        start while one lingers would find the data directory in use)."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        victims = [pid, *_children(pid)]
        self.kill()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{victim}").exists() for victim in victims):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the killed server's processes are still there: {victims}")
            time.sleep(0.05)
        self.start()

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self.crash()
        shutil.rmtree(self.root, ignore_errors=True)
