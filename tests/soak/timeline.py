"""The timeline of a run: one self-contained HTML file with inline SVG, no scripts.

From the top: one row per node with every fault drawn as a band where and
when it hit (hover a band for its parameters), a thin strip per node of the
drivers' view of it (green: every client saw it UP with a CLOSED breaker,
red: none did), then successful calls per
second, failed calls per second stacked by error class, and the p50/p99
latency per second. Faults are shaded across every chart too, and the heal
is a green line. Below the charts: the summary line and the check table.
"""

from __future__ import annotations

import html
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from .faults import KINDS
from .history import Call, History

__all__ = ["render_timeline", "write_timeline"]

WIDTH = 1200
LEFT = 90
RIGHT = 20
ROW = 22
VIEW_ROW = 8
#: Seconds per cell of the driver's-view strips.
VIEW_CELL = 0.5
CHART = 150
GAP = 34
FAMILY_COLOURS = {"process": "#d62728", "proxy": "#ff7f0e", "node": "#9467bd"}
PALETTE = [
    "#1f77b4",
    "#d62728",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#2ca02c",
]


def _family(kind: str) -> str:
    return KINDS[kind][0] if kind in KINDS else "node"


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class _Axis:
    def __init__(self, t0: float, span: float) -> None:
        self.t0 = t0
        self.span = max(span, 1.0)
        self.scale = (WIDTH - LEFT - RIGHT) / self.span

    def x(self, t: float) -> float:
        return LEFT + max(0.0, min(self.span, t - self.t0)) * self.scale


def _ticks(axis: _Axis, top: float, bottom: float) -> list[str]:
    step = next(s for s in (1, 2, 5, 10, 20, 30, 60, 120, 300, 600) if axis.span / s <= 24)
    out = []
    for k in range(int(axis.span // step) + 1):
        x = LEFT + k * step * axis.scale
        out.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#eee"/>'
            f'<text x="{x:.1f}" y="{bottom + 14}" font-size="10" text-anchor="middle">'
            f"{k * step}s</text>"
        )
    return out


def _bars(
    axis: _Axis, top: float, series: dict[str, list[float]], colours: dict[str, str], title: str
) -> list[str]:
    seconds = max((len(v) for v in series.values()), default=0)
    totals = [sum(v[i] for v in series.values() if i < len(v)) for i in range(seconds)]
    peak = max(totals, default=0) or 1
    out = [f'<text x="{LEFT}" y="{top - 6}" font-size="11" font-weight="bold">{_esc(title)}</text>']
    out.append(
        f'<text x="{LEFT - 4}" y="{top + 10}" font-size="10" text-anchor="end">{peak:.0f}</text>'
    )
    out.append(
        f'<line x1="{LEFT}" y1="{top + CHART}" x2="{WIDTH - RIGHT}" y2="{top + CHART}"'
        ' stroke="#999"/>'
    )
    width = max(axis.scale - 0.5, 0.5)
    for i in range(seconds):
        y = top + CHART
        for name, values in series.items():
            value = values[i] if i < len(values) else 0
            if not value:
                continue
            h = value / peak * CHART
            y -= h
            out.append(
                f'<rect x="{LEFT + i * axis.scale:.1f}" y="{y:.1f}" width="{width:.1f}"'
                f' height="{h:.1f}" fill="{colours[name]}"><title>t={i}s {_esc(name)}:'
                f" {value:.0f}</title></rect>"
            )
    return out


def _lines(axis: _Axis, top: float, series: dict[str, list[float]], title: str) -> list[str]:
    peak = max((max(v, default=0) for v in series.values()), default=0) or 1
    out = [f'<text x="{LEFT}" y="{top - 6}" font-size="11" font-weight="bold">{_esc(title)}</text>']
    out.append(
        f'<text x="{LEFT - 4}" y="{top + 10}" font-size="10" text-anchor="end">'
        f"{peak * 1000:.0f} ms</text>"
    )
    out.append(
        f'<line x1="{LEFT}" y1="{top + CHART}" x2="{WIDTH - RIGHT}" y2="{top + CHART}"'
        ' stroke="#999"/>'
    )
    for (name, values), colour in zip(series.items(), ("#1f77b4", "#d62728"), strict=False):
        points = " ".join(
            f"{LEFT + (i + 0.5) * axis.scale:.1f},{top + CHART - v / peak * CHART:.1f}"
            for i, v in enumerate(values)
        )
        out.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.2"/>'
        )
        out.append(
            f'<text x="{WIDTH - RIGHT - 60}" y="{top + 12 + 12 * list(series).index(name)}"'
            f' font-size="10" fill="{colour}">{_esc(name)}</text>'
        )
    return out


def _views(axis: _Axis, history: History, top: float, nodes: int) -> list[str]:
    """Per node, a strip of the share of clients whose driver saw it usable (UP with a
    CLOSED breaker): green all, red none, grey no sample."""
    usable: dict[tuple[int, int], list[bool]] = defaultdict(list)
    for _client, t, view in history.views:
        cell = int((t - axis.t0) / VIEW_CELL)
        for index, node in enumerate(view[:nodes]):
            ok = node.get("state") == "UP" and node.get("breaker") == "CLOSED"
            usable[(index, cell)].append(ok)
    out = [f'<text x="4" y="{top + nodes * VIEW_ROW - 1}" font-size="9">driver view</text>']
    width = VIEW_CELL * axis.scale
    for (index, cell), samples in usable.items():
        share = sum(samples) / len(samples)
        colour = f"rgb({int(220 * (1 - share))},{int(170 * share + 30)},60)"
        x = LEFT + cell * width
        out.append(
            f'<rect x="{x:.1f}" y="{top + index * VIEW_ROW}" width="{width:.1f}"'
            f' height="{VIEW_ROW - 1}" fill="{colour}"><title>n{index} t={cell * VIEW_CELL:.1f}s:'
            f" usable for {share:.0%} of samples</title></rect>"
        )
    return out


