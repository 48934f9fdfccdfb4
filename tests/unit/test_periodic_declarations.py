"""Schedules declared in code: on a registry (``@task(schedule=...)``, ``periodic``),
carried by ``include`` and ``without``, and checked by the relay's scheduler against
the task types as the api checks an API schedule."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict

from taskbox import cron, every
from taskbox.relay.scheduler import InvalidCodeSchedule, declared_schedules
from taskbox.tasktypes import TaskContext, TaskRegistry


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str


def report_handler(payload: Report, ctx: TaskContext) -> None: ...


def test_a_task_with_a_schedule_declares_one_named_after_it() -> None:
    registry = TaskRegistry()
    registry.task(
        "report", Report, schedule=cron("0 6 * * 1-5", tz="Europe/Berlin"), payload={"kind": "d"}
    )(report_handler)
    (declared,) = declared_schedules(registry, default_max_attempts=3)
    assert (declared.name, declared.task_type, declared.cron, declared.timezone) == (
        "report",
        "report",
        "0 6 * * 1-5",
        "Europe/Berlin",
    )
    assert (declared.payload, declared.queue, declared.max_attempts) == (
        {"kind": "d"},
        "default",
        3,
    )


def test_a_bad_payload_or_a_payload_without_schedule_fails_at_import() -> None:
    registry = TaskRegistry()
    with pytest.raises(ValueError, match="kind"):
        registry.task("report", Report, schedule=every(60), payload={"nope": 1})
    with pytest.raises(ValueError, match="give schedule= too"):
        registry.task("report", Report, payload={"kind": "d"})
    with pytest.raises(ValueError, match="five fields"):
        cron("* * *")
    with pytest.raises(ValueError, match="unknown time zone"):
        cron("* * * * *", tz="Mars/Olympus")


def test_periodic_schedules_are_checked_against_the_types_when_loaded() -> None:
    registry = TaskRegistry()
    registry.periodic("nightly", "report", every(3600), {"kind": "n"}, max_attempts=7)
    with pytest.raises(InvalidCodeSchedule, match="no task type 'report'"):
        declared_schedules(registry, 3)
    registry.register("report", Report, report_handler, queue=("reports", "bulk"))
    (declared,) = declared_schedules(registry, 3)
    assert (declared.interval_seconds, declared.queue, declared.max_attempts) == (
        3600.0,
        "reports",
        7,
    )
    registry.periodic("wrong", "report", every(60), {"kind": 1})
    with pytest.raises(InvalidCodeSchedule, match="'wrong': invalid payload"):
        declared_schedules(registry, 3)


def test_a_schedule_name_is_declared_once_and_travels_with_its_type() -> None:
    first, second = TaskRegistry(), TaskRegistry()
    first.register("report", Report, report_handler)
    first.periodic("nightly", "report", every(60))
    with pytest.raises(ValueError, match="already declared"):
        first.periodic("nightly", "report", every(120))
    second.periodic("nightly", "report", every(30))
    combined = TaskRegistry()
    combined.include(first)
    with pytest.raises(ValueError, match="already declared"):
        combined.include(second)
    assert [p.name for p in combined.schedules()] == ["nightly"]
    assert combined.without(["report"]).schedules() == []
    with pytest.raises(ValueError, match="schedule name"):
        first.periodic("has space", "report", every(60))
