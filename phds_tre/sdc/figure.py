"""Matplotlib figures captured in the site kernel: kind ``"figure"``.

The kernel extension (:mod:`phds_tre.kernel`) reads the artists of every
figure a cell makes (bars, histogram counts, scatter points, lines, error
bars, filled areas, images, meshes, texts) into the evidence of a
:class:`FigureOutput`. The figure is never released as the kernel drew it:
the output displays a PNG **redrawn from the evidence, with only what the
rules let through**, inside its ``text/html`` (a ``data:`` URI, as
:func:`phds_tre.sdc.hist` does), and the node regenerates that HTML from the
re-checked evidence with the site's policy.

Rules, per element (DESIGN.md, "figures"):

============= ============================================================= ===========
rule          when                                                          status
============= ============================================================= ===========
threshold     a bar whose contributors are known (``plt.hist``: the kernel  suppressed
              counts the rows in each bin) with ``0 < n < min_count``; a
              bar of another chart whose height is a whole number
              ``0 < h < min_count`` (a possible small count)
zeros         an empty histogram bin, when the site's policy says zeros     suppressed
              are disclosive
secondary     a suppressed bar that the rest of the axes would give away:   fail
              stacked bars, a cumulative or density histogram, or other
              data (lines, error bars, areas, labels with numbers) drawn on
              the same axes
single_value  a scatter of individual points (``scatter``, ``eventplot``,   fail
              markers drawn without a line): row-level data
single_value  a histogram with automatic bins (``plt.hist(x)`` without       fail
              ``range=`` or explicit edges): its outer edges are the
              smallest and largest values, unless the site's policy allows
              ``min`` and ``max``
threshold     an image or mesh of whole numbers with a value                fail
              ``0 < v < min_count`` (a heatmap of small counts)
unchecked     bars not made from counted rows (``plt.bar``), weighted,      review
              cumulative or stacked histograms, lines, error bars, areas,
              images, artists the capture does not understand (left out of
              the redrawn figure), polar or 3-D axes (not redrawn)
free_text     titles, labels, legends, tick labels and annotations holding  review
              numbers
============= ============================================================= ===========

A suppressed bar is drawn as an empty hatched band, like :func:`sdc.hist`.
The verdict: any ``fail`` → fail; else any review → review; else suppressed
bars → the policy's ``suppressed_verdict``; else pass (only a figure of
histograms whose every bin was counted and passed, and plain text, passes).

The kernel is untrusted (DESIGN.md, principle 3): :func:`FigureEvidence.validate`
checks that the evidence is arithmetically consistent (a plain histogram's
heights are its counts, a density histogram's areas are proportional to them),
:func:`phds_tre.sdc.recheck` re-applies the rules with the site's policy and
the node's data-aware scanning looks at what no rule here recognises. A
researcher who sends raw PNG bytes instead gets them judged as an unstructured
image (review at best).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from phds_tre.sdc.output import CHECK_COLUMNS, EvidenceError, SDCOutput, badge_html, register_kind
from phds_tre.sdc.policy import Policy

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "BAR_COLUMNS",
    "MAX_VALUES",
    "FigureEvidence",
    "FigureOutput",
]

#: Most numbers (line points, image pixels, polygon vertices) one figure's evidence keeps.
MAX_VALUES = 200_000
#: Longest text kept from a figure.
MAX_TEXT = 1000
#: Columns of the releasable table of bars.
BAR_COLUMNS = ("axes", "group", "position", "extent", "base", "value")

_COLOR = re.compile(r"#[0-9a-fA-F]{6}(?:[0-9a-fA-F]{2})?")
_NAME = re.compile(r"[A-Za-z_][\w.\-]{0,59}")
_MARKERS = frozenset("ov^<>1234sphHDdPX*+x|_.,8") | {"None", "none", "", " "}
_LINESTYLES = frozenset({"-", "--", "-.", ":", "None", " ", ""})
_DRAWSTYLES = frozenset({"default", "steps", "steps-pre", "steps-mid", "steps-post"})
_SCALES = frozenset({"linear", "log", "symlog", "logit"})
_HA = frozenset({"left", "center", "right"})
_VA = frozenset({"top", "center", "bottom", "baseline", "center_baseline"})
_COORDS = frozenset({"data", "axes", "xaxis", "yaxis", "figure"})
_NUMERIC_TEXT = re.compile(
    r"\d|\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|"
    r"fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|"
    r"seventy|eighty|ninety|hundred|thousand|million|dozen)\b",
    re.IGNORECASE,
)


# ---------------------------------------------------------------------------
# validation helpers (the payload is untrusted JSON)
# ---------------------------------------------------------------------------
def _obj(x: Any, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise EvidenceError(f"figure evidence: {what} must be an object")
    return x


def _lst(x: Any, what: str) -> list[Any]:
    if not isinstance(x, list):
        raise EvidenceError(f"figure evidence: {what} must be a list")
    return x


def _num(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise EvidenceError(f"figure evidence: {what} must be a finite number")
    return float(x)


def _opt_num(x: Any, what: str) -> float | None:
    return None if x is None else _num(x, what)


def _count(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise EvidenceError(f"figure evidence: {what} must be a non-negative integer")
    return x


def _bool(x: Any, what: str) -> bool:
    if not isinstance(x, bool):
        raise EvidenceError(f"figure evidence: {what} must be true or false")
    return x


def _text(x: Any, what: str) -> str:
    if not isinstance(x, str) or len(x) > MAX_TEXT:
        raise EvidenceError(f"figure evidence: {what} must be a string of at most {MAX_TEXT}")
    return x


def _opt_text(x: Any, what: str) -> str | None:
    return None if x is None else _text(x, what)


def _choice(x: Any, allowed: frozenset[str], what: str) -> str:
    if not isinstance(x, str) or x not in allowed:
        raise EvidenceError(f"figure evidence: {what} {x!r} is not one of {sorted(allowed)}")
    return x


def _color(x: Any, what: str = "color") -> str:
    if not isinstance(x, str) or not _COLOR.fullmatch(x):
        raise EvidenceError(f"figure evidence: {what} must be a hex colour")
    return x


def _name(x: Any, what: str) -> str:
    if not isinstance(x, str) or not _NAME.fullmatch(x):
        raise EvidenceError(f"figure evidence: {what} must be a name")
    return x


def _array(x: Any, what: str, ndim: int | tuple[int, ...]) -> np.ndarray:
    """Nested lists of finite numbers or null (NaN) of the given dimension(s)."""
    try:
        arr = np.array(x, dtype=object)
    except ValueError:
        raise EvidenceError(f"figure evidence: {what} is ragged") from None
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in dims:
        raise EvidenceError(f"figure evidence: {what} must have {ndim} dimension(s)")
    flat = arr.reshape(-1)
    out = np.empty(flat.shape, dtype=np.float64)
    for i, v in enumerate(flat):
        if v is None:
            out[i] = np.nan
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise EvidenceError(f"figure evidence: {what} must hold finite numbers or null")
        else:
            out[i] = v
    return out.reshape(arr.shape)


def _has_numbers(text: str | None) -> bool:
    return bool(text) and _NUMERIC_TEXT.search(text or "") is not None


# ---------------------------------------------------------------------------
# evidence
# ---------------------------------------------------------------------------
@dataclass
class Bar:
    """One bar: along the category axis from ``position`` over ``extent``; ``base`` to ``base + value``."""

    position: float
    extent: float
    base: float
    value: float
    count: int | None  # rows behind the bar, when the kernel counted them (plt.hist)


@dataclass
class HistInfo:
    """How a histogram's heights relate to its counts."""

    density: bool
    weighted: bool
    cumulative: bool
    stacked: bool  # a step histogram drawn stacked: heights are running totals
    data_range: bool  # automatic bins: the outer edges are the smallest and largest values


