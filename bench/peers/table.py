"""The peer table ``make bench`` prints: one row a system, one column group a workload,
ratios where issue 14 sets targets, then the targets' verdicts."""

from __future__ import annotations

from typing import Any

Result = dict[str, Any]

HEADER = (
    "system",
    "ingest req/s",
    "x bare",
    "x pgq",
    "drain jobs/s",
    "x pgq",
    "CPU ms/job: workers+pg+mq = total",
    "start p50 / p99 ms",
    "done p50 / p99 ms",
)

# issue 14's targets for Taskbox
DRAIN_VS_PGQUEUER = 1.0
INGEST_VS_BARE = 0.85
IN_PROCESS_P50_MS, IN_PROCESS_P99_MS, HTTP_P99_MS = 1.5, 3.0, 5.0


def _cpu(drain: Result) -> str:
    ms = drain["cpu_ms_per_job"]
    return f"{ms['workers']:.3f}+{ms['postgres']:.3f}+{ms['rabbitmq']:.3f} = {ms['total']:.3f}"


def _lat(lat: Result | None) -> tuple[str, str]:
    if lat is None:
        return "", ""
    return (
        f"{lat['start_p50_ms']:.1f} / {lat['start_p99_ms']:.1f}",
        f"{lat['done_p50_ms']:.1f} / {lat['done_p99_ms']:.1f}",
    )


def rows(peers: Result, results: Result) -> list[tuple[str, ...]]:
    ingest, drain, latency = peers["ingest"]["req_s"], peers["drain"], peers["latency"]
    bare, pgq_ingest, pgq_drain = ingest["bare"], ingest["pgqueuer"], drain["pgqueuer"]["jobs_s"]
    versions = peers["versions"]
    names = {
        "taskbox": "Taskbox (create in-process)",
        "pgqueuer": f"pgqueuer {versions['pgqueuer']}",
        "celery": f"Celery {versions['celery']} + RabbitMQ",
        "procrastinate": f"procrastinate {versions['procrastinate']}",
    }
    out: list[tuple[str, ...]] = [HEADER]
    for system, name in names.items():
        out.append(
            (
                name,
                f"{ingest[system]:,.0f}",
                f"{ingest[system] / bare:.2f}x",
                f"{ingest[system] / pgq_ingest:.2f}x",
                f"{drain[system]['jobs_s']:,.0f}",
                f"{drain[system]['jobs_s'] / pgq_drain:.2f}x",
                _cpu(drain[system]),
                *_lat(latency[system]["in_process"] if system == "taskbox" else latency[system]),
            )
        )
        if system == "taskbox":
            out.append(
                (
                    "Taskbox (POST over HTTP)",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    *_lat(latency["taskbox"]["http"]),
                )
            )
    out.append(
        (
            "ceiling: FastAPI + asyncpg INSERT",
            f"{bare:,.0f}",
            "1.00x",
            f"{bare / pgq_ingest:.2f}x",
            "",
            "",
            "",
            "",
            "",
        )
    )
    # The aio-pika ceilings come from the consumer and e2e benchmarks of the same run.
    if consumer := results.get("consumer"):
        rate = consumer["baseline_msg_s"]
        out.append(
            (
                "ceiling: aio-pika consume + ack",
                "",
                "",
                "",
                f"{rate:,.0f}",
                f"{rate / pgq_drain:.2f}x",
                "",
                "",
                "",
            )
        )
    if e2e := results.get("e2e"):
        b = e2e["baseline_aio_pika"]
        out.append(
            (
                "ceiling: aio-pika publish -> deliver",
                "",
                "",
                "",
                "",
                "",
                "",
                f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f}",
                "",
            )
        )
    return out


def verdicts(peers: Result) -> list[tuple[str, str, str, str]]:
    """(target, Taskbox's figure, the target, met or MISSED)."""
    ingest, drain, latency = peers["ingest"]["req_s"], peers["drain"], peers["latency"]["taskbox"]
    drain_ratio = drain["taskbox"]["jobs_s"] / drain["pgqueuer"]["jobs_s"]
    ingest_ratio = ingest["taskbox"] / ingest["bare"]
    checks = [
        (
            "drain vs pgqueuer",
            f"{drain_ratio:.2f}x",
            f">= {DRAIN_VS_PGQUEUER:.1f}x",
            drain_ratio >= DRAIN_VS_PGQUEUER,
        ),
        (
            "ingest vs bare ceiling",
            f"{ingest_ratio:.2f}x",
            f">= {INGEST_VS_BARE}x",
            ingest_ratio >= INGEST_VS_BARE,
        ),
        (
            "in-process create -> start p50",
            f"{latency['in_process']['start_p50_ms']:.1f} ms",
            f"<= {IN_PROCESS_P50_MS} ms",
            latency["in_process"]["start_p50_ms"] <= IN_PROCESS_P50_MS,
        ),
        (
            "in-process create -> start p99",
            f"{latency['in_process']['start_p99_ms']:.1f} ms",
            f"<= {IN_PROCESS_P99_MS} ms",
            latency["in_process"]["start_p99_ms"] <= IN_PROCESS_P99_MS,
        ),
        (
            "POST -> start p99",
            f"{latency['http']['start_p99_ms']:.1f} ms",
            f"<= {HTTP_P99_MS} ms",
            latency["http"]["start_p99_ms"] <= HTTP_P99_MS,
        ),
    ]
    return [(name, ours, target, "met" if ok else "MISSED") for name, ours, target, ok in checks]


def render(table: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    )
