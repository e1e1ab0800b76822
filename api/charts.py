"""The report's charts as inline SVG drawn by matplotlib: one function per chart type.

Why matplotlib: it scales bars to their values and places labels beside them, which the hand-written
SVG got wrong; its SVG is made on the server, so pages need no JavaScript and keep ``default-src 'none'``.
matplotlib is imported on first use (``import api.main`` stays light). Text is real SVG text (selectable).
Each chart's ids start with ``chart-<name>-``: bars ``-bar-<i>``, value labels ``-value-<i>``, lines ``-line``.
"""

from __future__ import annotations

import io
import os
import re
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

from markupsafe import Markup

from models.objectives import OBJECTIVES
from models.report_view import fmt_number, is_num

BEFORE, AFTER = "#8a94a6", "#2f6fde"
SERIES_COLOURS = ("#2f6fde", "#e0702b", "#2a9d6f", "#b5407a")
INK, MUTED = "#1d2330", "#6b7280"
_DPI = 72  # SVG user units are points: 1 inch = 72
_TAG = re.compile(r"<[^<>]+>")
_ID_REF = re.compile(r'(\bid="|url\(#|href="#)')
_SLUG = re.compile(r"[^a-z0-9]+")
# matplotlib is not thread-safe (fonts and their caches are shared) and sync routes run in a thread pool.
_DRAWING = threading.Lock()


@lru_cache(maxsize=1)
def _matplotlib() -> Any:
    """matplotlib, configured once: Agg, text kept as text, no per-process random ids."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({
        "svg.fonttype": "none", "svg.hashsalt": "modelpress", "font.size": 10,
        "font.family": ["DejaVu Sans", "sans-serif"], "axes.edgecolor": "#c5cad3", "text.color": INK,
        "axes.labelcolor": MUTED, "xtick.color": MUTED, "ytick.color": MUTED,
    })
    return matplotlib


def chart_id(*parts: Any) -> str:
    """An id prefix safe in HTML and CSS selectors (``chart-curve-1-eval-metric``)."""
    return "chart-" + "-".join(_SLUG.sub("-", str(p).lower()).strip("-") or "x" for p in parts)


def _axes(width_in: float, height_in: float, left: float, bottom: float, top: float = 0.32, right: float = 0.12) -> Any:
    """A figure with one axes placed by margins in inches (a layout engine would double the render time)."""
    from matplotlib.figure import Figure

    _matplotlib()
    fig = Figure(figsize=(width_in, height_in), dpi=_DPI)
    box = (left / width_in, bottom / height_in, 1 - (left + right) / width_in, 1 - (bottom + top) / height_in)
    return fig.add_axes(box)


def _to_svg(ax: Any, cid: str, title: str) -> Markup:
    """The axes' figure as an inline ``<svg>`` whose every id (and reference to one) starts with ``cid``."""
    from matplotlib.text import Text

    fig = ax.figure
    for text in fig.findobj(Text):
        text.set_parse_math(False)  # labels are user text: '$' is a dollar, not mathtext
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'\s(?:xmlns(?::xlink)?)="[^"]*"', "", svg)  # HTML's parser knows SVG; no URLs left in the page
    svg = _TAG.sub(lambda m: _ID_REF.sub(lambda r: r.group(1) + cid + "-", m.group(0)), svg)
    # Only markup matplotlib wrote is here; every text it holds was XML-escaped by matplotlib.
    return Markup(svg.replace("<svg", f'<svg class="chart" role="img" aria-label="{_attr(title)}"', 1))


def _attr(text: str) -> str:
    return str(Markup.escape(text))


@lru_cache(maxsize=512)
def _hbars(
    cid: str, title: str, labels: tuple[str, ...], values: tuple[float, ...], colours: tuple[str, ...],
    value_labels: tuple[str, ...], width_in: float,
) -> Markup:
    """Horizontal bars from zero, labelled on the left, each value printed right of its bar (cached: pure)."""
    with _DRAWING:
        return _draw_hbars(cid, title, labels, values, colours, value_labels, width_in)


