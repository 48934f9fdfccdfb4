"""The peer table ``make bench`` prints: one row a system, one column group a workload,
ratios where issue 14 sets targets, then the targets' verdicts."""

from __future__ import annotations

from typing import Any

Result = dict[str, Any]

# column key -> heading
COLUMNS = {
    "system": "system",
    "ingest": "ingest req/s",
    "ingest_x_bare": "x bare",
    "ingest_x_pgq": "x pgq",
    "drain": "drain jobs/s",
    "drain_x_pgq": "x pgq*",
    "cpu": "CPU ms/job: workers+pg+mq = total",
    "busy": "box busy",
    "start": "start p50 / p99 ms",
    "done": "done p50 / p99 ms",
}


def _row(**cells: str) -> tuple[str, ...]:
    return tuple(cells.get(key, "") for key in COLUMNS)


# issue 14's targets for Taskbox
DRAIN_VS_PGQUEUER = 1.0
INGEST_VS_BARE = 0.85
IN_PROCESS_P50_MS, IN_PROCESS_P99_MS, HTTP_P99_MS = 1.5, 3.0, 5.0


def _cpu(drain: Result) -> str:
    ms = drain["cpu_ms_per_job"]
    return f"{ms['workers']:.3f}+{ms['postgres']:.3f}+{ms['rabbitmq']:.3f} = {ms['total']:.3f}"


def rows(peers: Result, results: Result) -> list[tuple[str, ...]]:
    ingest, drain, latency = peers["ingest"]["req_s"], peers["drain"], peers["latency"]
    bare, pgq_ingest, pgq_drain = ingest["bare"], ingest["pgqueuer"], pgqueuer_drain(drain)
    versions = peers["versions"]
    names = {
        "taskbox": "Taskbox (latency: create in-process)",
        "pgqueuer": f"pgqueuer {versions['pgqueuer']}",
        "celery": f"Celery {versions['celery']} + RabbitMQ",
        "procrastinate": f"procrastinate {versions['procrastinate']}",
    }
    out = [tuple(COLUMNS.values())]

    def drain_cells(d: Result) -> dict[str, str]:
        return {
            "drain": f"{d['jobs_s']:,.0f}",
            "drain_x_pgq": f"{d['jobs_s'] / pgq_drain:.2f}x",
            "cpu": _cpu(d),
            "busy": f"{d['box_busy_cores']:.2f} cores",
        }

    def latency_cells(lat: Result) -> dict[str, str]:
        return {
            "start": f"{lat['start_p50_ms']:.1f} / {lat['start_p99_ms']:.1f}",
            "done": f"{lat['done_p50_ms']:.1f} / {lat['done_p99_ms']:.1f}",
        }

    for system, name in names.items():
        lat = latency[system]["in_process"] if system == "taskbox" else latency[system]
        out.append(
            _row(
                system=name,
                ingest=f"{ingest[system]:,.0f}",
                ingest_x_bare=f"{ingest[system] / bare:.2f}x",
                ingest_x_pgq=f"{ingest[system] / pgq_ingest:.2f}x",
                **drain_cells(drain[system]),
                **latency_cells(lat),
            )
        )
        if system == "taskbox":
            out.append(
                _row(
                    system="Taskbox (latency: POST over HTTP)",
                    **latency_cells(latency[system]["http"]),
                )
            )
        if system == "pgqueuer":
            out.append(
                _row(system="  pgqueuer, batch_size=100", **drain_cells(drain["pgqueuer_batch100"]))
            )
    out.append(
        _row(
            system="ceiling: FastAPI + asyncpg INSERT",
            ingest=f"{bare:,.0f}",
            ingest_x_bare="1.00x",
            ingest_x_pgq=f"{bare / pgq_ingest:.2f}x",
        )
    )
    # The aio-pika ceilings come from the consumer and e2e benchmarks of the same run.
    if consumer := results.get("consumer"):
        rate = consumer["baseline_msg_s"]
        out.append(
            _row(
                system="ceiling: aio-pika consume + ack",
                drain=f"{rate:,.0f}",
                drain_x_pgq=f"{rate / pgq_drain:.2f}x",
            )
        )
    if e2e := results.get("e2e"):
        b = e2e["baseline_aio_pika"]
        out.append(
            _row(
                system="ceiling: aio-pika publish -> deliver",
                start=f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f}",
            )
        )
    return out


def stages(peers: Result) -> list[tuple[str, ...]]:
    """Taskbox's latency run by stage (p50 / p99 ms) and its drain CPU by process."""
    lat, drain = peers["latency"]["taskbox"], peers["drain"]["taskbox"]
    out: list[tuple[str, ...]] = [("Taskbox, where the time goes", "in-process", "over HTTP")]
    for stage in lat["in_process"]["stages_p50_ms"]:
        p50, p99 = (
            (lat[way]["stages_p50_ms"][stage] for way in ("in_process", "http")),
            (lat[way]["stages_p99_ms"][stage] for way in ("in_process", "http")),
        )
        out.append(
            (f"  {stage} ms", *(f"{a:.1f} / {b:.1f}" for a, b in zip(p50, p99, strict=True)))
        )
    out.append(
        (
            "  t0 -> 201 received ms",
            "",
            f"{lat['http']['201_p50_ms']:.1f} / {lat['http']['201_p99_ms']:.1f}",
        )
    )
    split = ", ".join(f"{k} {v:.3f}" for k, v in drain["worker_cpu_ms_per_job"].items())
    out.append(("  drain CPU ms/job by process", split, ""))
    return out


def pgqueuer_drain(drain: Result) -> float:
    """The drain rate the target is set against: pgqueuer's better configuration."""
    return float(max(drain["pgqueuer"]["jobs_s"], drain["pgqueuer_batch100"]["jobs_s"]))


def verdicts(peers: Result) -> list[tuple[str, str, str, str]]:
    """(target, Taskbox's figure, the target, met or MISSED)."""
    ingest, drain, latency = peers["ingest"]["req_s"], peers["drain"], peers["latency"]["taskbox"]
    drain_ratio = drain["taskbox"]["jobs_s"] / pgqueuer_drain(drain)
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
