"""Output of the ``qdb`` command: tables, progress, JSON; with rich when installed.

Results go to stdout, everything else (notes, progress, errors) to stderr,
so ``qdb query ... --json | jq`` sees only JSON. With ``rich`` installed
(``pip install 'qdb_client[cli]'``) tables and progress bars are rich's;
without it, or with ``--plain``, they are plain aligned text. The choice
never changes what ``--json`` prints.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TextIO

from .common import jsonable

__all__ = ["Output", "Progress", "format_cell", "plain_table", "rich_available"]

#: Width given to rich when stdout is not a terminal, so piped tables are not squeezed.
_PIPE_WIDTH = 250
#: Control characters shown escaped in a table cell, so rows stay one line each.
_ESCAPES = {i: f"\\x{i:02x}" for i in range(32)} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
    0x7F: "\\x7f",
}


def rich_available() -> bool:
    """Whether the ``rich`` package can be imported."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def format_cell(value: Any, null: str = "NULL") -> str:
    """A value as table text: ``null`` for None, ``x'0a1b'`` for bytes, control characters
    escaped."""
    if value is None:
        return null
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"x'{bytes(value).hex()}'"
    return str(value).translate(_ESCAPES)


def _numeric(values: Sequence[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in present
    )


def plain_table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], *, null: str = "NULL"
) -> list[str]:
    """Lines of an aligned text table: header, dashes, rows; numeric columns right-aligned."""
    texts = [[format_cell(v, null) for v in row] for row in rows]
    header = [format_cell(c) for c in columns]
    widths = [len(h) for h in header]
    for row in texts:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    right = [_numeric([row[i] for row in rows]) for i in range(len(columns))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if right[i] else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(row) for row in texts)]


class Output:
    """Where a command's results go: JSON, a rich table, or a plain table.

    ``json_mode`` makes :meth:`json` the only output on stdout (tables and
    notes still go where they would, but commands print JSON instead).
    ``plain`` turns rich off even when installed.
    """

    def __init__(
        self,
        *,
        json_mode: bool = False,
        plain: bool = False,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self.json_mode = json_mode
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        #: Whether tables and progress use rich.
        self.rich = not plain and rich_available()

    # ------------------------------------------------------------- results

    def json(self, value: Any) -> None:
        """Print ``value`` as one JSON document on stdout."""
        print(json.dumps(jsonable(value), indent=2, allow_nan=False), file=self.stdout)

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        *,
        title: str | None = None,
        null: str = "-",
    ) -> None:
        """Print an aligned table on stdout (numeric columns right-aligned, None as ``null``)."""
        if self.rich:
            self._rich_table(columns, rows, title, null)
            return
        if title:
            print(title, file=self.stdout)
        for line in plain_table(columns, rows, null=null):
            print(line, file=self.stdout)

    def line(self, text: str = "") -> None:
        """Print one line of result text on stdout."""
        print(text, file=self.stdout)

    def note(self, text: str) -> None:
        """Print a status line on stderr (never mixed into results)."""
        print(text, file=self.stderr)

    def _rich_table(
        self, columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None, null: str
    ) -> None:
        from rich import box
        from rich.table import Table
        from rich.text import Text

        table = Table(
            title=title,
            box=box.SIMPLE_HEAD,
            show_edge=False,
            title_justify="left",
            highlight=False,
        )
        for i, name in enumerate(columns):
            numeric = _numeric([row[i] for row in rows])
            table.add_column(Text(format_cell(name)), justify="right" if numeric else "left")
        for row in rows:
            table.add_row(*(Text(format_cell(v, null)) for v in row))
        self._console(self.stdout).print(table)

    @staticmethod
    def _console(stream: TextIO) -> Any:
        from rich.console import Console

        terminal = hasattr(stream, "isatty") and stream.isatty()
        return Console(
            file=stream,
            highlight=False,
            soft_wrap=False,
            width=None if terminal else _PIPE_WIDTH,
        )

    # ------------------------------------------------------------ progress

    def progress(self, description: str, total: float, *, enabled: bool) -> Progress:
        """A progress bar on stderr for ``total`` units (seconds, for bench); a no-op unless
        ``enabled``."""
        return Progress(self, description, total, enabled=enabled)


class Progress:
    """A live progress bar: ``with out.progress(...) as bar: bar.update(done, text)``.

    rich's bar when rich is used, else one line redrawn with ``\\r``. Drawn
    on stderr only; :meth:`update` is cheap enough to call ten times a
    second.
    """

    def __init__(self, output: Output, description: str, total: float, *, enabled: bool) -> None:
        self._output = output
        self._description = description
        self._total = max(total, 1e-9)
        self._enabled = enabled
        self._rich: Any = None
        self._task: Any = None
        self._drawn = False
        self._width = 0

    def __enter__(self) -> Progress:
        if self._enabled and self._output.rich:
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                console=Output._console(self._output.stderr),
                transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(self._description, total=self._total, status="")
        return self

    def update(self, completed: float, status: str = "") -> None:
        """Show ``completed`` of the total, with a short status text after the bar."""
        if not self._enabled:
            return
        completed = min(max(completed, 0.0), self._total)
        if self._rich is not None:
            self._rich.update(self._task, completed=completed, status=status)
            return
        width = 30
        filled = int(width * completed / self._total)
        percent = 100 * completed / self._total
        bar = "#" * filled + "-" * (width - filled)
        text = f"{self._description} [{bar}] {percent:3.0f}% {status}"
        stream = self._output.stderr
        stream.write("\r" + text.ljust(self._width))  # pad over a longer previous line
        stream.flush()
        self._width = len(text)
        self._drawn = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self._drawn:
            self._output.stderr.write("\n")
            self._output.stderr.flush()