def render_timeline(
    history: History, t0: float, duration: float, *, summary: str, table: Sequence[str]
) -> str:
    """The whole HTML page of a run whose workload started at ``t0`` (monotonic)."""
    end = max([c.end for c in history.calls] + [t0 + duration])
    axis = _Axis(t0, end - t0)
    seconds = math.ceil(axis.span)
    ok = [0.0] * seconds
    errors: dict[str, list[float]] = defaultdict(lambda: [0.0] * seconds)
    latency: dict[int, list[float]] = defaultdict(list)
    for call in history.calls:
        i = min(seconds - 1, max(0, int(call.end - t0)))
        if call.ok:
            ok[i] += 1
            latency[i].append(call.duration)
        else:
            errors[call.outcome][i] += 1
    classes = sorted(errors, key=lambda k: -sum(errors[k]))
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(classes)}
    nodes = max([n for f in history.faults for n in f.nodes] + [2]) + 1
    bands_top = 30
    view_top = bands_top + nodes * ROW + 6
    charts_top = view_top + nodes * VIEW_ROW + GAP
    tops = [charts_top + k * (CHART + GAP) for k in range(3)]
    height = tops[-1] + CHART + 40
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}"'
        ' font-family="sans-serif">'
    ]
    svg += _ticks(axis, bands_top, height - 40)
    for fault in history.faults:
        x0, x1 = axis.x(fault.start), axis.x(fault.end)
        colour = FAMILY_COLOURS[_family(fault.kind)]
        svg.append(
            f'<rect x="{x0:.1f}" y="{charts_top}" width="{max(x1 - x0, 1):.1f}"'
            f' height="{height - 40 - charts_top}" fill="{colour}" opacity="0.07"/>'
        )
        for node in fault.nodes:
            y = bands_top + node * ROW
            params = ", ".join(f"{k}={v}" for k, v in fault.params.items())
            label = _esc(fault.kind) if x1 - x0 > 7 * len(fault.kind) else ""
            broken = f" ERROR {_esc(fault.error)}" if fault.error else ""
            svg.append(
                f"<g><title>{_esc(fault.id)} on n{node}: t={fault.start - t0:.1f}.."
                f"{fault.end - t0:.1f}s {_esc(params)}{broken}"
                f'</title><rect x="{x0:.1f}" y="{y + 2}" width="{max(x1 - x0, 1):.1f}"'
                f' height="{ROW - 4}" fill="{colour}" opacity="0.8" rx="3"/>'
                f'<text x="{x0 + 3:.1f}" y="{y + ROW - 7}" font-size="10" fill="white">{label}'
                "</text></g>"
            )
    for node in range(nodes):
        svg.append(
            f'<text x="4" y="{bands_top + node * ROW + 15}" font-size="11">node {node}</text>'
        )
    svg += _views(axis, history, view_top, nodes)
    svg += _bars(axis, tops[0], {"ok": ok}, {"ok": "#2ca02c"}, "ok calls/s")
    svg += _bars(
        axis, tops[1], dict(errors) or {"none": [0.0]}, colours or {"none": "#ccc"}, "errors/s"
    )
    svg += _lines(
        axis,
        tops[2],
        {
            "p50": [_percentile(latency[i], 0.5) for i in range(seconds)],
            "p99": [_percentile(latency[i], 0.99) for i in range(seconds)],
        },
        "latency of ok calls",
    )
    if history.heal is not None:
        x = axis.x(history.heal[1])
        svg.append(
            f'<line x1="{x:.1f}" y1="{bands_top - 6}" x2="{x:.1f}" y2="{height - 40}"'
            ' stroke="#2ca02c" stroke-width="2"/>'
            f'<text x="{x + 3:.1f}" y="{bands_top - 10}" font-size="11"'
            ' fill="#2ca02c">healed</text>'
        )
    svg.append("</svg>")
    legend = "".join(
        f'<span style="color:{colours[c]}">&#9632;</span> {_esc(c)} ({sum(errors[c]):.0f}) '
        for c in classes
    )
    families = "".join(
        f'<span style="color:{colour}">&#9632;</span> {family} '
        for family, colour in FAMILY_COLOURS.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>qdb soak timeline</title>"
        "<style>body{font-family:sans-serif;margin:16px}pre{background:#f6f6f6;padding:8px}"
        "</style></head><body>"
        f"<h2>qdb_client soak</h2><p><b>{_esc(summary)}</b></p>"
        f"<p>faults: {families} &nbsp; errors: {legend or 'none'}</p>"
        + "\n".join(svg)
        + f"<pre>{_esc(chr(10).join(table))}</pre></body></html>\n"
    )


def write_timeline(
    path: Path, history: History, t0: float, duration: float, *, summary: str, table: Sequence[str]
) -> None:
    """Write :func:`render_timeline` to ``path``."""
    path.write_text(render_timeline(history, t0, duration, summary=summary, table=table))


def per_second(calls: Sequence[Call], t0: float) -> Counter[int]:
    """Completed calls per second after ``t0`` (a helper for reports)."""
    return Counter(int(c.end - t0) for c in calls)
