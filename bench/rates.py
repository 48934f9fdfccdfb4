"""CPU a task by arrival rate: what each process and server spends per task when tasks
arrive one by one at a fixed rate (``python -m bench --only rates``).

The drain benchmarks batch everything (a 500-row relay claim, a claim and an outcome
statement for a group of tasks); at a low rate nothing is batched: every task is a
drain of its own, a claim and an outcome of its own. This is the figure that bounds the
latency workload on a small box: at 200 tasks/s the CPU a task times the rate is how
much of the cores the pipeline needs before any task waits for a core.

One api, relay and consumer as the latency workload starts them; tasks created
in-process (the api's statement and wake-up), open loop, each rate after a one second
warm-up. CPU is each process's utime + stime and every Postgres and RabbitMQ process's,
over the rate's window (bench/peers/cpu.py); the api only LISTENs here (task events).
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.harness import stage, taskbox
from bench.peers import cpu
from bench.peers.suite import TIMED, _open_loop, in_process_creates
from bench.scenarios import _free_port


async def cpu_by_rate(rates: list[float], seconds: float) -> dict[str, Any]:
    measured: dict[str, Any] = {}
    async with stage("rates") as st:
        port = _free_port()
        procs = {
            "api": await taskbox(
                "api", st.env, API_PORT=str(port), API_ACCESS_LOG="false", **TIMED
            ).start(),
            "relay": await taskbox("relay", st.env).start(),
            "consumer": await taskbox("consumer", st.env, **TIMED).start(),
        }
        try:
            await asyncio.sleep(1.0)
            async with in_process_creates(st) as create:
                for rate in rates:
                    await _open_loop(rate, 1.0, create)  # warm-up
                    before = {name: p.cpu_seconds() for name, p in procs.items()}
                    servers_before = cpu.snapshot()
                    await _open_loop(rate, seconds, create)
                    await asyncio.sleep(0.2)  # the last tasks' outcomes
                    servers = cpu.snapshot() - servers_before
                    tasks = rate * seconds
                    ms = {n: 1000 * (p.cpu_seconds() - before[n]) / tasks for n, p in procs.items()}
                    ms.update({n: 1000 * s / tasks for n, s in servers.servers.items()})
                    ms["total"] = sum(ms.values())
                    measured[f"{rate:g}"] = {
                        "cpu_ms_per_task": ms,
                        "box_busy_cores": servers.busy_cores,
                    }
        finally:
            for process in procs.values():
                await process.stop()
    return {"seconds": seconds, "rates": measured}
