"""api.grouping.GroupCommit: who goes alone, who waits and is grouped, what a failure does.

The writers here are plain coroutines that record their calls: the rule under test is
the grouping, not the statement (tests/integration/test_group_commit.py runs that).
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from taskbox.api.grouping import GroupCommit
from taskbox.db.errors import nothing_committed


class Refused(Exception):
    """A statement Postgres refused: nothing of it was committed."""


class Lost(Exception):
    """The connection went away during the commit: the outcome is unknown."""


class Writer:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()  # held shut, the first statement stays "in flight"
        self.gate.set()
        self.group_error: Exception | None = None

    async def one(self, item: str) -> str:
        self.calls.append([item])
        await self.gate.wait()
        if item.startswith("bad"):
            raise Refused(item)
        return item.upper()

    async def many(self, items: list[str]) -> list[str]:
        self.calls.append(list(items))
        await self.gate.wait()
        if self.group_error is not None:
            raise self.group_error
        if any(item.startswith("bad") for item in items):
            raise Refused(items)
        return [item.upper() for item in items]

    def groups(self, **options: int) -> GroupCommit[str, str]:
        return GroupCommit(self.one, self.many, lambda exc: isinstance(exc, Refused), **options)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def behind_one_in_flight(
    writer: Writer, items: str | tuple[str, ...]
) -> tuple[GroupCommit[str, str], asyncio.Task[str], list[asyncio.Task[str]]]:
    """One statement at a time: "a" goes out alone and stays in flight (the writer's
    gate is shut) while ``items`` arrive; returns the groups, "a"'s write and theirs."""
    writer.gate.clear()
    groups = writer.groups(max_in_flight=1)
    first = asyncio.create_task(groups.write("a"))
    await settle()
    assert writer.calls == [["a"]]
    later = [asyncio.create_task(groups.write(item)) for item in items]
    await settle()
    return groups, first, later


async def test_a_lone_write_goes_out_at_once_alone() -> None:
    writer = Writer()
    groups = writer.groups()
    assert await groups.write("a") == "A"
    assert writer.calls == [["a"]]


async def test_writes_that_arrive_while_statements_are_in_flight_share_the_next_one() -> None:
    writer = Writer()
    _, first, later = await behind_one_in_flight(writer, "bcd")
    assert writer.calls == [["a"]]  # nothing else goes out while "a" is in flight
    writer.gate.set()
    assert await first == "A"
    assert await asyncio.gather(*later) == ["B", "C", "D"]
    assert writer.calls == [["a"], ["b", "c", "d"]]


async def test_two_statements_may_be_in_flight_by_default() -> None:
    writer = Writer()
    writer.gate.clear()
    groups = writer.groups()
    tasks = [asyncio.create_task(groups.write("a"))]
    await settle()
    tasks += [asyncio.create_task(groups.write(item)) for item in "bc"]
    await settle()
    tasks += [asyncio.create_task(groups.write(item)) for item in "de"]
    await settle()
    assert writer.calls == [["a"], ["b", "c"]]
    writer.gate.set()
    assert await asyncio.gather(*tasks) == ["A", "B", "C", "D", "E"]
    assert writer.calls == [["a"], ["b", "c"], ["d", "e"]]


async def test_a_group_is_no_larger_than_max_size() -> None:
    writer = Writer()
    writer.gate.clear()
    groups = writer.groups(max_in_flight=1, max_size=2)
    tasks = [asyncio.create_task(groups.write(item)) for item in "abcde"]
    await settle()
    writer.gate.set()
    assert await asyncio.gather(*tasks) == ["A", "B", "C", "D", "E"]
    assert writer.calls == [["a", "b"], ["c", "d"], ["e"]]


async def test_a_refused_group_is_written_again_item_by_item() -> None:
    writer = Writer()
    _, first, later = await behind_one_in_flight(writer, ("b", "bad", "c"))
    writer.gate.set()
    assert await first == "A"
    results = await asyncio.gather(*later, return_exceptions=True)
    assert results[0] == "B" and results[2] == "C"
    assert isinstance(results[1], Refused)
    assert writer.calls[1] == ["b", "bad", "c"]
    assert sorted(map(tuple, writer.calls[2:])) == [("b",), ("bad",), ("c",)]


async def test_an_unknown_outcome_goes_to_every_write_of_the_group_and_nothing_is_retried() -> None:
    writer = Writer()
    writer.group_error = Lost("connection lost during the commit")
    _, first, later = await behind_one_in_flight(writer, "bc")
    writer.gate.set()
    assert await first == "A"
    results = await asyncio.gather(*later, return_exceptions=True)
    assert all(result is writer.group_error for result in results)
    assert writer.calls == [["a"], ["b", "c"]]  # retrying could have stored b or c twice


async def test_a_write_cancelled_before_its_group_went_out_is_not_written() -> None:
    writer = Writer()
    _, first, (gone, kept) = await behind_one_in_flight(writer, "bc")
    gone.cancel()
    writer.gate.set()
    assert await first == "A"
    assert await kept == "C"
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert writer.calls == [["a"], ["c"]]


async def test_close_waits_for_the_statements_in_flight() -> None:
    writer = Writer()
    writer.gate.clear()
    groups = writer.groups()
    pending = asyncio.create_task(groups.write("a"))
    await settle()
    closing = asyncio.create_task(groups.close())
    await settle()
    assert not closing.done()
    writer.gate.set()
    await closing
    assert pending.done() and pending.result() == "A"


@pytest.mark.parametrize(
    ("error", "retried_alone"),
    [
        (asyncpg.CheckViolationError("refused by a constraint"), True),
        (asyncpg.UntranslatableCharacterError("refused by the server"), True),
        (asyncpg.exceptions._base.DataError("an argument asyncpg cannot encode"), True),
        (asyncpg.ConnectionDoesNotExistError("lost during the commit"), False),
        (ConnectionResetError("reset"), False),
        (asyncpg.AdminShutdownError("terminated"), False),
        (TimeoutError(), False),
        (KeyError("after the reply"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_only_an_error_that_proves_nothing_was_committed_retries_a_group_alone(
    error: Exception, retried_alone: bool
) -> None:
    assert nothing_committed(error) is retried_alone
