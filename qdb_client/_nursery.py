"""A nursery owned by a context manager, without wrapping the body's exception.

Since trio 0.25 a nursery wraps everything it propagates in an
ExceptionGroup, including an exception raised by the ``async with`` body.
For ``async with open_client(...) as client: raise KeyError`` the user must
see the KeyError, not a group. The driver's background tasks never raise,
so the body's exception is the only one that can come out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

__all__ = ["owned_nursery"]


@asynccontextmanager
async def owned_nursery(
    on_exit: Callable[[], Awaitable[None]],
) -> AsyncIterator[trio.Nursery]:
    """Yield a nursery; on exit await ``on_exit()`` (which must stop its tasks).

    An exception raised by the body comes out as itself.
    """
    raised: BaseException | None = None
    unwrapped: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as exc:
                raised = exc
                raise
            finally:
                await on_exit()
    except BaseExceptionGroup as group:
        if raised is None or len(group.exceptions) != 1 or group.exceptions[0] is not raised:
            raise
        unwrapped = raised
    if unwrapped is not None:
        # Raised outside the except block so its __context__ stays its own.
        raise unwrapped
