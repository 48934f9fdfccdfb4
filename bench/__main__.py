"""``python -m bench`` (``make bench``): run the benchmarks, print a table, save JSON.

python -m bench                  the full suite (several minutes)
python -m bench --quick          tiny counts, to check the suite still runs
python -m bench --only relay,consumer
BENCH_TRACING_BEFORE=<git ref> python -m bench --only tracing
                                 tracing off / on, and the api of <ref> (before tracing)
python -m bench --only peers     issue 14's peers (pgqueuer, Celery, procrastinate) alone
python -m bench --only waiters   1,000 long polls against 1,000 polling clients (issue 18)
python -m bench --only rates     CPU a task by process at 50 and 200 tasks/s (nothing batched)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import rates, scenarios, waiters
from bench.harness import machine
from bench.peers import suite as peer_suite
from bench.peers import table as peer_table

RESULTS = Path(__file__).parent / "results"

FULL: dict[str, dict[str, Any]] = {
    "ingest": {"seconds": 10},
    "tracing": {"seconds": 10, "relay_rows": 20_000, "rounds": 4},
    "notify": {"seconds": 5},
    "relay": {"rows": 50_000},
    "consumer": {"tasks": 20_000},
    "e2e": {"rate": 200, "seconds": 15, "sustained_seconds": 15},
    "memory": {"total": 100_000, "checkpoint": 10_000},
    # The slow pool (4 handlers) holds 200 x 2 s = 100 s of work: busy past every run.
    "isolation": {"rate": 100, "seconds": 15, "slow_tasks": 200, "slow_seconds": 2.0},
    "waiters": {"count": 1000, "idle": 5.0},
    "rates": {"rates": [50, 200], "seconds": 8},
    "peers": {
        "ingest_seconds": 10,
        "ingest_rounds": 2,
        "drain_jobs": 20_000,
        "rate": 200,
        "latency_seconds": 15,
        "warmup": 1.0,
    },
}
QUICK: dict[str, dict[str, Any]] = {
    "ingest": {"seconds": 2, "rounds": 1},
    "tracing": {"seconds": 1, "relay_rows": 1_000, "rounds": 1},
    "notify": {"seconds": 1},
    "relay": {"rows": 2_000},
    "consumer": {"tasks": 1_000},
    "e2e": {"rate": 100, "seconds": 2, "sustained_seconds": 2},
    "memory": {"total": 10_000, "checkpoint": 5_000},
    # 16 x 2 s on 4 handlers: 8 s of slow work against about 3 s of measurement
    "isolation": {"rate": 50, "seconds": 2, "slow_tasks": 16, "slow_seconds": 2.0},
    "waiters": {"count": 50, "idle": 1.0},
    "rates": {"rates": [50], "seconds": 1},
    # every peer still runs every workload, so the harness cannot rot unnoticed
    "peers": {
        "ingest_seconds": 1,
        "ingest_rounds": 1,
        "drain_jobs": 300,
        "rate": 100,
        "latency_seconds": 1,
        "warmup": 0.5,
    },
}
RUNNERS = {
    "ingest": scenarios.ingest,
    "tracing": scenarios.tracing_cost,
    "notify": scenarios.notify_placement,
    "relay": scenarios.relay_drain,
    "consumer": scenarios.consumer_drain,
    "e2e": scenarios.end_to_end,
    "memory": scenarios.memory,
    "isolation": scenarios.isolation,
    "waiters": waiters.waiters,
    "rates": rates.cpu_by_rate,
    "peers": peer_suite.peers,
}


def _rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, taskbox, baseline or target, verdict) lines of the summary table."""
    rows = []

    def add(figure: str, ours: str, against: str, ok: bool | None) -> None:
        rows.append((figure, ours, against, "" if ok is None else ("met" if ok else "MISSED")))

    if r := results.get("ingest"):
        add("ingest req/s", f"{r['taskbox_req_s']:,.0f}", f"{r['baseline_req_s']:,.0f} bare", None)
        add("  ratio", f"{r['ratio']:.2f}x", ">= 0.90x", r["ratio"] >= 0.9)
        add(
            f"batch create tasks/s ({r['batch_size']}/req)",
            f"{r['batch_tasks_s']:,.0f}",
            f"{r['batch_ratio']:.1f}x single (>= 20x)",
            r["batch_ratio"] >= 20,
        )
    if r := results.get("waiters"):
        lp, po = r["long_poll"], r["polling"]
        add(
            f"{r['clients']:,} waiters: api CPU s while waiting",
            f"{lp['api_cpu_s_while_waiting']:.2f} long poll",
            f"{po['api_cpu_s_while_waiting']:.2f} polling every {r['poll_interval_s']} s",
            lp["api_cpu_s_while_waiting"] < po["api_cpu_s_while_waiting"],
        )
        add(
            "  commit -> client sees DONE p50 / p99 ms",
            f"{lp['latency_ms_p50']:.1f} / {lp['latency_ms_p99']:.1f}",
            f"{po['latency_ms_p50']:.1f} / {po['latency_ms_p99']:.1f} polling",
            None,
        )
    if r := results.get("rates"):
        for rate, at in r["rates"].items():
            ms = at["cpu_ms_per_task"]
            add(
                f"CPU ms a task at {rate}/s (all processes, both servers)",
                f"{ms['total']:.2f}",
                f"relay {ms['relay']:.2f}, consumer {ms['consumer']:.2f}, "
                f"Postgres {ms['postgres']:.2f}, RabbitMQ {ms['rabbitmq']:.2f}; "
                f"{at['box_busy_cores']:.2f} cores busy",
                None,
            )
    if r := results.get("tracing"):
        rates, cpu = r["req_s"], r["api_cpu_ms_per_request"]
        add(
            "ingest req/s, tracing off",
            f"{rates['off']:,.0f}",
            f"{cpu['off']:.3f} ms CPU a request",
            None,
        )
        if "before" in rates:
            add(
                f"  the api before tracing ({r['before']})",
                f"{rates['before']:,.0f}",
                f"off {r['off_ratio_to_before']:.2f}x it; {cpu['before']:.3f} ms CPU",
                None,
            )
        add(
            "  tracing on (OTLP, every request)",
            f"{rates['on']:,.0f}",
            f"{r['on_ratio']:.2f}x off; {cpu['on']:.3f} ms CPU",
            None,
        )
        add(
            "  tracing on, 1 request in 10 sampled",
            f"{rates['sampled']:,.0f}",
            f"{r['sampled_ratio']:.2f}x off; {cpu['sampled']:.3f} ms CPU",
            None,
        )
        relay = r["relay"]
        add(
            "relay rows/s, tracing off / on",
            f"{relay['rows_s']['off']:,.0f} / {relay['rows_s']['on']:,.0f}",
            f"{relay['on_ratio']:.2f}x; CPU a row {relay['cpu_ms_per_row']['off']:.3f} / "
            f"{relay['cpu_ms_per_row']['on']:.3f} ms",
            None,
        )
    if r := results.get("notify"):
        c = r["commits_s"]
        add("commits/s, no NOTIFY", f"{c['no_notify']:,.0f}", "", None)
        add(
            "  NOTIFY in transaction",
            f"{c['notify_in_transaction']:,.0f}",
            f"{r['in_transaction_ratio']:.2f}x",
            None,
        )
        add(
            "  NOTIFY after commit",
            f"{c['notify_after_commit_coalesced']:,.0f}",
            f"{r['after_commit_ratio']:.2f}x (>= 0.90x)",
            r["after_commit_ratio"] >= 0.9,
        )
    if r := results.get("relay"):
        add(
            "relay rows/s",
            f"{r['relay_rows_s']:,.0f}",
            f"{r['baseline_msg_s']:,.0f} aio-pika",
            None,
        )
        add("  ratio", f"{r['ratio']:.2f}x", ">= 0.80x", r["ratio"] >= 0.8)
        add(
            "  ratio, baseline into a priority queue",
            f"{r['ratio_same_queue']:.2f}x",
            f"{r['baseline_priority_queue_msg_s']:,.0f} aio-pika",
            None,
        )
    if r := results.get("consumer"):
        add(
            "consumer tasks/s",
            f"{r['consumer_tasks_s']:,.0f}",
            f"{r['baseline_msg_s']:,.0f} aio-pika",
            r["consumer_tasks_s"] >= 3000,
        )
    if r := results.get("e2e"):
        b = r["baseline_aio_pika"]
        listen, poll = r["listen"], r["poll_only"]
        # The issue's measure: from the moment the client has its 201 to the handler
        # start. Then the server-side one, from the insert (its commit included).
        add(
            "201 -> start p50 ms",
            f"{listen['client_201_to_start_p50_ms']:.1f}",
            f"{b['p50_ms']:.1f} aio-pika (<= 3)",
            listen["client_201_to_start_p50_ms"] <= 3,
        )
        add(
            "201 -> start p99 ms",
            f"{listen['client_201_to_start_p99_ms']:.1f}",
            f"{b['p99_ms']:.1f} aio-pika (<= 10)",
            listen["client_201_to_start_p99_ms"] <= 10,
        )
        add(
            "insert -> start p50 / p99 ms",
            f"{listen['start_p50_ms']:.1f} / {listen['start_p99_ms']:.1f}",
            "",
            None,
        )
        add(
            "created -> DONE p99 ms",
            f"{listen['done_p99_ms']:.1f}",
            "<= 15",
            listen["done_p99_ms"] <= 15,
        )
        # Where the time goes, stage by stage (p50 / p99); see _latencies.
        for stage, label in (
            ("to_relay", "  insert -> relay claim"),
            ("relay_to_start", "  relay claim -> consumer claim"),
            ("start_to_done", "  consumer claim -> result"),
        ):
            p50, p99 = listen["stages_p50_ms"][stage], listen["stages_p99_ms"][stage]
            add(f"{label} ms", f"{p50:.1f} / {p99:.1f}", "p50 / p99", None)
        # With LISTEN off a row waits for the next poll (1 s), and the poll then hands
        # the consumer a second's worth of tasks at once, which it works through.
        add(
            "poll only: start p50 / p99 ms",
            f"{poll['start_p50_ms']:.0f} / {poll['start_p99_ms']:.0f}",
            "poll interval 1000 + burst",
            None,
        )
        add("sustained API -> DONE tasks/s", f"{r['sustained']['tasks_s']:,.0f}", "", None)
        for proc, ms in r["sustained"]["cpu_ms_per_task"].items():
            add(f"  CPU ms/task {proc}", f"{ms:.2f}", "", None)
    if r := results.get("memory"):
        add("relay RSS growth", f"{r['relay_growth']:+.1%}", "<= 10%", r["relay_growth"] <= 0.10)
        add(
            "consumer RSS growth",
            f"{r['consumer_growth']:+.1%}",
            "<= 10%",
            r["consumer_growth"] <= 0.10,
        )
    if r := results.get("isolation"):
        _isolation_rows(r, add)
    return rows


