"""A nursery for background tasks, owned by a context manager.

Two problems solved here:

- Since trio 0.25 a nursery wraps everything it propagates in an
  ExceptionGroup, including an exception raised by the ``async with`` body.
  For ``async with open_client(...) as client: raise KeyError`` the user must
  see the KeyError, not a group. The driver's background tasks never raise,
  so the body's exception is the only one that can come out.
- Cancelling the background tasks (``client.aclose()`` inside the block)
  must not cancel the user's block. So the tasks live in an inner nursery,
  hosted by a task of the outer one, with its own cancel scope.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

__all__ = ["owned_nursery"]


@asynccontextmanager
async def owned_nursery(
    on_exit: Callable[[], Awaitable[None]],
) -> AsyncIterator[trio.Nursery]:
    """Yield a nursery for background tasks; on exit await ``on_exit()`` and
    cancel what is left in it.

    Cancelling the yielded nursery stops the background tasks only, never
    the block. An exception raised by the block comes out as itself.
    """
    raised: BaseException | None = None
    unwrapped: BaseException | None = None
    try:
        async with trio.open_nursery() as outer:
            background: trio.Nursery = await outer.start(_host)
            try:
                yield background
            except BaseException as exc:
                raised = exc
                raise
            finally:
                try:
                    await on_exit()
                finally:
                    background.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if raised is None or not _only(group, raised):
            raise
        unwrapped = raised
    if unwrapped is not None:
        # Raised outside the except block so its __context__ stays its own.
        raise unwrapped


def _only(group: BaseExceptionGroup, raised: BaseException) -> bool:
    """Whether ``group`` carries nothing but the block's own ``raised``.

    trio re-derives a group the block raised, so that case compares contents.
    """
    if len(group.exceptions) != 1:
        return False
    inner = group.exceptions[0]
    if inner is raised:
        return True
    return (
        isinstance(raised, BaseExceptionGroup)
        and isinstance(inner, BaseExceptionGroup)
        and list(inner.exceptions) == list(raised.exceptions)
    )


async def _host(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    # Shielded: an outside cancellation reaches the block, whose exit then
    # cancels this nursery itself; so the tasks' own Cancelled never joins
    # (and nests) the exception the block propagates.
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            task_status.started(nursery)
            await trio.sleep_forever()
