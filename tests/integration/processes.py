"""Real taskbox processes started by tests: ``python -m api|relay|consumer``, or any argv."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The process packages, run as python -m taskbox.<name>; any other module as named.
PROCESS_MODULES = frozenset({"api", "relay", "consumer", "db"})


def module_path(name: str) -> str:
    return f"taskbox.{name}" if name in PROCESS_MODULES else name


READY = {
    "api": "Application startup complete",
    "relay": "relay running",
    "consumer": "consuming from",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceProcess:
    """One process; its combined output is kept in ``lines`` for assertions.

    It runs ``python -m taskbox.module`` unless ``argv`` names another command (``taskbox relay``,
    say); ``module`` still picks the ready line.
    """

    def __init__(
        self,
        module: str,
        env: dict[str, str],
        argv: Sequence[str] | None = None,
        **extra_env: str,
    ) -> None:
        self.module = module
        self.cwd = ROOT  # the directory it starts in; a test may set another first
        self.argv = list(argv) if argv is not None else [sys.executable, "-m", module_path(module)]
        self.env = {**env, **extra_env}
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._seen = asyncio.Event()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            self._seen.set()

    async def wait_for(self, text: str, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not any(text in line for line in self.lines):
                if self.proc is not None and self.proc.returncode is not None:
                    raise AssertionError(f"{self.module} exited:\n{self.output}")
                self._seen.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await self._seen.wait()

    async def launch(self) -> ServiceProcess:
        """Start the process without waiting for it to be ready (see ``start``)."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def start(self, timeout: float = 20.0, until: str | None = None) -> ServiceProcess:
        """Start the process and wait for its ready line, or for ``until``."""
        await self.launch()
        try:
            await self.wait_for(until or READY[self.module], timeout)
        except TimeoutError:
            self.kill()
            raise AssertionError(f"{self.module} did not start:\n{self.output}") from None
        return self

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return code

    def kill(self) -> None:
        """SIGKILL: no cleanup, no ack, no commit."""
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return code


class CommandResult:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


async def run_command(
    module: str, args: list[str], env: dict[str, str], timeout: float = 60.0
) -> CommandResult:
    """``python -m taskbox.module args...`` to completion, as an operator runs a command."""
    argv = [sys.executable, "-m", module_path(module), *args]
    return await run_argv(argv, env, timeout=timeout)


async def run_argv(
    argv: Sequence[str], env: dict[str, str], cwd: Path = ROOT, timeout: float = 60.0
) -> CommandResult:
    """Any command to completion, its output kept."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        stdout, stderr = await proc.communicate()
    assert proc.returncode is not None
    return CommandResult(proc.returncode, stdout.decode(), stderr.decode())
