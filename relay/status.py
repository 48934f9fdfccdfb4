"""``taskbox status``: one screen on the state of the pipeline.

Task counts by status, the outbox backlog and its lag, the task queue and the
dead-letter queue (asked with a passive declare, which creates nothing). Exit status 0
when Postgres and RabbitMQ both answered, 1 otherwise; ``--json`` for scripts.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import orjson

from taskbox.broker import connection as broker_connection
from taskbox.broker.nodes import where
from taskbox.db import overview, queues, schedules
from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.db.pool import connect
from taskbox.db.states import TaskStatus
from taskbox.relay.settings import RelaySettings
from taskbox.runtime.durations import format_duration
from taskbox.runtime.queues import DEFAULT_QUEUE, amqp_queue_name

_BROKER_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class QueueState:
    name: str
    messages: int | None  # ready messages; None when it could not be asked
    consumers: int | None
    problem: str | None = None
    reachable: bool = True  # False: the broker did not answer


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: datetime
    tasks: dict[str, int] | None
    oldest_pending: float | None
    backlog: overview.Backlog | None
    outbox_table: overview.TableSize | None
    last_publish_error: str | None
    database_problem: str | None
    queues: list[queues.QueueView] | None  # the Taskbox queues, from Postgres
    queue: QueueState  # the default queue's AMQP queue (QUEUE_NAME)
    dead_letters: QueueState
    # The AMQP queue of every other Taskbox queue in use, in the order of ``queues``
    named_queues: list[QueueState] = field(default_factory=list)
    schedules: list[schedules.ScheduleSummary] | None = None
    scheduler: str | None = None  # the leading scheduler's session name


def _where(url: str) -> str:
    """host:port/path of a URL, without user or password. The authority is shown as
    written, so a DATABASE_URL listing a primary and its standbys (h1:p1,h2:p2) shows
    them all (urlsplit's port would raise on the list)."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    return f"{hosts}{parts.path if parts.path not in ('', '/') else ''}"


def _problem(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _database(settings: RelaySettings) -> dict[str, Any]:
    try:
        conn = await connect(settings)
    except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
        return {"database_problem": _problem(exc)}
    try:
        return {
            "tasks": await overview.task_counts(conn),
            "oldest_pending": await overview.oldest_pending_age(conn),
            "backlog": await overview.backlog(conn),
            "outbox_table": await overview.outbox_size(conn),
            "last_publish_error": await overview.last_publish_error(conn),
            "queues": await queues.list_queues(conn),
            "schedules": await schedules.summaries(conn),
            "scheduler": await schedules.scheduler_leader(conn),
        }
    except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
        return {"database_problem": _problem(exc)}
    finally:
        await conn.close()


async def _queues(settings: RelaySettings, named: list[str]) -> list[QueueState]:
    """The default queue's AMQP queue, the dead letters', then each of ``named``'s."""
    names = [
        settings.queue_name,
        settings.dead_letter_queue,
        *(amqp_queue_name(settings.queue_name, queue) for queue in named),
    ]
    try:
        connection = await broker_connection.connect(
            settings.amqp_urls, connect_timeout=_BROKER_TIMEOUT
        )
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
        problem = _problem(exc)
        return [QueueState(name, None, None, problem, reachable=False) for name in names]
    states = []
    async with connection:
        for name in names:
            # A passive declare of a missing queue closes the channel: one channel each.
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                states.append(QueueState(name, None, None, "does not exist (yet)"))
                continue
            except (TimeoutError, aio_pika.exceptions.AMQPError) as exc:
                states.append(QueueState(name, None, None, _problem(exc), reachable=False))
                continue
            result = declared.declaration_result
            states.append(QueueState(name, result.message_count, result.consumer_count))
            await channel.close()
    return states


async def snapshot(settings: RelaySettings) -> Snapshot:
    database = await _database(settings)
    named = [q.name for q in database.get("queues") or [] if q.name != DEFAULT_QUEUE]
    queue, dead, *others = await _queues(settings, named)
    return Snapshot(
        at=datetime.now(UTC),
        tasks=database.get("tasks"),
        oldest_pending=database.get("oldest_pending"),
        backlog=database.get("backlog"),
        outbox_table=database.get("outbox_table"),
        last_publish_error=database.get("last_publish_error"),
        database_problem=database.get("database_problem"),
        queues=database.get("queues"),
        queue=queue,
        dead_letters=dead,
        named_queues=others,
        schedules=database.get("schedules"),
        scheduler=database.get("scheduler"),
    )


def _size(count: int) -> str:
    size = float(count)
    for unit in ("B", "kB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def render(snap: Snapshot, settings: RelaySettings) -> str:
    lines = [
        f"Taskbox  {snap.at:%Y-%m-%d %H:%M:%S} UTC   postgres {_where(settings.database_url)}"
        f"   rabbitmq {','.join(where(url) for url in settings.amqp_urls)}",
        "",
    ]
    if snap.database_problem is not None:
        lines.append(f"postgres      UNREACHABLE: {snap.database_problem}")
    else:
        assert snap.tasks is not None
        assert snap.backlog is not None
        assert snap.outbox_table is not None
        counts = "  ".join(f"{s.value} {snap.tasks.get(s.value, 0):,}" for s in TaskStatus)
        lines.append(f"tasks         {counts}   (total {sum(snap.tasks.values()):,})")
        if snap.oldest_pending is not None:
            lines.append(
                f"              oldest PENDING waits {format_duration(snap.oldest_pending)}"
                "  (lost by the broker? taskbox replay --stale-for ...)"
            )
        b = snap.backlog
        lines.append(
            f"outbox        backlog {b.rows:,} rows ({b.due:,} due, {b.rows - b.due:,} waiting "
            f"for their time), lag {format_duration(b.lag)}, failing {b.failing:,}"
        )
        if b.parked:
            lines.append(f"              parked {b.parked:,} rows of paused queues")
        if snap.last_publish_error:
            lines.append(f"              last publish error: {snap.last_publish_error}")
        lines.append(
            f"              table ~{snap.outbox_table.estimated_rows:,} rows, "
            f"{_size(snap.outbox_table.bytes)} (published rows kept "
            f"{format_duration(settings.outbox_retention)}: OUTBOX_RETENTION)"
        )
        lines += _queue_lines(snap.queues or [])
        lines += _schedule_lines(snap.schedules or [], snap.scheduler, snap.at)
    amqp = [("amqp queues", snap.queue), *(("", q) for q in snap.named_queues)]
    for label, queue in (*amqp, ("dead letters", snap.dead_letters)):
        if queue.problem is not None:
            lines.append(f"{label:<13} {queue.name}: {queue.problem}")
        else:
            lines.append(
                f"{label:<13} {queue.name}: {queue.messages:,} ready, {queue.consumers:,} consumers"
            )
    return "\n".join(lines)


def _queue_lines(found: list[queues.QueueView]) -> list[str]:
    """One line per Taskbox queue."""
    return [
        f"{'queues' if position == 0 else '':<13} {queue_line(q)}"
        for position, q in enumerate(found)
    ]


def queue_line(q: queues.QueueView) -> str:
    """A queue on one line; one with work and no consumer says so, a paused one by whom
    and why."""
    oldest = (
        ""
        if q.oldest_waiting_seconds is None
        else f", oldest waits {format_duration(q.oldest_waiting_seconds)}"
    )
    unserved = (
        "  (NO CONSUMER: see CONSUMER_QUEUES)"
        if q.waiting and not q.consumers and not q.paused
        else ""
    )
    paused = (
        f"  PAUSED by {q.paused_by} {q.paused_at:%Y-%m-%d %H:%M} UTC: {q.pause_reason}"
        if q.paused and q.paused_at is not None
        else ""
    )
    return (
        f"{q.name}: {q.waiting:,} waiting, {q.running:,} running, "
        f"{q.consumers:,} consumers{oldest}{unserved}{paused}"
    )


def _schedule_lines(
    found: list[schedules.ScheduleSummary], leader: str | None, now: datetime
) -> list[str]:
    """One line per schedule with its next fire time, soonest first."""
    if not found:
        return []
    led = f"led by {leader}" if leader else "NO SCHEDULER LEADS (is a relay running?)"
    lines = [f"schedules     {len(found)}, {led}"]
    for s in found:
        if s.paused:
            when = "PAUSED"
        else:
            late = (now - s.next_fire_at).total_seconds()
            due = f" (due {format_duration(late)} ago)" if late > 5 else ""
            when = f"next {s.next_fire_at:%Y-%m-%d %H:%M:%S} UTC{due}"
        lines.append(f"{'':<13} {s.name}: {s.task_type}, {s.timing}, {when} [{s.source}]")
    return lines


def healthy(snap: Snapshot) -> bool:
    return snap.database_problem is None and snap.queue.reachable and snap.dead_letters.reachable


async def status(settings: RelaySettings, as_json: bool = False, out: TextIO = sys.stdout) -> int:
    snap = await snapshot(settings)
    if as_json:
        out.write(orjson.dumps(asdict(snap), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(render(snap, settings) + "\n")
    return 0 if healthy(snap) else 1