def _isolation_rows(r: dict[str, Any], add: Callable[[str, str, str, bool | None], None]) -> None:
    """Each run of the A B A B sequence, then each pair's ratio and the verdict."""
    pool = f"{r['slow_tasks']} x {r['slow_seconds']:g} s on slow:{r['slow_pool']}"
    add(f"queue isolation, default at {r['rate']:g}/s", "created -> DONE", "created -> start", None)
    for n, run in enumerate(r["runs"]):
        label = f"B {pool}" if run["slow_load"] else "A slow idle"
        add(
            f"  run {n + 1} {label}, p50 / p99 ms",
            f"{run['done_p50_ms']:.1f} / {run['done_p99_ms']:.1f}",
            f"{run['start_p50_ms']:.1f} / {run['start_p99_ms']:.1f}",
            None,
        )
        if run["slow_load"]:
            slow = run["slow"]
            add(
                "    slow pool: full in samples / running, waiting at end",
                f"{slow['full_share']:.0%} / {slow['processing_at_end']}, {slow['waiting_at_end']}",
                f"busy throughout: {slow['busy']}",
                slow["busy"],
            )
    for n, ratio in enumerate(r["ratios"]):
        add(
            f"  pair {n + 1}: B / A created -> DONE p99",
            f"{ratio['done_p99']:.2f}x",
            f"<= {r['target_ratio']:g}x (start p99 {ratio['start_p99']:.2f}x; "
            f"control, insert -> relay p99 {ratio['to_relay_p99']:.2f}x)",
            ratio["done_p99"] <= r["target_ratio"],
        )
    add("  A runs' p99, largest / smallest", f"{r['idle_p99_spread']:.2f}x", "the noise", None)