@dataclass
class BarGroup:
    """The bars of one ``bar``/``barh``/``hist`` call (one dataset)."""

    orientation: str
    style: str  # "bar" | "step" | "stepfilled"
    label: str | None
    color: str
    hist: HistInfo | None
    bars: list[Bar]


@dataclass
class Line:
    """A Line2D: a curve, a step function, error bars' caps, or markers."""

    x: np.ndarray
    y: np.ndarray
    coords: str  # "data" | "xaxis" (x data, y axes) | "yaxis" (x axes, y data)
    color: str
    linestyle: str
    linewidth: float
    marker: str
    drawstyle: str
    label: str | None
    errorbar: bool

    @property
    def markers_only(self) -> bool:
        """Points without a line joining them: a scatter."""
        return self.linestyle in ("None", " ", "") and self.marker not in ("None", "none", "", " ")


@dataclass
class Segments:
    """A LineCollection (error bars, vlines/hlines)."""

    segments: list[np.ndarray]
    color: str
    linewidth: float
    label: str | None
    errorbar: bool


@dataclass
class Polygons:
    """A PolyCollection (fill_between, violins, hexbin cells with ``values``)."""

    polygons: list[np.ndarray]
    color: str
    alpha: float
    label: str | None
    values: np.ndarray | None
    cmap: str
    vmin: float | None
    vmax: float | None


@dataclass
class Grid:
    """An image (imshow) or a mesh (pcolormesh, hist2d)."""

    kind: str  # "image" | "mesh"
    shape: list[int]
    values: np.ndarray | None  # None when too large to keep
    x: np.ndarray | None  # mesh corner coordinates
    y: np.ndarray | None
    extent: list[float] | None
    cmap: str
    vmin: float | None
    vmax: float | None
    origin: str


@dataclass
class Text:
    """A text drawn on the axes or the figure."""

    text: str
    x: float
    y: float
    coords: str
    ha: str
    va: str
    rotation: float
    fontsize: float
    color: str


@dataclass
class Ticks:
    """Tick labels the researcher chose (categories, FixedFormatter)."""

    positions: list[float]
    labels: list[str]


@dataclass
class AxesEvidence:
    """Everything drawn on one Axes."""

    bounds: list[float]
    projection: str
    colorbar: bool
    frame: bool
    axis_on: bool
    titles: list[str]  # left, center, right
    xlabel: str
    ylabel: str
    xscale: str
    yscale: str
    xdate: bool
    ydate: bool
    yaxis_right: bool
    xaxis_top: bool
    xaxis_visible: bool
    yaxis_visible: bool
    sharex: int | None  # an earlier Axes whose x axis this one shares (twinx, sharex=True)
    sharey: int | None
    xticks: Ticks | None
    yticks: Ticks | None
    legend: list[str] | None
    bars: list[BarGroup] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    points: list[tuple[str, int]] = field(default_factory=list)  # (kind, number of points)
    segments: list[Segments] = field(default_factory=list)
    polygons: list[Polygons] = field(default_factory=list)
    grids: list[Grid] = field(default_factory=list)
    texts: list[Text] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def free_texts(self) -> list[str]:
        """Titles, labels, legend and tick texts: free text the researcher wrote."""
        out = [*self.titles, self.xlabel, self.ylabel, *(self.legend or [])]
        for ticks in (self.xticks, self.yticks):
            if ticks is not None:
                out.extend(ticks.labels)
        labels = [g.label for g in self.bars] + [ln.label for ln in self.lines]
        labels += [s.label for s in self.segments] + [p.label for p in self.polygons]
        out.extend(lab for lab in labels if lab and not lab.startswith("_"))
        return [t for t in out if t]


