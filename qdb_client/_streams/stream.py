"""Result streams: ``async with client.stream(sql) as rows: async for row in rows``.

A stream is one ``query_stream`` request whose result the node spools in the
cluster's shared store before page 0, then sends page by page as credit
allows (docs/protocol.md section 12). The driver keeps at most ``credit``
pages buffered or on their way, granting more as the application takes
them, so memory is bounded by the window whatever the result's size.

Every page is checked as it arrives (:mod:`.checks`): its ``seq``, its rows'
width, the credit, and at STREAM_END the row count and the SHA-256 of every
row's bytes. A stream that contradicts itself raises
:class:`~qdb_client.errors.StreamCorrupted`, never wrong rows in silence.

When the connection or the node is lost mid-stream (ConnectionLost, a
GOAWAY, an ERROR saying the node can't go on, or silence: no page within
``stream_page_timeout`` while credit is outstanding), the stream resumes on
any node with ``resume_stream`` and the token of the last page it received:
pages already buffered are kept, the next page is the one after, so nothing
is missing or repeated, and the digest still covers the whole stream.
Resuming follows :class:`~qdb_client._policies.resume.ResumePolicy`
(backoff, ``stream_max_resumes`` attempts without progress, the stream's
``timeout`` if given); when it is impossible (the token expired) the error
says so and what was delivered (:class:`~qdb_client.errors.StreamResumeFailed`).

Stopping a stream's request on the node deletes its spool (CANCEL), so an
attempt abandoned in order to resume is never cancelled: a silent node's
connection is closed instead, which keeps the spool. Leaving the block
before the end CANCELs the stream; after STREAM_END a CANCEL releases the
spool at once (else it expires after the node's ``stream_retention``).
Leaving it while no request carries the stream (waiting to resume, or
after its connection died) can't CANCEL anything: a background task of the
client resumes the stream on any node and CANCELs it at its first frame,
which deletes the spool; it gives up after a few seconds (the spool then
expires), and the block's exit never waits for it.

One task consumes a stream: a second task asking for a row or page while
the first waits for one raises :class:`~qdb_client.errors.InvalidArgument`.

This module is the consumer side (the public API, the buffer, closing and
releasing the spool); starting and resuming the stream's requests and the
frames their connections feed in are :class:`.stream_attempts.StreamAttempts`,
which ``ResultStream`` inherits.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

import trio

from .._arguments import statement_args
from .._policies import Outcome, classify
from .._policies.resume import ResumePolicy
from .._request import retry_backoff
from ..config import ClientConfig
from ..errors import (
    InvalidArgument,
    NotFound,
    QdbError,
    RequestTimeout,
    StreamCorrupted,
)
from ..protocol import BadMessage, Message, StreamPage
from ..results import Row, _Columns
from ..validation import seconds_or_error
from . import attempt as attempts
from .attempt import Attempt
from .checks import PageLedger
from .stream_attempts import StreamAttempts
from .types import PageIterator, ResultPage, rows_of

if TYPE_CHECKING:
    from .._cluster import Cluster, Node

__all__ = ["DeliveredFacts", "ResultStream", "StreamHost", "resume_policy"]

logger = logging.getLogger("qdb_client.streams")

_MAX_PAGE_ROWS = 100_000
#: Seconds a background release of an abandoned stream's spool may take at most.
_RELEASE_GRACE = 5.0


class DeliveredFacts(TypedDict, total=False):
    """What a stopped stream or subscription had delivered: the keyword
    arguments of :class:`~qdb_client.errors.StreamError` besides ``reason``."""

    rows_delivered: int
    pages_delivered: int
    last_seq: int | None
    last_event_id: int | None
    resume_attempts: int


class StreamHost(Protocol):
    """What a stream needs of its client (the public Client provides it)."""

    config: ClientConfig
    _rng: random.Random
    _closed: bool
    _active: int
    _nursery: trio.Nursery | None

    def _require_cluster(self) -> Cluster: ...

    async def _admit(self) -> None: ...


def resume_policy(config: ClientConfig) -> ResumePolicy:
    """The resume limits of ``config``: its retry backoff, ``stream_max_resumes``."""
    return ResumePolicy(
        max_attempts=config.stream_max_resumes,
        backoff=retry_backoff(config),
        min_attempt_time=config.min_attempt_time,
    )


def _count(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"{name} must be an integer within {low}..{high}, not {value!r:.60}")
    return value


class ResultStream(StreamAttempts):
    """An open result stream; use it inside its ``async with`` block, from one task.

    ``async for row in stream`` gives :class:`~qdb_client.Row` objects (as
    ``client.query`` does); ``async for page in stream.pages()`` gives
    :class:`ResultPage` objects. ``columns`` and ``types`` are known once the
    block is entered. After the last row, ``row_count`` is the node's count
    and ``digest_ok`` True (a mismatch raises StreamCorrupted instead).
    ``resumes`` counts the times the stream continued after an interruption.
    """

    def __init__(
        self,
        host: StreamHost,
        sql: str,
        params: Any = None,
        *,
        page_rows: int | None = None,
        page_bytes: int | None = None,
        timeout: float | None = None,
    ) -> None:
        config = host.config
        self._host = host
        self._args = statement_args(sql, params)
        limit = config.max_frame_size - 1024
        self._args["page_rows"] = _count(
            config.stream_page_rows if page_rows is None else page_rows,
            "page_rows",
            1,
            _MAX_PAGE_ROWS,
        )
        self._args["page_bytes"] = _count(
            min(config.stream_page_bytes, limit) if page_bytes is None else page_bytes,
            "page_bytes",
            1024,
            limit,
        )
        self._timeout = (
            None
            if timeout is None
            else seconds_or_error(timeout, name="timeout", error=InvalidArgument)
        )
        self._policy = resume_policy(config)
        self._ledger = PageLedger(config.stream_credit)
        self._buffer: deque[StreamPage] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._attempt: Attempt | None = None
        #: Why the current attempt can't go on, and its classification.
        self._failure: tuple[QdbError, Outcome] | None = None
        self._corrupted: StreamCorrupted | None = None
        self._failed_nodes: list[Node] = []
        self._failures_since_progress = 0
        self._previous_delay: float | None = None
        self._deadline = math.inf
        self._entered = False
        self._admitted = False
        self._closed = False
        #: A task is waiting for the next page (a second one is refused).
        self._consuming = False
        #: A node said it no longer has the spool (nothing to release).
        self._spool_gone = False
        self._shared: _Columns | None = None
        self._current: list[Row] = []
        self._current_seq = 0
        self._position = 0
        #: Times the stream continued on a new request after an interruption.
        self.resumes = 0

    # ------------------------------------------------------------- public

    @property
    def columns(self) -> tuple[str, ...]:
        """Column names, in order (known once the block is entered)."""
        return self._ledger.columns or ()

    @property
    def types(self) -> tuple[str | None, ...]:
        """Declared column types (None where the node can't say)."""
        return self._ledger.types or (None,) * len(self.columns)

    @property
    def row_count(self) -> int | None:
        """The node's row count, once STREAM_END came (None before)."""
        end = self._ledger.end
        return end.row_count if end is not None else None

    @property
    def digest_ok(self) -> bool | None:
        """True once STREAM_END came and its digest matched every row (None before)."""
        return True if self._ledger.end is not None else None

    @property
    def rows_received(self) -> int:
        """Rows received from the node so far (buffered ones included)."""
        return self._ledger.rows_received

    @property
    def pages_received(self) -> int:
        """Pages received so far."""
        return self._ledger.pages_received

    @property
    def node(self) -> str | None:
        """The address of the node the stream currently runs on (None between attempts)."""
        attempt = self._attempt
        return attempt.address if attempt is not None else None

    async def __aenter__(self) -> ResultStream:
        if self._entered:
            raise InvalidArgument("a stream can be entered once")
        self._entered = True
        await self._host._admit()
        self._admitted = True
        try:
            if self._timeout is not None:
                self._deadline = trio.current_time() + self._timeout
            await self._fill()  # page 0: the columns
        except BaseException:
            self._close(cancel=True)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._close(cancel=True)
        if exc_info[0] is None:
            await trio.lowlevel.checkpoint()
        else:
            # Only the schedule half: a Cancelled here would replace the block's error.
            await trio.lowlevel.cancel_shielded_checkpoint()

    def __aiter__(self) -> ResultStream:
        return self

    async def __anext__(self) -> Row:
        # A cancellation is seen at every row; the task yields to others at least once
        # a page (each page is a checkpoint), which spares a schedule point per row.
        self._check_open()
        if self._position < len(self._current):
            await trio.lowlevel.checkpoint_if_cancelled()
        while self._position >= len(self._current):  # an empty page 0: the next one
            page = await self._next_page()
            if page is None:
                raise StopAsyncIteration
            self._load(page)
        row = self._current[self._position]
        self._position += 1
        return row

    def pages(self) -> PageIterator:
        """``async for page in stream.pages()``: the rest of the stream, page by page."""
        return PageIterator(self._next_result_page)

    async def _next_result_page(self) -> ResultPage | None:
        self._check_open()
        if self._position < len(self._current):
            rest = self._current[self._position :]
            self._position = len(self._current)
            await trio.lowlevel.checkpoint()
            return ResultPage(self._current_seq, rest)
        page = await self._next_page()
        if page is None:
            return None
        self._load(page)
        self._position = len(self._current)
        return ResultPage(page.seq, self._current)

    def _load(self, page: StreamPage) -> None:
        if self._shared is None:
            self._shared = _Columns(self.columns)
        self._current = rows_of(page.rows, self._shared)
        self._current_seq = page.seq
        self._position = 0

    # -------------------------------------------------------- the consumer

    def _check_open(self) -> None:
        if not self._entered or self._closed:
            raise InvalidArgument("use a stream inside its 'async with' block")

    async def _next_page(self) -> StreamPage | None:
        """The next page (None at the end), resuming as needed."""
        self._check_open()
        if self._consuming:
            await trio.lowlevel.checkpoint()
            raise InvalidArgument(
                "another task is already waiting for this stream's next page"
                " (consume a stream from one task)"
            )
        self._consuming = True
        try:
            await self._fill()
        finally:
            self._consuming = False
        if not self._buffer:
            return None  # the end, checked
        page = self._buffer.popleft()
        attempt = self._attempt
        if attempt is not None and self._failure is None and self._ledger.end is None:
            attempt.grant(self._ledger.credit_to_grant(len(self._buffer)))
        return page

    async def _fill(self) -> None:
        """Return once a page is buffered or the stream ended (checkpoints always)."""
        await trio.lowlevel.checkpoint()
        while True:
            if self._corrupted is not None:
                self._close(cancel=True)
                raise self._corrupted
            if self._buffer or self._ledger.end is not None:
                return
            if self._attempt is None or self._failure is not None:
                await self._next_attempt()
                continue
            await self._wait()

    async def _wait(self) -> None:
        """Wait for the current attempt's next frame; silence past the page timeout
        abandons it (its connection is closed, its spool kept)."""
        config = self._host.config
        page_timeout = config.stream_page_timeout
        if not self._ledger.pages_received:  # page 0 comes once the node spooled it all
            page_timeout = max(page_timeout, config.request_timeout + 1.0)
        until = min(trio.current_time() + page_timeout, self._deadline)
        with trio.move_on_at(until) as waited:
            await self._lot.park()
        if not waited.cancelled_caught or self._buffer or self._failure or self._corrupted:
            return
        if trio.current_time() >= self._deadline:
            self._close(cancel=True)
            raise RequestTimeout(
                f"the stream did not complete within {self._timeout:g} s"
                f" ({self._ledger.rows_received} rows received)",
                timeout=self._timeout or 0.0,
            )
        attempt = self._attempt
        assert attempt is not None
        why = f"no page from {attempt.address} for {page_timeout:g} s"
        logger.debug("stream stalled: %s", why)
        silence = RequestTimeout(f"stream stalled: {why}", timeout=page_timeout)
        self._fail_attempt(attempt, silence, classify(None, sent=True, attempt_timed_out=True))
        attempt.abort_connection(f"stream stalled: {why}")

    def _close(self, *, cancel: bool) -> None:
        """End the stream on the node (synchronous: safe in any cleanup)."""
        if self._closed:
            return
        self._closed = True
        attempt, self._attempt = self._attempt, None
        ended = self._ledger.end is not None
        failure = self._failure
        if attempt is not None and failure is None:
            # Ended: release the spool. Live: CANCEL stops it and deletes the spool.
            attempt.stop(cancel=cancel and not ended, release=ended)
        else:
            if attempt is not None:
                attempt.stop(cancel=False)  # failed: a CANCEL would not stop anything
            token = self._ledger.token
            gone = self._spool_gone or (failure is not None and isinstance(failure[0], NotFound))
            if cancel and not ended and token is not None and not gone:
                self._release_spool(token)
        if self._admitted:
            self._host._active -= 1
            self._admitted = False
        self._buffer.clear()

    def _release_spool(self, token: bytes) -> None:
        """Have the node delete the spool of a stream no request carries now."""
        host = self._host
        nursery = host._nursery
        if host._closed or nursery is None:
            return  # the client is closing: the spool expires on the node
        grace = min(_RELEASE_GRACE, host.config.request_timeout)
        nursery.start_soon(release_spool, host._require_cluster(), token, grace)


class _SpoolRelease:
    """The owner of a ``resume_stream`` sent only to CANCEL it (see release_spool)."""

    def __init__(self) -> None:
        self.answered = trio.Event()

    def _on_frame(self, attempt: Attempt, message: Message | BadMessage) -> bool:
        self.answered.set()
        return isinstance(message, StreamPage)  # the rest ends the request in the ledger

    def _on_failed(self, attempt: Attempt, error: QdbError) -> None:
        self.answered.set()


async def release_spool(cluster: Cluster, token: bytes, grace: float) -> None:
    """Background task: resume the stream of ``token`` on any node and CANCEL it at
    its first frame (or after ``grace`` seconds), so that the node deletes its
    spool now rather than after its retention. Best effort: never raises."""
    owner = _SpoolRelease()
    attempt: Attempt | None = None
    try:
        with trio.move_on_after(grace):
            attempt = await attempts.start(
                owner,
                cluster,
                "resume_stream",
                {"token": token, "credit": 1},
                deadline_ms=attempts.ms_until(trio.current_time() + grace, grace),
            )
            await owner.answered.wait()
    except QdbError as exc:
        logger.debug("could not release an abandoned stream's spool: %s", exc)
    except Exception as exc:  # a bug must not crash the client's nursery
        logger.debug("releasing an abandoned stream's spool failed: %r", exc)
    finally:
        if attempt is not None:
            # Running: CANCEL stops it and deletes the spool. Answered (STREAM_END,
            # or an ERROR): a CANCEL of the ended request releases the spool.
            attempt.stop(cancel=True, release=True)
