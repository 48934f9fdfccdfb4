"""Built-in task types: echo, sleep, sha256 and fail, for demos and drills.

Every process that loads the registry imports them; ``BUILTIN_TASK_TYPES=false`` leaves
them out of what the api accepts and the consumer runs (``tasktypes.load_registry``).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

from taskbox.tasktypes.registry import PermanentError, TaskContext, task


class EchoPayload(RootModel[dict[str, Any]]):
    """Any JSON object."""


@task("echo", EchoPayload)
async def echo(payload: EchoPayload, ctx: TaskContext) -> dict[str, Any]:
    """Return the payload unchanged as the result."""
    return payload.root


# Below the consumer's default HANDLER_TIMEOUT (300 s): a longer sleep could only time
# out and be retried until its attempts ran out. A lower HANDLER_TIMEOUT still applies
# (the tests drill timeouts with it).
MAX_SLEEP_SECONDS = 60


class SleepPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(
        ge=0, le=MAX_SLEEP_SECONDS, description=f"How long to sleep, at most {MAX_SLEEP_SECONDS} s."
    )


@task("sleep", SleepPayload)
async def sleep(payload: SleepPayload, ctx: TaskContext) -> dict[str, float]:
    await asyncio.sleep(payload.seconds)
    return {"slept": payload.seconds}


class Sha256Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(max_length=1_000_000, description="Text to hash, UTF-8 encoded.")


@task("sha256", Sha256Payload)
async def sha256(payload: Sha256Payload, ctx: TaskContext) -> dict[str, str]:
    return {"sha256": hashlib.sha256(payload.text.encode()).hexdigest()}


class FailPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str = Field("drill", max_length=1000)
    retryable: bool = Field(True, description="False fails the task without further attempts.")
    succeed_on_attempt: int | None = Field(
        None, ge=1, description="Succeed from this attempt on (to drill retries)."
    )


class DrillFailure(Exception):
    """The error the fail task raises on purpose."""


@task("fail", FailPayload)
async def fail(payload: FailPayload, ctx: TaskContext) -> dict[str, int]:
    if payload.succeed_on_attempt is not None and ctx.attempt >= payload.succeed_on_attempt:
        return {"succeeded_on_attempt": ctx.attempt}
    if not payload.retryable:
        raise PermanentError(payload.message)
    raise DrillFailure(payload.message)


# The types this module registers, which BUILTIN_TASK_TYPES=false leaves out.
NAMES = frozenset({"echo", "sleep", "sha256", "fail"})