def _draw_hbars(
    cid: str, title: str, labels: tuple[str, ...], values: tuple[float, ...], colours: tuple[str, ...],
    value_labels: tuple[str, ...], width_in: float,
) -> Markup:
    left = 0.12 + 0.075 * max(len(label) for label in labels)
    ax = _axes(width_in, 0.45 + 0.34 * len(values), left=left, bottom=0.08)
    rows = list(range(len(values)))
    bars = ax.barh(rows, values, height=0.62, color=list(colours), linewidth=0)
    ax.set_yticks(rows, labels=list(labels))
    ax.set_ylim(len(values) - 0.5, -0.5)  # first item on top
    top = max(max(values), 1e-12)
    ax.set_xlim(0, top * 1.42)  # room for the value labels right of the longest bar
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="y", length=0, labelcolor=INK)
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold", color=INK)
    texts = ax.bar_label(bars, labels=list(value_labels), padding=4, color=INK)
    for i, (bar, text) in enumerate(zip(bars, texts, strict=True)):
        bar.set_gid(f"bar-{i}")
        text.set_gid(f"value-{i}")
    return _to_svg(ax, cid, title)


def before_after(name: str, title: str, before: Any, after: Any, unit: str = "",
                 value_text: Callable[[Any], str] = fmt_number) -> Markup:
    """Two horizontal bars, before and after, on one scale from zero; '' when neither value is a number."""
    if not (is_num(before) or is_num(after)):
        return Markup("")
    values = [float(v) if is_num(v) else 0.0 for v in (before, after)]
    shown = [value_text(v) + unit if is_num(v) else "-" for v in (before, after)]
    return _hbars(chart_id(name), title, ("before", "after"), tuple(values), (BEFORE, AFTER), tuple(shown), 3.9)


def step_times(title: str, items: Sequence[tuple[str, Any]], unit: str = " s") -> Markup:
    """One horizontal bar per step (its wall time); '' when no step has a time."""
    shown = [(label, float(v)) for label, v in items if is_num(v)]
    if not shown:
        return Markup("")
    labels = tuple(label if len(label) <= 28 else label[:27] + "…" for label, _ in shown)
    values = tuple(v for _, v in shown)
    colours = tuple(SERIES_COLOURS[i % len(SERIES_COLOURS)] for i in range(len(shown)))
    texts = tuple(fmt_number(v, 3) + unit for v in values)
    return _hbars(chart_id("steps"), title, labels, values, colours, texts, 6.4)


def curve(name: str, title: str, points: Sequence[tuple[Any, Any]], colour: str = SERIES_COLOURS[0],
          x_label: str = "epoch") -> Markup:
    """A line with point markers (x = epoch); '' when no point has two numbers."""
    pts = tuple((float(x), float(y)) for x, y in points if is_num(x) and is_num(y))
    if not pts:
        return Markup("")
    return _curve(chart_id(name), title, pts, colour, x_label)


@lru_cache(maxsize=512)
def _curve(cid: str, title: str, pts: tuple[tuple[float, float], ...], colour: str, x_label: str) -> Markup:
    """The line chart itself (cached: pure)."""
    with _DRAWING:
        return _draw_curve(cid, title, pts, colour, x_label)


def _draw_curve(cid: str, title: str, pts: tuple[tuple[float, float], ...], colour: str, x_label: str) -> Markup:
    ax = _axes(3.9, 2.3, left=0.62, bottom=0.48)
    (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour, linewidth=2, marker="o", markersize=4)
    line.set_gid("line")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel(x_label)
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold", color=INK)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(axis="y", color="#eceef2", linewidth=0.8)
    ax.set_axisbelow(True)
    return _to_svg(ax, cid, title)


class _Trial(NamedTuple):
    """One trial's point on the search scatter (``trial``: its index in the search)."""

    trial: int
    label: str
    x: float
    y: float
    met: bool
    pareto: bool
    winner: bool


def search_scatter(name: str, title: str, trials: Sequence[dict[str, Any]], objective: str,
                   metric_name: str, baseline_metric: Any = None, min_metric: Any = None) -> Markup:
    """A search's trials: objective (x: latency ms or size MB) vs task metric (y); the Pareto front joined,
    the winner ringed, trials that missed the constraints hollow, ``min_metric`` (the constraint) dashed.
    ``trials``: ``{"index", "label", "x", "y", "met", "pareto", "winner"}`` (marker ids ``-trial-<index>``);
    '' when no trial has both numbers."""
    pts = tuple(_Trial(int(t.get("index", i)), str(t.get("label", "")), float(t["x"]), float(t["y"]),
                       bool(t.get("met")), bool(t.get("pareto")), bool(t.get("winner")))
                for i, t in enumerate(trials) if is_num(t.get("x")) and is_num(t.get("y")))
    if not pts:
        return Markup("")
    floor = float(min_metric) if is_num(min_metric) else None
    base = float(baseline_metric) if is_num(baseline_metric) else None
    with _DRAWING:
        return _draw_search_scatter(chart_id(name), title, pts, objective, metric_name, base, floor)