@dataclass
class FigureEvidence:
    """A captured figure: its size, figure-level texts and every Axes."""

    figsize: list[float]
    suptitle: str
    texts: list[Text]
    axes: list[AxesEvidence]
    other: list[str]

    # ---- JSON ---------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Evidence as strict JSON (NaN → null)."""
        return {
            "figsize": list(self.figsize),
            "suptitle": self.suptitle,
            "texts": [_text_json(t) for t in self.texts],
            "axes": [_axes_json(a) for a in self.axes],
            "other": list(self.other),
        }

    @classmethod
    def from_json(cls, data: Any) -> FigureEvidence:
        """Parse and validate evidence; :class:`EvidenceError` when malformed or inconsistent."""
        d = _obj(data, "figure")
        try:
            figsize = [_num(v, "figsize") for v in _lst(d["figsize"], "figsize")]
            if len(figsize) != 2 or not all(0 < v <= 100 for v in figsize):
                raise EvidenceError("figure evidence: figsize must be two positive sizes")
            ev = cls(
                figsize=figsize,
                suptitle=_text(d["suptitle"], "suptitle"),
                texts=[_text_from(t) for t in _lst(d["texts"], "texts")],
                axes=[_axes_from(a) for a in _lst(d["axes"], "axes")],
                other=[_name(o, "artist type") for o in _lst(d["other"], "other")],
            )
        except KeyError as exc:
            raise EvidenceError(f"figure evidence is incomplete: missing {exc}") from None
        ev.validate()
        return ev

    def validate(self) -> None:
        """Arithmetic consistency of the histograms, and the size of the evidence."""
        total = 0
        for k, ax in enumerate(self.axes):
            if any(s is not None and s >= k for s in (ax.sharex, ax.sharey)):
                raise EvidenceError("figure evidence: an Axes can only share an earlier one's axis")
            for g in ax.bars:
                _validate_hist(g)
            total += sum(ln.x.size + ln.y.size for ln in ax.lines)
            total += sum(sum(s.size for s in seg.segments) for seg in ax.segments)
            total += sum(sum(p.size for p in poly.polygons) for poly in ax.polygons)
            total += sum(0 if g.values is None else g.values.size for g in ax.grids)
        if total > 2 * MAX_VALUES:
            raise EvidenceError("figure evidence holds more values than a capture keeps")


def _validate_hist(g: BarGroup) -> None:
    if g.hist is None:
        if any(b.count is not None for b in g.bars):
            raise EvidenceError("figure evidence: bars outside a histogram carry counts")
        return
    if any(b.count is None for b in g.bars):
        raise EvidenceError("figure evidence: every histogram bar needs its count")
    h = g.hist
    counts = np.array([b.count for b in g.bars], dtype=np.float64)
    values = np.array([b.value for b in g.bars], dtype=np.float64)
    extents = np.array([abs(b.extent) for b in g.bars], dtype=np.float64)
    if h.weighted or h.cumulative or h.stacked:
        return  # the heights are another statistic; the rules read the counts
    if h.density:
        if np.any((counts == 0) != (values == 0)):
            raise EvidenceError("figure evidence: a density bar is empty exactly when its bin is")
        nz = counts > 0
        if nz.any():
            ratio = values[nz] * extents[nz] / counts[nz]
            if not np.allclose(ratio, ratio[0], rtol=1e-6, atol=0):
                raise EvidenceError(
                    "figure evidence: density heights are not proportional to the bin counts"
                )
        return
    if not np.allclose(values, counts, rtol=1e-9, atol=1e-9):
        raise EvidenceError("figure evidence: a histogram's heights are not its counts")


def _text_json(t: Text) -> dict[str, Any]:
    return {
        "text": t.text,
        "x": t.x,
        "y": t.y,
        "coords": t.coords,
        "ha": t.ha,
        "va": t.va,
        "rotation": t.rotation,
        "fontsize": t.fontsize,
        "color": t.color,
    }


def _text_from(d: Any) -> Text:
    d = _obj(d, "text")
    return Text(
        text=_text(d["text"], "text"),
        x=_num(d["x"], "text x"),
        y=_num(d["y"], "text y"),
        coords=_choice(d["coords"], _COORDS, "text coords"),
        ha=_choice(d["ha"], _HA, "text ha"),
        va=_choice(d["va"], _VA, "text va"),
        rotation=_num(d["rotation"], "text rotation"),
        fontsize=min(max(_num(d["fontsize"], "fontsize"), 1.0), 72.0),
        color=_color(d["color"]),
    )


def _arr_json(a: np.ndarray) -> list[Any]:
    from phds_tre.sdc.jsonio import array_to_json

    return array_to_json(a)


def _ticks_json(t: Ticks | None) -> dict[str, Any] | None:
    return None if t is None else {"positions": list(t.positions), "labels": list(t.labels)}


def _ticks_from(d: Any, what: str) -> Ticks | None:
    if d is None:
        return None
    d = _obj(d, what)
    positions = [_num(p, what) for p in _lst(d["positions"], what)]
    labels = [_text(s, what) for s in _lst(d["labels"], what)]
    if len(positions) != len(labels):
        raise EvidenceError(f"figure evidence: {what} need one label per position")
    return Ticks(positions, labels)


def _axes_json(a: AxesEvidence) -> dict[str, Any]:
    return {
        "bounds": list(a.bounds),
        "projection": a.projection,
        "colorbar": a.colorbar,
        "frame": a.frame,
        "axis_on": a.axis_on,
        "titles": list(a.titles),
        "xlabel": a.xlabel,
        "ylabel": a.ylabel,
        "xscale": a.xscale,
        "yscale": a.yscale,
        "xdate": a.xdate,
        "ydate": a.ydate,
        "yaxis_right": a.yaxis_right,
        "xaxis_top": a.xaxis_top,
        "xaxis_visible": a.xaxis_visible,
        "yaxis_visible": a.yaxis_visible,
        "sharex": a.sharex,
        "sharey": a.sharey,
        "xticks": _ticks_json(a.xticks),
        "yticks": _ticks_json(a.yticks),
        "legend": None if a.legend is None else list(a.legend),
        "bars": [
            {
                "orientation": g.orientation,
                "style": g.style,
                "label": g.label,
                "color": g.color,
                "hist": None
                if g.hist is None
                else {
                    "density": g.hist.density,
                    "weighted": g.hist.weighted,
                    "cumulative": g.hist.cumulative,
                    "stacked": g.hist.stacked,
                    "data_range": g.hist.data_range,
                },
                "bars": [
                    {
                        "position": b.position,
                        "extent": b.extent,
                        "base": b.base,
                        "value": b.value,
                        "count": b.count,
                    }
                    for b in g.bars
                ],
            }
            for g in a.bars
        ],
        "lines": [
            {
                "x": _arr_json(ln.x),
                "y": _arr_json(ln.y),
                "coords": ln.coords,
                "color": ln.color,
                "linestyle": ln.linestyle,
                "linewidth": ln.linewidth,
                "marker": ln.marker,
                "drawstyle": ln.drawstyle,
                "label": ln.label,
                "errorbar": ln.errorbar,
            }
            for ln in a.lines
        ],
        "points": [{"kind": k, "n": n} for k, n in a.points],
        "segments": [
            {
                "segments": [_arr_json(s) for s in seg.segments],
                "color": seg.color,
                "linewidth": seg.linewidth,
                "label": seg.label,
                "errorbar": seg.errorbar,
            }
            for seg in a.segments
        ],
        "polygons": [
            {
                "polygons": [_arr_json(p) for p in poly.polygons],
                "color": poly.color,
                "alpha": poly.alpha,
                "label": poly.label,
                "values": None if poly.values is None else _arr_json(poly.values),
                "cmap": poly.cmap,
                "vmin": poly.vmin,
                "vmax": poly.vmax,
            }
            for poly in a.polygons
        ],
        "grids": [
            {
                "kind": g.kind,
                "shape": list(g.shape),
                "values": None if g.values is None else _arr_json(g.values),
                "x": None if g.x is None else _arr_json(g.x),
                "y": None if g.y is None else _arr_json(g.y),
                "extent": None if g.extent is None else list(g.extent),
                "cmap": g.cmap,
                "vmin": g.vmin,
                "vmax": g.vmax,
                "origin": g.origin,
            }
            for g in a.grids
        ],
        "texts": [_text_json(t) for t in a.texts],
        "other": list(a.other),
    }


