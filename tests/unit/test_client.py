"""taskbox.client's decisions without a server: retries, pauses, parsing, the twins."""

from __future__ import annotations

import inspect
import subprocess
import sys
from datetime import UTC, datetime

import httpx
import pytest

from taskbox.client import (
    AsyncClient,
    Client,
    NewTask,
    RetryPolicy,
    ServiceUnavailable,
    TransportError,
    _core,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def answer(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers)


GET = _core.get_call("0b6f5a8e-3c1d-4a51-9d7e-2f1c9b0e7a11")
BATCH = _core.create_many_call([{"type": "echo"}])


def test_503_waits_its_retry_after_up_to_the_cap() -> None:
    attempts = _core.Attempts(RetryPolicy(max_retry_after=5.0), GET, Clock())
    assert attempts.after_response(answer(503, **{"Retry-After": "2"})) == 2.0
    assert attempts.after_response(answer(503, **{"Retry-After": "3600"})) == 5.0
    assert attempts.after_response(answer(200)) is None
    assert attempts.after_response(answer(500)) is None


def test_503_without_retry_after_backs_off_exponentially() -> None:
    attempts = _core.Attempts(RetryPolicy(backoff=0.1, max_backoff=0.3), GET, Clock())
    delays = [attempts.after_response(answer(503)) for _ in range(4)]
    assert delays == [0.1, 0.2, 0.3, 0.3]


def test_attempts_and_elapsed_time_are_bounded() -> None:
    attempts = _core.Attempts(RetryPolicy(max_attempts=3), GET, Clock())
    assert attempts.after_response(answer(503)) is not None
    assert attempts.after_response(answer(503)) is not None
    assert attempts.after_response(answer(503)) is None  # the third attempt was the last

    clock = Clock()
    late = _core.Attempts(RetryPolicy(max_elapsed=10.0), GET, clock)
    clock.now += 9.5
    assert late.after_response(answer(503, **{"Retry-After": "1"})) is None


def test_a_request_that_may_have_been_sent_is_repeated_only_when_safe() -> None:
    read_error = httpx.ReadError("lost")
    assert _core.Attempts(RetryPolicy(), GET, Clock()).after_error(read_error) > 0
    create = _core.create_call(NewTask(type="echo"), None)
    assert _core.Attempts(RetryPolicy(), create, Clock()).after_error(read_error) > 0

    batch = _core.Attempts(RetryPolicy(), BATCH, Clock())
    assert batch.after_error(httpx.ConnectError("refused")) > 0  # nothing was sent
    with pytest.raises(TransportError, match="not safe to repeat") as raised:
        batch.after_error(read_error)
    assert raised.value.__cause__ is read_error
    assert batch.after_response(answer(503, **{"Retry-After": "1"})) is None


def test_every_create_has_its_own_idempotency_key_unless_given() -> None:
    task = NewTask(type="echo", payload={"x": 1}, run_at=datetime(2030, 1, 1, tzinfo=UTC))
    first, second = _core.create_call(task, None), _core.create_call(task, None)
    assert first.headers["Idempotency-Key"] != second.headers["Idempotency-Key"]
    assert _core.create_call(task, "mine").headers == {"Idempotency-Key": "mine"}
    assert first.json == {
        "type": "echo",
        "payload": {"x": 1},
        "priority": 0,
        "run_at": "2030-01-01T00:00:00Z",
    }


def test_list_query_sends_the_api_parameters() -> None:
    query = _core.ListQuery(
        status=["DONE", "FAILED"],
        type="echo",
        created_after=datetime(2026, 1, 1, tzinfo=UTC),
        page_size=10,
        view="full",
    )
    assert str(query.call("abc").params) == (
        "status=DONE&status=FAILED&type=echo&created_after=2026-01-01T00%3A00%3A00%2B00%3A00"
        "&limit=10&view=full&cursor=abc"
    )
    assert (
        str(_core.ListQuery(status="NEW").call(None).params) == "status=NEW&limit=50&view=summary"
    )


def test_an_answer_that_is_no_problem_document_still_raises_one() -> None:
    plain = httpx.Response(503, text="Service Unavailable", headers={"x-request-id": "r1"})
    with pytest.raises(ServiceUnavailable) as raised:
        _core.parse(plain, NewTask)
    assert raised.value.problem.status == 503
    assert raised.value.problem.detail == "Service Unavailable"
    assert raised.value.request_id == "r1"


def test_wait_schedule_polls_less_and_less_until_the_deadline() -> None:
    clock = Clock()
    schedule = _core.WaitSchedule(2.0, first=0.5, factor=2.0, longest=1.0, clock=clock)
    pauses = []
    while (pause := schedule.pause()) is not None:
        pauses.append(pause)
        clock.now += pause
    assert pauses == [0.5, 1.0, 0.5]


def test_the_sync_client_has_the_async_clients_methods() -> None:
    def methods(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")
        }

    ours, theirs = methods(Client), methods(AsyncClient)
    theirs["close"] = theirs.pop("aclose")
    assert ours.keys() == theirs.keys()
    for name, signature in ours.items():
        assert signature.parameters.keys() == theirs[name].parameters.keys(), name


def test_the_client_imports_nothing_of_the_server() -> None:
    server = ("api", "db", "relay", "consumer", "broker", "runtime", "tasktypes")
    prefixes = [("taskbox", name) for name in server]
    code = (
        "import sys, taskbox.client; "
        f"print(sorted(m for m in sys.modules if tuple(m.split('.')[:2]) in {prefixes!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_wait_plan_long_polls_for_what_is_left_within_the_read_timeout() -> None:
    now = [0.0]
    plan = _core.WaitPlan(60.0, read_timeout=10.0, clock=lambda: now[0])
    assert plan.next_wait() == 9.0  # a second under the read timeout
    assert plan.pause(asked=9.0, took=9.0) == 0.0  # a long poll that ran out: ask again
    now[0] = 55.0
    assert plan.next_wait() == 5.0
    now[0] = 60.0
    assert plan.pause(asked=5.0, took=5.0) is None
    unbounded = _core.WaitPlan(600.0, read_timeout=None, clock=lambda: now[0])
    assert unbounded.next_wait() == _core.LONG_POLL


def test_wait_plan_pauses_when_the_api_does_not_hold_the_request() -> None:
    now = [0.0]
    plan = _core.WaitPlan(10.0, read_timeout=30.0, clock=lambda: now[0])
    # Answered at once though asked to wait: an api without long polls; poll politely.
    pause = plan.pause(asked=plan.next_wait(), took=0.01)
    assert pause is not None and pause > 0