def _focus_range(ys: Sequence[float], focus: Sequence[float]) -> tuple[float, float] | None:
    """The y range that keeps what matters readable (the trials that met the constraints, the budget line,
    the input's metric) when the other trials lie so far off that they would squash it; None: plot all."""
    if not focus:
        return None
    lo, hi = min(focus), max(focus)
    pad = 0.3 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 1e-6)
    lo, hi = lo - pad, hi + pad
    if (min(ys) >= lo and max(ys) <= hi) or max(ys) - min(ys) <= 3 * (hi - lo):
        return None
    return lo, hi


def _draw_search_scatter(cid: str, title: str, pts: tuple[_Trial, ...],
                         objective: str, metric_name: str, base: float | None, floor: float | None) -> Markup:
    from matplotlib.lines import Line2D

    ax = _axes(7.8, 3.2, left=0.7, bottom=0.55, right=2.4)
    focus = [p.y for p in pts if p.met] + [v for v in (floor, base) if v is not None]
    view = _focus_range([p.y for p in pts], focus)
    drawn: list[tuple[float, float]] = []
    for trial, label, x, y, met, _front, winner in pts:
        shown, marker, note = y, "o", label
        if view is not None and not view[0] <= y <= view[1]:  # off the scale: pinned to the edge, value printed
            below = y < view[0]
            shown, marker = (view[0], "v") if below else (view[1], "^")
            note = f"{label} {fmt_number(y)} {'↓' if below else '↑'}"
        drawn.append((x, shown))
        dot = ax.scatter([x], [shown], s=70 if winner else 36, marker=marker,
                         color=SERIES_COLOURS[0] if met else "white",
                         edgecolors=SERIES_COLOURS[1] if winner else SERIES_COLOURS[0], linewidths=2.5 if winner else 1.2,
                         zorder=3, clip_on=False)
        dot.set_gid(f"trial-{trial}")
        ax.annotate(note, (x, shown), textcoords="offset points", xytext=(5, 4), fontsize=8, color=MUTED)
    keys = [Line2D([], [], linestyle="", marker="o", markersize=6, markerfacecolor=SERIES_COLOURS[0],
                   markeredgecolor=SERIES_COLOURS[0], label="met the constraints"),
            Line2D([], [], linestyle="", marker="o", markersize=6, markerfacecolor="white",
                   markeredgecolor=SERIES_COLOURS[0], label="missed them"),
            Line2D([], [], linestyle="", marker="o", markersize=8, markerfacecolor=SERIES_COLOURS[0],
                   markeredgecolor=SERIES_COLOURS[1], markeredgewidth=2.5, label="winner")]
    front = sorted((x, shown) for (x, shown), p in zip(drawn, pts, strict=True) if p.pareto)
    if len(front) > 1:
        (line,) = ax.plot([p[0] for p in front], [p[1] for p in front], color=SERIES_COLOURS[2], linewidth=1.5,
                          zorder=2)
        line.set_gid("pareto")
        keys.append(Line2D([], [], color=SERIES_COLOURS[2], linewidth=1.5, label="Pareto front"))
    if floor is not None:
        limit = ax.axhline(floor, color=SERIES_COLOURS[3], linestyle="--", linewidth=1)
        limit.set_gid("constraint")
        keys.append(Line2D([], [], color=SERIES_COLOURS[3], linestyle="--", linewidth=1,
                           label="budget (input minus max drop)"))
    if base is not None:
        ref = ax.axhline(base, color=BEFORE, linestyle=":", linewidth=1)
        ref.set_gid("input")
        keys.append(Line2D([], [], color=BEFORE, linestyle=":", linewidth=1, label="input model"))
    if view is not None:
        ax.set_ylim(*view)
        keys.append(Line2D([], [], linestyle="", marker="v", markersize=6, markerfacecolor="white",
                           markeredgecolor=SERIES_COLOURS[0], label="off the scale (value shown)"))
    legend = ax.legend(handles=keys, loc="upper left", bbox_to_anchor=(1.03, 1.0), frameon=False, fontsize=8)
    legend.set_gid("legend")
    ax.set_xlabel(OBJECTIVES[objective].axis if objective in OBJECTIVES else objective)
    ax.set_ylabel(metric_name)
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold", color=INK)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(color="#eceef2", linewidth=0.8)
    ax.set_axisbelow(True)
    return _to_svg(ax, cid, title)