def _bar_group_from(d: Any) -> BarGroup:
    d = _obj(d, "bar group")
    hist = d["hist"]
    if hist is not None:
        h = _obj(hist, "hist")
        hist = HistInfo(
            density=_bool(h["density"], "density"),
            weighted=_bool(h["weighted"], "weighted"),
            cumulative=_bool(h["cumulative"], "cumulative"),
            stacked=_bool(h["stacked"], "stacked"),
            data_range=_bool(h["data_range"], "data_range"),
        )
    bars = []
    for b in _lst(d["bars"], "bars"):
        b = _obj(b, "bar")
        count = b.get("count")
        bars.append(
            Bar(
                position=_num(b["position"], "bar position"),
                extent=_num(b["extent"], "bar extent"),
                base=_num(b["base"], "bar base"),
                value=_num(b["value"], "bar value"),
                count=None if count is None else _count(count, "bar count"),
            )
        )
    return BarGroup(
        orientation=_choice(d["orientation"], frozenset({"vertical", "horizontal"}), "orientation"),
        style=_choice(d["style"], frozenset({"bar", "step", "stepfilled"}), "bar style"),
        label=_opt_text(d["label"], "label"),
        color=_color(d["color"]),
        hist=hist,
        bars=bars,
    )


def _line_from(d: Any) -> Line:
    d = _obj(d, "line")
    x = _array(d["x"], "line x", 1)
    y = _array(d["y"], "line y", 1)
    if x.shape != y.shape:
        raise EvidenceError("figure evidence: a line needs as many x as y values")
    return Line(
        x=x,
        y=y,
        coords=_choice(d["coords"], frozenset({"data", "xaxis", "yaxis"}), "line coords"),
        color=_color(d["color"]),
        linestyle=_choice(d["linestyle"], _LINESTYLES, "linestyle"),
        linewidth=_num(d["linewidth"], "linewidth"),
        marker=_choice(d["marker"], _MARKERS, "marker"),
        drawstyle=_choice(d["drawstyle"], _DRAWSTYLES, "drawstyle"),
        label=_opt_text(d["label"], "label"),
        errorbar=_bool(d["errorbar"], "errorbar"),
    )


def _vertices(x: Any, what: str) -> np.ndarray:
    arr = _array(x, what, 2)
    if arr.size and arr.shape[1] != 2:
        raise EvidenceError(f"figure evidence: {what} must be (x, y) pairs")
    return arr.reshape(-1, 2)


def _segments_from(d: Any) -> Segments:
    d = _obj(d, "segments")
    return Segments(
        segments=[_vertices(s, "segment") for s in _lst(d["segments"], "segments")],
        color=_color(d["color"]),
        linewidth=_num(d["linewidth"], "linewidth"),
        label=_opt_text(d["label"], "label"),
        errorbar=_bool(d["errorbar"], "errorbar"),
    )


def _polygons_from(d: Any) -> Polygons:
    d = _obj(d, "polygons")
    polygons = [_vertices(p, "polygon") for p in _lst(d["polygons"], "polygons")]
    values = None if d["values"] is None else _array(d["values"], "polygon values", 1)
    if values is not None and values.shape != (len(polygons),):
        raise EvidenceError("figure evidence: one value per polygon")
    return Polygons(
        polygons=polygons,
        color=_color(d["color"]),
        alpha=min(max(_num(d["alpha"], "alpha"), 0.0), 1.0),
        label=_opt_text(d["label"], "label"),
        values=values,
        cmap=_name(d["cmap"], "colormap"),
        vmin=_opt_num(d["vmin"], "vmin"),
        vmax=_opt_num(d["vmax"], "vmax"),
    )


def _grid_from(d: Any) -> Grid:
    d = _obj(d, "grid")
    kind = _choice(d["kind"], frozenset({"image", "mesh"}), "grid kind")
    shape = [_count(n, "grid shape") for n in _lst(d["shape"], "grid shape")]
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (3, 4)):
        raise EvidenceError("figure evidence: a grid is 2-D, or 3-D with RGB(A) channels")
    values = None if d["values"] is None else _array(d["values"], "grid values", (2, 3))
    if values is not None and list(values.shape) != shape:
        raise EvidenceError("figure evidence: grid values do not have the grid's shape")
    x = None if d["x"] is None else _array(d["x"], "mesh x", 2)
    y = None if d["y"] is None else _array(d["y"], "mesh y", 2)
    if kind == "mesh":
        corners = (shape[0] + 1, shape[1] + 1)
        if len(shape) != 2 or (x is not None and (x.shape != corners or y is None)):
            raise EvidenceError("figure evidence: mesh corners do not fit the mesh")
        if y is not None and y.shape != corners:
            raise EvidenceError("figure evidence: mesh corners do not fit the mesh")
    extent = d["extent"]
    if extent is not None:
        extent = [_num(v, "extent") for v in _lst(extent, "extent")]
        if len(extent) != 4:
            raise EvidenceError("figure evidence: an extent has four numbers")
    return Grid(
        kind=kind,
        shape=shape,
        values=values,
        x=x,
        y=y,
        extent=extent,
        cmap=_name(d["cmap"], "colormap"),
        vmin=_opt_num(d["vmin"], "vmin"),
        vmax=_opt_num(d["vmax"], "vmax"),
        origin=_choice(d["origin"], frozenset({"upper", "lower"}), "origin"),
    )