def _print_table(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


async def run(selected: list[str], quick: bool) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    report: dict[str, Any] = {"machine": await machine(), "quick": quick, "results": {}}
    m = report["machine"]
    durability = (
        f"synchronous_commit={m['postgres_synchronous_commit']}, fsync={m['postgres_fsync']}"
    )
    print(
        f"Python {m['python']}, PostgreSQL {m['postgres']} ({durability}), "
        f"RabbitMQ {m['rabbitmq']}, {m['cores']} cores, wrk {m['wrk']}",
        flush=True,
    )
    for name in selected:
        print(f"running {name} ...", flush=True)
        options: dict[str, Any] = dict(plan[name])
        if name == "tracing":
            options["before"] = os.environ.get("BENCH_TRACING_BEFORE", "")
        report["results"][name] = await RUNNERS[name](**options)  # type: ignore[operator]
    return report


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    parser.add_argument(
        "--only", default=",".join(RUNNERS), help="comma-separated: " + ",".join(RUNNERS)
    )
    args = parser.parse_args()
    selected = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in selected if s not in RUNNERS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(RUNNERS)}")
    report = asyncio.run(run(selected, args.quick))
    rows = _rows(report["results"])
    if rows:
        print()
        _print_table([("figure", "taskbox", "baseline / target", ""), *rows])
    if peers := report["results"].get("peers"):
        print("\nTaskbox beside its peers (issue 14), same run:\n")
        print(peer_table.render(peer_table.rows(peers, report["results"])))
        print("(x pgq*: against pgqueuer's faster drain of its two batch sizes)\n")
        print(peer_table.render(peer_table.stages(peers)))
        print()
        print(peer_table.render([("target", "taskbox", "", ""), *peer_table.verdicts(peers)]))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{scenarios.run_id()}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
