"""CPU accounting from /proc: the database's and the broker's processes, and the box.

The issue counts a task's CPU across every process it touches: the workers (read by
their own pid) and both servers. A server's share is the change, over the measured
window, of utime + stime summed over every ``postgres`` and every ``beam.smp`` process,
plus the CPU of children the root process reaped in the meantime (cutime + cstime of
the postmaster: a backend that disconnected inside the window still counts). Both servers
are shared with whatever else runs on the box; ``busy_seconds`` (all CPUs, /proc/stat)
over the same window shows how much of it was not ours.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVERS = {"postgres": "postgres", "beam.smp": "rabbitmq"}


def _stat(pid: str) -> tuple[str, int, list[int]] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None  # exited while we listed
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    # fields[1] is the parent pid; [11..14] utime, stime, cutime, cstime
    return name, int(fields[1]), [int(f) for f in fields[11:15]]


@dataclass(frozen=True)
class Snapshot:
    servers: dict[str, float]  # "postgres" / "rabbitmq" -> CPU seconds so far
    busy_seconds: float  # the whole box
    wall: float  # time.monotonic() at the snapshot; a difference's window

    def __sub__(self, before: Snapshot) -> Snapshot:
        return Snapshot(
            {k: v - before.servers.get(k, 0.0) for k, v in self.servers.items()},
            self.busy_seconds - before.busy_seconds,
            self.wall - before.wall,
        )

    @property
    def busy_cores(self) -> float:
        """Of a difference: how many cores the whole box kept busy, ours or not."""
        return self.busy_seconds / self.wall if self.wall else float("nan")


def snapshot() -> Snapshot:
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(entry)) is not None and stat[0] in SERVERS:
            procs[int(entry)] = stat
    servers = dict.fromkeys(SERVERS.values(), 0.0)
    for name, ppid, (utime, stime, cutime, cstime) in procs.values():
        ticks = utime + stime
        if ppid not in procs:  # the root: count what its exited children spent
            ticks += cutime + cstime
        servers[SERVERS[name]] += ticks / CLK_TCK
    return Snapshot(servers, _busy_seconds(), time.monotonic())


def _busy_seconds() -> float:
    # cpu  user nice system idle iowait irq softirq steal ...
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def process_seconds(pid: int) -> float:
    stat = _stat(str(pid))
    if stat is None:
        raise ProcessLookupError(pid)
    utime, stime, _, _ = stat[2]
    return (utime + stime) / CLK_TCK