def _axes_from(d: Any) -> AxesEvidence:
    d = _obj(d, "axes")
    bounds = [_num(v, "bounds") for v in _lst(d["bounds"], "bounds")]
    if len(bounds) != 4:
        raise EvidenceError("figure evidence: axes bounds have four numbers")
    titles = [_text(t, "title") for t in _lst(d["titles"], "titles")]
    if len(titles) != 3:
        raise EvidenceError("figure evidence: titles are left, center and right")
    legend = d["legend"]
    return AxesEvidence(
        bounds=bounds,
        projection=_name(d["projection"], "projection"),
        colorbar=_bool(d["colorbar"], "colorbar"),
        frame=_bool(d["frame"], "frame"),
        axis_on=_bool(d["axis_on"], "axis_on"),
        titles=titles,
        xlabel=_text(d["xlabel"], "xlabel"),
        ylabel=_text(d["ylabel"], "ylabel"),
        xscale=_choice(d["xscale"], _SCALES, "xscale"),
        yscale=_choice(d["yscale"], _SCALES, "yscale"),
        xdate=_bool(d["xdate"], "xdate"),
        ydate=_bool(d["ydate"], "ydate"),
        yaxis_right=_bool(d["yaxis_right"], "yaxis_right"),
        xaxis_top=_bool(d["xaxis_top"], "xaxis_top"),
        xaxis_visible=_bool(d["xaxis_visible"], "xaxis_visible"),
        yaxis_visible=_bool(d["yaxis_visible"], "yaxis_visible"),
        sharex=None if d["sharex"] is None else _count(d["sharex"], "sharex"),
        sharey=None if d["sharey"] is None else _count(d["sharey"], "sharey"),
        xticks=_ticks_from(d["xticks"], "xticks"),
        yticks=_ticks_from(d["yticks"], "yticks"),
        legend=None if legend is None else [_text(t, "legend") for t in _lst(legend, "legend")],
        bars=[_bar_group_from(g) for g in _lst(d["bars"], "bars")],
        lines=[_line_from(ln) for ln in _lst(d["lines"], "lines")],
        points=[
            (
                _choice(_obj(p, "points")["kind"], frozenset({"scatter", "events"}), "points"),
                _count(p["n"], "points"),
            )
            for p in _lst(d["points"], "points")
        ],
        segments=[_segments_from(s) for s in _lst(d["segments"], "segments")],
        polygons=[_polygons_from(p) for p in _lst(d["polygons"], "polygons")],
        grids=[_grid_from(g) for g in _lst(d["grids"], "grids")],
        texts=[_text_from(t) for t in _lst(d["texts"], "texts")],
        other=[_name(o, "artist type") for o in _lst(d["other"], "other")],
    )


# ---------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------
@dataclass
class FigureEvaluation:
    """A policy applied to a captured figure."""

    checks: pd.DataFrame
    status: str
    reasons: list[str]
    suppressed: dict[tuple[int, int], np.ndarray]  # (axes, group) → bool per bar


def _whole_small(values: np.ndarray, m: int) -> bool:
    """Whether every finite value is a whole number and some lie in ``0 < v < m``."""
    fin = values[np.isfinite(values)]
    return bool(fin.size and np.all(fin == np.round(fin)) and np.any((fin > 0) & (fin < m)))


#: Every check a figure can get: key → (rule, status, detail; ``{m}`` is the minimum count).
_CHECKS: dict[str, tuple[str, str, str]] = {
    "threshold": (
        "threshold",
        "fail",
        "fewer than {m} children in this bin (minimum cell count): suppressed",
    ),
    "bar_threshold": (
        "threshold",
        "fail",
        "a bar height that is a whole number below {m} (a possible small count): suppressed",
    ),
    "zeros": (
        "zeros",
        "fail",
        "empty bin: a zero discloses that no child has these values (class disclosure): suppressed",
    ),
    "hist_secondary": (
        "secondary",
        "fail",
        "a cumulative, density or stacked histogram gives a suppressed bin away (running "
        "totals, or areas that sum to one)",
    ),
    "secondary": (
        "secondary",
        "fail",
        "a suppressed bar could be recovered from stacked bars or from lines, error bars, "
        "areas or numbers drawn on the same axes",
    ),
    "scatter": (
        "single_value",
        "fail",
        "a scatter of individual points: row-level data (each point is a child)",
    ),
    "markers": (
        "single_value",
        "fail",
        "markers without a line: a scatter of individual values (row-level data)",
    ),
    "hist_range": (
        "single_value",
        "fail",
        "automatic bins: the first and last bin edges are the smallest and largest values "
        "(one child's own values); give bins= edges or range=, or use sdc.hist",
    ),
    "grid_threshold": (
        "threshold",
        "fail",
        "coloured cells of whole numbers with values below {m} (a heatmap of possible small "
        "counts)",
    ),
    "bars": (
        "unchecked",
        "review",
        "bars not drawn from counted rows (plt.bar): a reviewer decides what they show",
    ),
    "hist_heights": (
        "unchecked",
        "review",
        "weighted, cumulative or stacked histogram: the heights are not the checked counts",
    ),
    "lines": ("unchecked", "review", "a line, curve or error bar: a reviewer decides"),
    "areas": ("unchecked", "review", "filled areas: a reviewer decides what they show"),
    "images": ("unchecked", "review", "an image or mesh: cannot be checked exactly"),
    "large_images": (
        "unchecked",
        "review",
        "an image or mesh too large to keep: not redrawn, cannot be released",
    ),
    "annotations": ("free_text", "review", "annotations hold numbers"),
    "labels": ("free_text", "review", "titles, labels, legend or tick labels hold numbers"),
    "other": (
        "unchecked",
        "review",
        "an artist the capture does not understand: left out of the redrawn figure",
    ),
    "projection": ("unchecked", "review", "polar or 3-D axes: not redrawn"),
    "colorbar": ("unchecked", "pass", "a colorbar: not redrawn"),
}
#: Checks that suppress a bar rather than fail the figure.
_SUPPRESSING = frozenset({"threshold", "bar_threshold", "zeros"})
#: Reasons, in this order, each prefixed by how many checks of its keys there were.
_REASONS: tuple[tuple[tuple[str, ...], str], ...] = (
    # Empty bins count with the threshold: naming the zeros rule would say a hidden bar is 0.
    (
        ("threshold", "bar_threshold", "zeros"),
        "bar(s) suppressed by the threshold rule (hatched bands)",
    ),
    (("secondary", "hist_secondary"), "axes where a suppressed bar could be recovered"),
    (("scatter", "markers"), "scatter(s) of individual points: row-level data is never released"),
    (("hist_range",), "histogram(s) whose outer bin edges are the smallest and largest values"),
    (("grid_threshold",), "heatmap(s) of whole numbers with values below the minimum count"),
    (("bars", "hist_heights"), "bar chart(s) whose heights are not checked counts"),
    (("lines",), "line(s), curve(s) or error bar(s): a reviewer decides"),
    (("areas",), "filled area(s): a reviewer decides"),
    (("images", "large_images"), "image(s) or mesh(es): a reviewer decides"),
    (("annotations", "labels"), "place(s) where text holds numbers: a reviewer decides"),
    (("other",), "artist(s) the capture does not understand, left out of the redrawn figure"),
    (("projection",), "polar or 3-D axes, not redrawn"),
)


