"""A nursery owned by a context manager, without wrapping the body's exception.

A trio nursery wraps whatever it propagates in an ExceptionGroup, including
an exception raised by the ``async with`` body. For
``async with open_node() as node: raise KeyError`` the caller must see the
KeyError itself. The node's background tasks never raise, so the body's
exception is the only one that can come out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

__all__ = ["owned_nursery"]


@asynccontextmanager
async def owned_nursery() -> AsyncIterator[trio.Nursery]:
    """Yield a nursery whose tasks are cancelled when the body exits.

    An exception raised by the body comes out as itself, not in a group.
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
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if raised is None or len(group.exceptions) != 1 or group.exceptions[0] is not raised:
            raise
        unwrapped = raised
    if unwrapped is not None:
        # Raised outside the except block so that its __context__ stays its own.
        raise unwrapped
