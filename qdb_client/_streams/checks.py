"""What a received result stream must satisfy, checked page by page. Pure: no trio.

:class:`PageLedger` follows one stream across all its attempts (the opening
request and every ``resume_stream``): the next ``seq`` it expects, the row
width page 0 announced, the credit granted to the current attempt and how
much of it the node used, the rows received and the running SHA-256 over
their bytes as they travelled (docs/protocol.md section 12.4). A page that
breaks a rule, or a STREAM_END that does not match what arrived, raises
:class:`~qdb_client.errors.StreamCorrupted`: a node that sends it is broken,
and nothing it sent may be trusted.

Credit: the consumer's buffer plus the credit the node has not used yet
never exceed the window (``credit`` pages), so memory is bounded by the
window whatever the result's size. :meth:`PageLedger.credit_to_grant` says
when to grant more (once half the window is free, to send few
STREAM_CREDIT frames).
"""

from __future__ import annotations

import hashlib

from ..errors import StreamCorrupted
from ..protocol import StreamEnd, StreamPage

__all__ = ["MAX_CREDIT", "PageLedger"]

#: Most pages of credit outstanding on one stream (docs/protocol.md section 12.2).
MAX_CREDIT = 1024


class PageLedger:
    """The received pages of one stream, checked as they come."""

    def __init__(self, window: int) -> None:
        if not 1 <= window <= MAX_CREDIT:
            raise ValueError(f"a credit window is 1..{MAX_CREDIT} pages, not {window}")
        #: Pages the node may have on its way or in our buffer at once.
        self.window = window
        self.columns: tuple[str, ...] | None = None
        self.types: tuple[str | None, ...] | None = None
        #: The ``seq`` of the next page (0 until page 0 came).
        self.next_seq = 0
        #: The token of the last page received (resumes after it), None before page 0.
        self.token: bytes | None = None
        self.rows_received = 0
        self.pages_received = 0
        self.bytes_received = 0
        #: Credit granted to the current attempt, and pages it delivered.
        self.granted = 0
        self.used = 0
        #: The STREAM_END, once it came and matched.
        self.end: StreamEnd | None = None
        self._digest = hashlib.sha256()

    @property
    def last_seq(self) -> int | None:
        """The ``seq`` of the last page received (None before page 0)."""
        return self.next_seq - 1 if self.pages_received else None

    @property
    def outstanding(self) -> int:
        """Pages the node may still send on the current attempt."""
        return self.granted - self.used

    def start_attempt(self, buffered: int) -> int:
        """A new request (opening or resume) begins: the credit it asks for."""
        self.granted = max(1, self.window - buffered)
        self.used = 0
        return self.granted

    def credit_to_grant(self, buffered: int) -> int:
        """Pages of credit to grant now (0: not yet), given ``buffered`` pages waiting."""
        room = self.window - buffered - self.outstanding
        if room >= max(1, self.window // 2):
            self.granted += room
            return room
        return 0

    def accept(self, page: StreamPage) -> None:
        """Check one page and count it; StreamCorrupted if it breaks a rule."""
        if self.end is not None:
            raise self._corrupt(f"page {page.seq} after STREAM_END")
        if self.used >= self.granted:
            raise self._corrupt(
                f"page {page.seq} beyond the {self.granted} page(s) of credit granted"
            )
        if page.seq != self.next_seq:
            raise self._corrupt(f"page {page.seq} where page {self.next_seq} was due")
        if page.seq == 0:
            if page.columns is None:
                raise self._corrupt("page 0 without 'columns'")
            if page.types is not None and len(page.types) != len(page.columns):
                raise self._corrupt(
                    f"page 0 has {len(page.types)} types for {len(page.columns)} columns"
                )
            self.columns = page.columns
            self.types = page.types
        elif page.columns is not None and page.columns != self.columns:
            raise self._corrupt(f"page {page.seq} changes the columns")
        width = len(self.columns or ())
        for number, row in enumerate(page.rows):
            if len(row) != width:
                raise self._corrupt(
                    f"row {number} of page {page.seq} has {len(row)} values for {width} columns"
                )
        if not page.rows and page.seq != 0:
            raise self._corrupt(f"page {page.seq} has no rows")
        if not page.resume_token or len(page.resume_token) > 1024:
            raise self._corrupt(f"page {page.seq} has no usable resume token")
        if page.rows and not page.rows_encoding:
            raise self._corrupt(f"page {page.seq} came without its rows' bytes")
        self._digest.update(page.rows_encoding)
        self.used += 1
        self.next_seq += 1
        self.pages_received += 1
        self.rows_received += len(page.rows)
        self.bytes_received += len(page.rows_encoding)
        self.token = page.resume_token

    def finish(self, end: StreamEnd) -> None:
        """Check the STREAM_END against every page received; StreamCorrupted if it
        does not match (row count, digest, or the last page's seq)."""
        if self.end is not None:
            return  # a resume of a finished stream sends STREAM_END again
        if self.pages_received == 0:
            raise self._corrupt("STREAM_END before page 0")
        if end.seq != self.next_seq - 1:
            raise self._corrupt(
                f"STREAM_END names page {end.seq} as the last, but page"
                f" {self.next_seq - 1} was the last received"
            )
        if end.row_count != self.rows_received:
            raise self._corrupt(
                f"STREAM_END counts {end.row_count} rows, {self.rows_received} were received"
            )
        if end.digest != self._digest.digest():
            raise self._corrupt(
                "the SHA-256 digest of the rows received does not match STREAM_END's"
            )
        self.end = end

    def _corrupt(self, why: str) -> StreamCorrupted:
        return StreamCorrupted(
            f"result stream corrupted: {why}",
            reason=why,
            rows_delivered=self.rows_received,
            pages_delivered=self.pages_received,
            last_seq=self.last_seq,
        )