def _evaluate_bars(
    g: BarGroup, policy: Policy, add: Callable[[str, str], None], what: str
) -> np.ndarray:
    """Suppression of one bar group: counted bins by their counts, other bars by their heights."""
    m, zeros = policy.min_count, policy.zeros_disclosive
    sup = np.zeros(len(g.bars), dtype=bool)
    for bi, b in enumerate(g.bars):
        n = b.count if g.hist is not None else None
        key = None
        if n is not None:
            if 0 < n < m:
                key = "threshold"
            elif n == 0 and zeros:
                key = "zeros"
        elif b.value == round(b.value) and 0 < b.value < m:
            key = "bar_threshold"
        if key is not None:
            sup[bi] = True
            add(f"{what}[{bi}]", key)
    h = g.hist
    if h is None:
        add(what, "bars")
    elif h.weighted or h.cumulative or h.stacked:
        add(what, "hist_heights")
    if h is not None and sup.any() and (h.cumulative or h.density or h.stacked):
        add(what, "hist_secondary")
    extremes = {"min", "max"} & set(policy.single_value_statistics)
    if h is not None and h.data_range and extremes:
        add(what, "hist_range")
    return sup


def evaluate(ev: FigureEvidence, policy: Policy) -> FigureEvaluation:
    """Apply ``policy`` to a captured figure (rules: module docstring)."""
    m = policy.min_count
    rows: list[tuple[str, str, str, str, str]] = []
    keys: list[str] = []
    suppressed: dict[tuple[int, int], np.ndarray] = {}

    def check(where: str, column: str, key: str) -> None:
        """Record one check of ``_CHECKS[key]``."""
        rule, status, detail = _CHECKS[key]
        rows.append((where, column, rule, status, detail.format(m=m)))
        keys.append(key)

    for k, ax in enumerate(ev.axes):
        where = f"axes {k}"

        def add(column: str, key: str, where: str = where) -> None:
            """Record one check on this Axes."""
            check(where, column, key)

        if ax.colorbar:
            add("colorbar", "colorbar")
            continue
        if ax.projection != "rectilinear":
            add(ax.projection, "projection")
        for gi, g in enumerate(ax.bars):
            suppressed[(k, gi)] = _evaluate_bars(g, policy, add, f"bars {gi}")
        any_suppressed = any(suppressed[(k, gi)].any() for gi in range(len(ax.bars)))
        stacked = any(b.base != 0 for g in ax.bars for b in g.bars)
        for li, ln in enumerate(ax.lines):
            add(f"line {li}", "markers" if ln.markers_only and not ln.errorbar else "lines")
        for kind, n in ax.points:
            if n:
                add(kind, "scatter")
        for si in range(len(ax.segments)):
            add(f"segments {si}", "lines")
        for pi, poly in enumerate(ax.polygons):
            small = poly.values is not None and _whole_small(poly.values, m)
            add(f"polygons {pi}", "grid_threshold" if small else "areas")
        for gi, grid in enumerate(ax.grids):
            if grid.values is None:
                add(f"{grid.kind} {gi}", "large_images")
            elif len(grid.shape) == 2 and _whole_small(grid.values, m):
                add(f"{grid.kind} {gi}", "grid_threshold")
            else:
                add(f"{grid.kind} {gi}", "images")
        number_texts = any(_has_numbers(t.text) for t in ax.texts)
        if number_texts:
            add("texts", "annotations")
        if any(_has_numbers(t) for t in ax.free_texts()):
            add("labels", "labels")
        for name in ax.other:
            add(name, "other")
        exposed = bool(ax.lines or ax.segments or ax.polygons or ax.grids or number_texts)
        if any_suppressed and (stacked or exposed):
            add("bars", "secondary")
    if _has_numbers(ev.suptitle) or any(_has_numbers(t.text) for t in ev.texts):
        check("figure", "texts", "labels")
    for name in ev.other:
        check("figure", name, "other")
    checks = (
        pd.DataFrame(rows, columns=CHECK_COLUMNS)
        if rows
        else pd.DataFrame({c: pd.Series(dtype=object) for c in CHECK_COLUMNS})
    )
    n_sup = sum(int(s.sum()) for s in suppressed.values())
    statuses = [_CHECKS[key][1] for key in keys]
    # A failing bar is suppressed (the rest can still be released); any other failure is not.
    hard_fail = any(_CHECKS[k][1] == "fail" and k not in _SUPPRESSING for k in keys)
    reasons = [
        f"{n} {text}" for group, text in _REASONS if (n := sum(keys.count(key) for key in group))
    ]
    if hard_fail:
        status = "fail"
    elif "review" in statuses:
        status = "review"
    elif n_sup:
        status = policy.suppressed_verdict
        if status == "review":
            reasons.append(
                "suppression was applied: the site's policy has a reviewer confirm suppressed "
                "figures"
            )
    else:
        status = "pass"
    if not reasons:
        reasons.append("every bar was counted and passed every rule")
    return FigureEvaluation(checks, status, reasons, suppressed)


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------
class FigureOutput(SDCOutput[FigureEvaluation]):
    """A matplotlib figure captured in the kernel, checked and redrawn from releasable data.

    ``.table``: every bar (axes, group, position, extent, base, value) with
    suppressed bars' values NaN; ``.figure``: a new figure drawn only from what
    the rules let through (suppressed bars as hatched bands; scatters, unknown
    artists and polar/3-D axes left out).
    """

    kind = "figure"

    def __init__(self, evidence: FigureEvidence, policy: Policy) -> None:
        super().__init__(policy, "figure")
        self._evidence = evidence
        self._eval = evaluate(evidence, policy)
        rows = []
        for k, ax in enumerate(evidence.axes):
            for gi, g in enumerate(ax.bars):
                sup = self._eval.suppressed.get((k, gi), np.zeros(len(g.bars), dtype=bool))
                for bi, b in enumerate(g.bars):
                    value = np.nan if sup[bi] else b.value
                    rows.append((float(k), float(gi), b.position, b.extent, b.base, value))
        self._table = pd.DataFrame(
            np.array(rows, dtype=np.float64).reshape(-1, len(BAR_COLUMNS)),
            columns=pd.Index(BAR_COLUMNS),
        )
        self._png: str | None = None

    def evidence(self) -> dict[str, Any]:
        """The captured artists (never released)."""
        return self._evidence.to_json()

    @property
    def figure(self) -> Figure:
        """A new figure drawn from the releasable data only."""
        from matplotlib.figure import Figure

        w, h = self._evidence.figsize
        fig = Figure(figsize=(min(max(w, 1.0), 20.0), min(max(h, 1.0), 20.0)))
        _draw(fig, self._evidence, self._eval)
        return fig

    def figure_png(self) -> str:
        """Base64 PNG of :attr:`figure` (what the text/html shows)."""
        if self._png is None:
            self._png = base64.b64encode(_png(self.figure)).decode("ascii")
        return self._png

    def _repr_html_(self) -> str:
        reasons = "".join(f"<li>{html.escape(r)}</li>" for r in self.reasons)
        return (
            f'<div class="phds-output"><div>{badge_html(self.status)} captured matplotlib '
            "figure, redrawn from the releasable data · policy "
            f"<code>{html.escape(self.policy.hash[7:19])}</code></div>"
            '<div><img alt="figure redrawn from the releasable data" '
            f'src="data:image/png;base64,{self.figure_png()}"/></div>'
            f"<ul>{reasons}</ul></div>"
        )

    def __repr__(self) -> str:
        lines = [
            f"[{self.status.upper()}] captured matplotlib figure (redrawn from releasable data)"
        ]
        lines.extend(f"- {r}" for r in self.reasons)
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# redrawing
# ---------------------------------------------------------------------------
def _draw(fig: Figure, ev: FigureEvidence, ev_eval: FigureEvaluation) -> None:
    """Draw ``ev`` on ``fig``: only bars that passed, lines, areas, images and texts."""
    created: dict[int, Axes] = {}
    for k, ax_ev in enumerate(ev.axes):
        if ax_ev.colorbar:
            continue
        left, bottom, width, height = ax_ev.bounds
        ax = fig.add_axes(
            (left, bottom, width, height),
            sharex=created.get(-1 if ax_ev.sharex is None else ax_ev.sharex),
            sharey=created.get(-1 if ax_ev.sharey is None else ax_ev.sharey),
        )
        if ax_ev.projection != "rectilinear":
            ax.set_axis_off()
            _note(ax, "polar or 3-D axes: not redrawn")
            continue
        created[k] = ax
        try:
            _draw_axes(ax, k, ax_ev, ev_eval)
        except Exception:  # an odd value from an untrusted kernel must not stop the others
            ax.cla()
            _note(ax, "could not be redrawn")
    if ev.suptitle:
        fig.suptitle(ev.suptitle)
    for t in ev.texts:
        fig.text(
            t.x,
            t.y,
            t.text,
            ha=t.ha,
            va=t.va,
            rotation=t.rotation,
            fontsize=t.fontsize,
            color=t.color,
        )


