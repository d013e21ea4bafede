"""Short descriptions of any value for error messages: bounded in length and
in cost whatever the value is (a huge integer, a deep or cyclic container,
an object whose ``repr`` raises), and never raising themselves.

Results use them to say what a node sent that could not be used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["preview"]

#: Containers deeper than this are shown as ``[...]`` / ``{...}``.
_PREVIEW_DEPTH = 6


def preview(value: Any, limit: int = 200) -> str:
    """A short description of ``value`` for an error message; never raises.

    At most ``limit`` characters (plus ``"..."``) whatever ``value`` is: an
    integer too long to print (``str()`` refuses more than 4300 digits), a
    huge or deeply nested container, a cycle, or an object whose ``repr``
    raises. Walks containers with a budget instead of calling ``repr`` on
    them, so the cost is bounded by ``limit`` too.
    """
    parts: list[str] = []
    budget = [limit + 1]  # stop as soon as the text is known to be too long
    try:
        _render(value, parts, budget, 0, set())
    except _Full:
        pass
    except Exception:  # a hostile __repr__/__len__ deep inside: say what we can
        parts.append(f"<{_type_name(value)}>")
    text = "".join(parts)
    return text if len(text) <= limit else text[:limit] + "..."


class _Full(Exception):
    """The preview reached its length limit."""


def _emit(text: str, parts: list[str], budget: list[int]) -> None:
    parts.append(text[: budget[0]])
    budget[0] -= len(text)
    if budget[0] <= 0:
        raise _Full


def _render(value: Any, parts: list[str], budget: list[int], depth: int, path: set[int]) -> None:
    if value is None or isinstance(value, bool):
        _emit(repr(value), parts, budget)
    elif isinstance(value, int):
        _emit(_int_preview(value), parts, budget)
    elif isinstance(value, float):
        _emit(float.__repr__(value), parts, budget)
    elif isinstance(value, str):
        room = budget[0]
        text = str.__repr__(str.__getitem__(value, slice(None, room)))
        _emit(text + "..." if str.__len__(value) > room else text, parts, budget)
    elif isinstance(value, (bytes, bytearray)):
        room = budget[0]
        view = memoryview(value)
        text = bytes.__repr__(bytes(view[:room]))
        _emit(text + "..." if len(view) > room else text, parts, budget)
    elif isinstance(value, (list, tuple, dict, set, frozenset)):
        _render_container(value, parts, budget, depth, path)
    else:
        _emit(_object_preview(value, budget[0]), parts, budget)


#: Each container type with its opening and closing bracket (checked in this order).
_BRACKETS: dict[type[Any], tuple[str, str]] = {
    list: ("[", "]"),
    tuple: ("(", ")"),
    dict: ("{", "}"),
    set: ("{", "}"),
    frozenset: ("{", "}"),
}


def _render_container(
    value: Any, parts: list[str], budget: list[int], depth: int, path: set[int]
) -> None:
    base = next(kind for kind in _BRACKETS if isinstance(value, kind))
    opening, closing = _BRACKETS[base]
    if id(value) in path or depth >= _PREVIEW_DEPTH:
        _emit(f"{opening}...{closing}", parts, budget)
        return
    path.add(id(value))
    _emit(opening, parts, budget)
    items = dict.items(value) if base is dict else base.__iter__(value)
    for number, item in enumerate(items):
        if number:
            _emit(", ", parts, budget)
        if base is dict:
            key, item = item
            _render(key, parts, budget, depth + 1, path)
            _emit(": ", parts, budget)
        _render(item, parts, budget, depth + 1, path)
    if base is tuple and tuple.__len__(value) == 1:
        _emit(",", parts, budget)
    _emit(closing, parts, budget)
    path.discard(id(value))


def _int_preview(value: int) -> str:
    """Up to 40 digits in full (2**132 < 10**40); a longer integer by its size."""
    if value.bit_length() <= 132:
        return int.__repr__(value)
    sign = "-" if value < 0 else ""
    return f"<{sign}integer of {value.bit_length()} bits>"


def _object_preview(value: Any, room: int) -> str:
    try:
        text = repr(value)
    except Exception:
        return f"<{_type_name(value)} object (repr failed)>"
    if not isinstance(text, str):
        return f"<{_type_name(value)} object>"
    return text[: max(room, 0)]


def _type_name(value: Any) -> str:
    try:
        name = type(value).__name__
    except Exception:
        return "object"
    return name if isinstance(name, str) else "object"
