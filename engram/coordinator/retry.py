"""The one retry loop of the coordinator: calls that a shard restart can interrupt are tried again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import ray

from ..errors import ErrorCode, error_of

log = logging.getLogger("engram")
T = TypeVar("T")


def actor_down(exc: BaseException) -> bool:
    """A shard process died or is restarting."""
    return isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


def shard_failure(exc: BaseException) -> bool:
    """What retrying after the shards come back can fix: a shard died, or lost blocks staged before it died
    (STALE). Anything else (a refused request, a bug) is not retried."""
    err = error_of(exc)
    return err.code == ErrorCode.STALE if err is not None else actor_down(exc)


async def retry(
    call: Callable[[], Awaitable[T]],
    attempts: int,
    retryable: Callable[[BaseException], bool],
    between: Callable[[int, BaseException], Awaitable[None]] | None = None,
    what: str = "",
) -> T:
    """Run `call` up to `attempts` times while it fails with what `retryable` accepts; `between(attempt, exc)`
    runs before the next try (default: exponential backoff, 0.25 s doubling to 2 s). The last failure raises."""
    for attempt in range(attempts):
        try:
            return await call()
        except Exception as exc:
            if not retryable(exc) or attempt == attempts - 1:
                raise
            if what:
                log.warning("%s: attempt %d failed (%s); retrying", what, attempt + 1, type(exc).__name__)
            if between is not None:
                await between(attempt, exc)
            else:
                await asyncio.sleep(min(0.25 * 2**attempt, 2.0))
    raise AssertionError("attempts must be >= 1")