def _draw_axes(ax: Axes, k: int, a: AxesEvidence, ev_eval: FigureEvaluation) -> None:
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.transforms import blended_transform_factory

    ax.patch.set_visible(a.frame)
    ax.xaxis.set_visible(a.xaxis_visible)
    ax.yaxis.set_visible(a.yaxis_visible)
    if not a.axis_on:
        ax.set_axis_off()
    if a.yaxis_right:
        ax.yaxis.tick_right()
        ax.yaxis.set_label_position("right")
    if a.xaxis_top:
        ax.xaxis.tick_top()
        ax.xaxis.set_label_position("top")
    ax.set_xscale(a.xscale)
    ax.set_yscale(a.yscale)
    if a.xdate:
        ax.xaxis_date()
    if a.ydate:
        ax.yaxis_date()
    first_band = True
    for gi, g in enumerate(a.bars):
        sup = ev_eval.suppressed.get((k, gi), np.zeros(len(g.bars), dtype=bool))
        shown = [b for b, s in zip(g.bars, sup, strict=True) if not s]
        fill = g.style != "step"
        kwargs: dict[str, Any] = {
            "align": "edge",
            "color": g.color if fill else "none",
            "edgecolor": g.color if not fill else "white",
            "fill": fill,
            "label": g.label if g.label else "_nolegend_",
        }
        pos = [b.position for b in shown]
        ext = [b.extent for b in shown]
        base = [b.base for b in shown]
        val = [b.value for b in shown]
        if g.orientation == "vertical":
            ax.bar(pos, val, width=ext, bottom=base, **kwargs)
        else:
            ax.barh(pos, val, height=ext, left=base, **kwargs)
        for b, s in zip(g.bars, sup, strict=True):
            if not s:
                continue
            lo, hi = sorted((b.position, b.position + b.extent))
            span = ax.axvspan if g.orientation == "vertical" else ax.axhspan
            span(
                lo,
                hi,
                fill=False,
                hatch="///",
                edgecolor="#888888",
                linewidth=0.8,
                label="suppressed" if first_band else "_nolegend_",
                gid="phds-suppressed",
            )
            first_band = False
            if g.orientation == "vertical":
                tr = blended_transform_factory(ax.transData, ax.transAxes)
                ax.text(
                    (lo + hi) / 2,
                    0.5,
                    "suppressed",
                    transform=tr,
                    rotation=90,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="#555555",
                )
            else:
                tr = blended_transform_factory(ax.transAxes, ax.transData)
                ax.text(
                    0.5,
                    (lo + hi) / 2,
                    "suppressed",
                    transform=tr,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="#555555",
                )
    for ln in a.lines:
        if ln.markers_only and not ln.errorbar:
            continue  # a scatter is never drawn
        transform = {
            "data": ax.transData,
            "xaxis": ax.get_xaxis_transform(),
            "yaxis": ax.get_yaxis_transform(),
        }[ln.coords]
        marker = ln.marker if ln.marker in _MARKERS else "o"
        ax.plot(
            ln.x,
            ln.y,
            color=ln.color,
            linestyle=ln.linestyle,
            linewidth=ln.linewidth,
            marker=marker,
            drawstyle=ln.drawstyle,
            transform=transform,
            label=ln.label if ln.label else "_nolegend_",
        )
    for seg in a.segments:
        ax.add_collection(
            LineCollection(
                seg.segments,
                colors=seg.color,
                linewidths=seg.linewidth,
                label=seg.label or "_nolegend_",
            )
        )
    for poly in a.polygons:
        coll = PolyCollection(
            poly.polygons, facecolors=poly.color, alpha=poly.alpha, label=poly.label or "_nolegend_"
        )
        if poly.values is not None:
            coll.set_array(poly.values)
            coll.set_cmap(_cmap(poly.cmap))
            coll.set_clim(poly.vmin, poly.vmax)
        ax.add_collection(coll)
    for grid in a.grids:
        if grid.values is None:
            _note(ax, f"{grid.kind}: too large, not redrawn")
            continue
        cmap = _cmap(grid.cmap)
        if grid.kind == "image":
            ax.imshow(
                np.ma.masked_invalid(grid.values),
                cmap=cmap,
                vmin=grid.vmin,
                vmax=grid.vmax,
                origin="lower" if grid.origin == "lower" else "upper",
                extent=None if grid.extent is None else _four(grid.extent),
                aspect="auto",
            )
        elif grid.x is not None and grid.y is not None:
            ax.pcolormesh(
                grid.x,
                grid.y,
                np.ma.masked_invalid(grid.values),
                cmap=cmap,
                vmin=grid.vmin,
                vmax=grid.vmax,
            )
        else:
            ax.pcolormesh(
                np.ma.masked_invalid(grid.values), cmap=cmap, vmin=grid.vmin, vmax=grid.vmax
            )
    if any(n for _, n in a.points):
        _note(ax, "scatter not drawn: row-level data", 0.02, 0.98, "left", "top", "#cf222e")
    for t in a.texts:
        transform = ax.transData if t.coords == "data" else ax.transAxes
        ax.text(
            t.x,
            t.y,
            t.text,
            ha=t.ha,
            va=t.va,
            rotation=t.rotation,
            fontsize=t.fontsize,
            color=t.color,
            transform=transform,
        )
    if a.other:
        _note(ax, "some artists not redrawn", 0.98, 0.02, "right", "bottom")
    ax.autoscale_view()
    for ticks, axis in ((a.xticks, ax.xaxis), (a.yticks, ax.yaxis)):
        if ticks is not None:
            axis.set_ticks(ticks.positions, labels=ticks.labels)
    left, center, right = a.titles
    if left:
        ax.set_title(left, loc="left")
    if center:
        ax.set_title(center, loc="center")
    if right:
        ax.set_title(right, loc="right")
    ax.set_xlabel(a.xlabel)
    ax.set_ylabel(a.ylabel)
    if a.legend is not None:
        handles, _labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8)
        elif a.legend:
            ax.legend(a.legend, fontsize=8)


