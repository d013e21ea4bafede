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
        if raised is None or len(group.exceptions) != 1 or group.exceptions[0] is not raised:
            raise
        unwrapped = raised
    if unwrapped is not None:
        # Raised outside the except block so its __context__ stays its own.
        raise unwrapped


async def _host(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()