def _png(fig: Figure) -> bytes:
    """The figure as PNG; texts that break the renderer (bad ``$math$``) are drawn literally."""
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=96)
    except Exception:
        for text in fig.findobj(Text):
            text.set_parse_math(False)
        buf = io.BytesIO()
        try:
            fig.savefig(buf, format="png", dpi=96)
        except Exception:  # still not drawable: say so rather than fail the output
            fig = Figure(figsize=(6.4, 1.0))
            fig.text(0.5, 0.5, "the figure could not be redrawn", ha="center", va="center")
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=96)
    return buf.getvalue()


def _note(
    ax: Axes,
    text: str,
    x: float = 0.5,
    y: float = 0.5,
    ha: str = "center",
    va: str = "center",
    color: str = "#555555",
) -> None:
    """A note of the redraw itself (what was left out), in axes coordinates."""
    ax.text(x, y, text, ha=ha, va=va, transform=ax.transAxes, fontsize=8, color=color)


def _four(v: list[float]) -> tuple[float, float, float, float]:
    return (v[0], v[1], v[2], v[3])


def _cmap(name: str) -> Any:
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        return matplotlib.colormaps["viridis"]


def _from_payload(payload: dict[str, Any], policy: Policy) -> SDCOutput[Any]:
    evidence = payload.get("evidence")
    if not isinstance(evidence, dict):
        raise EvidenceError("the structured output carries no evidence to re-check")
    return FigureOutput(FigureEvidence.from_json(evidence), policy)


register_kind(FigureOutput.kind, _from_payload)
