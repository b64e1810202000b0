"""Reading a matplotlib figure into the evidence of a :class:`~phds_tre.sdc.figure.FigureOutput`.

Runs in the site kernel. :func:`figure_evidence` walks every Axes and turns
the artists it understands into the JSON evidence (bars with their counts,
lines, scatter sizes, error bars, areas, images, meshes, texts); artists it
does not understand are named, so the output goes to review and they are left
out of the redrawn figure. :func:`patch_hist` wraps ``Axes.hist`` so that the
bars of a histogram carry the number of rows in each bin: the rules then
judge the counts themselves, even for a density or weighted histogram.

All of this is a hint from an untrusted kernel (DESIGN.md, principle 3): the
checker re-checks the evidence, redraws the figure from it with the site's
policy, and a researcher who draws around the capture (saving a PNG and
displaying its bytes) gets an unstructured image, judged by a person.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from phds_tre.sdc.figure import MAX_TEXT, MAX_VALUES, FigureEvidence, FigureOutput
from phds_tre.sdc.jsonio import array_to_json
from phds_tre.sdc.policy import Policy, resolve_policy

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.text import Text

__all__ = ["figure_evidence", "figure_output", "patch_hist", "unpatch_hist"]

#: Most ticks kept per axis.
MAX_TICKS = 200
_NAME = re.compile(r"[A-Za-z_][\w.\-]{0,59}")
_MARKERS = frozenset("ov^<>1234sphHDdPX*+x|_.,8")
_LINESTYLES = frozenset({"-", "--", "-.", ":", "None", " ", ""})
_DRAWSTYLES = frozenset({"default", "steps", "steps-pre", "steps-mid", "steps-post"})
_SCALES = frozenset({"linear", "log", "symlog", "logit"})
_HA = frozenset({"left", "center", "right"})
_VA = frozenset({"top", "center", "bottom", "baseline", "center_baseline"})
_HIST_TAG = "_phds_hist"


class _Budget:
    """How many more numbers the evidence may keep (lines, images, polygons)."""

    def __init__(self, total: int) -> None:
        self.left = total

    def take(self, n: int) -> bool:
        """Reserve ``n`` numbers; False when they do not fit."""
        if n > self.left:
            return False
        self.left -= n
        return True


# ---------------------------------------------------------------------------
# small conversions
# ---------------------------------------------------------------------------
def _hex(color: Any) -> str:
    from matplotlib.colors import to_hex

    try:
        arr = np.asarray(color)
        if arr.ndim == 2:  # a collection's colours: the first one stands for all
            color = arr[0] if len(arr) else "none"
        return str(to_hex(color, keep_alpha=True))
    except (ValueError, TypeError, IndexError):
        return "#000000ff"


def _text(s: Any) -> str:
    return str(s if s is not None else "")[:MAX_TEXT]


def _label(artist: Any) -> str | None:
    label = artist.get_label()
    return None if label is None else _text(label)


def _finite(x: Any, default: float = 0.0) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def _name(obj: Any) -> str:
    name = type(obj).__name__
    return name if _NAME.fullmatch(name) else "artist"


def _choice(value: Any, allowed: frozenset[str], default: str) -> str:
    return value if isinstance(value, str) and value in allowed else default


def _is_date_axis(axis: Any) -> bool:
    from matplotlib import dates

    formatter = axis.get_major_formatter()
    return isinstance(
        formatter, (dates.AutoDateFormatter, dates.ConciseDateFormatter, dates.DateFormatter)
    )


def _ticks(axis: Any) -> dict[str, Any] | None:
    """Tick labels chosen by the researcher (categories, fixed labels); None for automatic ticks."""
    from matplotlib.category import StrCategoryFormatter
    from matplotlib.ticker import FixedFormatter

    formatter = axis.get_major_formatter()
    if not isinstance(formatter, (FixedFormatter, StrCategoryFormatter)):
        return None
    try:
        positions = [_finite(p) for p in axis.get_majorticklocs()][:MAX_TICKS]
        labels = [_text(s) for s in formatter.format_ticks(positions)]
    except Exception:  # labels that cannot be worked out are not redrawn
        return None
    return {"positions": positions, "labels": labels}


# ---------------------------------------------------------------------------
# artists
# ---------------------------------------------------------------------------
def _bar_group(container: Any) -> dict[str, Any]:
    orientation = container.orientation or "vertical"
    rects = [
        tuple(_finite(v, math.nan) for v in (p.get_x(), p.get_y(), p.get_width(), p.get_height()))
        for p in container.patches
    ]
    finite = [all(math.isfinite(v) for v in r) for r in rects]
    tag = getattr(container, _HIST_TAG, None)
    if not isinstance(tag, dict) or len(tag["counts"]) != len(rects) or not all(finite):
        tag = None  # counts that cannot be matched to the bars are not used
    bars = []
    for i, (x, y, w, h) in enumerate(rects):
        if not finite[i]:
            continue
        pos, ext, base, value = (x, w, y, h) if orientation == "vertical" else (y, h, x, w)
        count = None if tag is None else int(tag["counts"][i])
        bars.append({"position": pos, "extent": ext, "base": base, "value": value, "count": count})
    patches = list(container.patches)
    return {
        "orientation": orientation,
        "style": "bar",
        "label": _group_label(container),
        "color": _hex(patches[0].get_facecolor()) if patches else "#000000ff",
        "hist": None if tag is None else _hist_flags(tag),
        "bars": bars,
    }


def _group_label(container: Any) -> str | None:
    """The container's legend label; ``hist`` puts it on the first bar instead."""
    label = _label(container)
    if (label is None or label.startswith("_")) and len(container.patches):
        first = _label(container.patches[0])
        if first and not first.startswith("_"):
            return first
    return label


def _hist_flags(tag: dict[str, Any]) -> dict[str, bool]:
    return {k: bool(tag[k]) for k in ("density", "weighted", "cumulative", "stacked", "data_range")}


def _step_group(poly: Any, tag: dict[str, Any]) -> dict[str, Any]:
    edges = tag["edges"]
    bars = [
        {
            "position": float(edges[i]),
            "extent": float(edges[i + 1] - edges[i]),
            "base": 0.0,
            "value": float(tag["values"][i]),
            "count": int(tag["counts"][i]),
        }
        for i in range(len(tag["counts"]))
    ]
    return {
        "orientation": tag["orientation"],
        "style": tag["style"],
        "label": _label(poly),
        "color": _hex(poly.get_edgecolor() if tag["style"] == "step" else poly.get_facecolor()),
        "hist": _hist_flags(tag),
        "bars": bars,
    }


def _line(ax: Axes, line: Any, errorbar: bool, budget: _Budget) -> dict[str, Any] | None:
    transform = line.get_transform()
    if transform is ax.transData:
        coords = "data"
    elif transform is ax.get_xaxis_transform(which="grid"):
        coords = "xaxis"
    elif transform is ax.get_yaxis_transform(which="grid"):
        coords = "yaxis"
    else:
        return None
    xy = np.asarray(line.get_xydata(), dtype=np.float64).reshape(-1, 2)
    if not budget.take(xy.size):
        return None
    marker = line.get_marker()
    if marker is None or marker in ("None", "none", "", " "):
        marker = "None"
    elif not (isinstance(marker, str) and marker in _MARKERS):
        marker = "o"
    return {
        "x": array_to_json(xy[:, 0]),
        "y": array_to_json(xy[:, 1]),
        "coords": coords,
        "color": _hex(line.get_color()),
        "linestyle": _choice(line.get_linestyle(), _LINESTYLES, "-"),
        "linewidth": _finite(line.get_linewidth(), 1.0),
        "marker": marker,
        "drawstyle": _choice(line.get_drawstyle(), _DRAWSTYLES, "default"),
        "label": _label(line),
        "errorbar": errorbar,
    }


def _polygons(coll: Any, budget: _Budget) -> dict[str, Any] | None:
    paths = coll.get_paths()
    offsets = np.asarray(coll.get_offsets(), dtype=np.float64).reshape(-1, 2)
    polys: list[np.ndarray] = []
    if len(offsets) > 1 or (len(offsets) == 1 and np.any(offsets != 0)):
        # hexbin: one cell shape placed at every offset
        if not paths:
            return None
        for k, off in enumerate(offsets):
            polys.append(np.asarray(paths[k % len(paths)].vertices, dtype=np.float64) + off)
    else:
        polys = [np.asarray(p.vertices, dtype=np.float64) for p in paths]
    values = coll.get_array()
    if values is not None:
        values = np.ma.filled(np.ma.asarray(values, dtype=np.float64).ravel(), np.nan)
        if values.shape != (len(polys),):
            return None
    if not budget.take(sum(p.size for p in polys) + (0 if values is None else values.size)):
        return None
    norm = coll.norm
    return {
        "polygons": [array_to_json(p) for p in polys],
        "color": _hex(coll.get_facecolor()),
        "alpha": _finite(coll.get_alpha(), 1.0),
        "label": _label(coll),
        "values": None if values is None else array_to_json(values),
        "cmap": _cmap_name(coll),
        "vmin": _opt(norm.vmin),
        "vmax": _opt(norm.vmax),
    }


def _opt(x: Any) -> float | None:
    v = _finite(x, math.nan)
    return v if math.isfinite(v) else None


def _cmap_name(mappable: Any) -> str:
    name = getattr(mappable.get_cmap(), "name", "viridis")
    return name if isinstance(name, str) and _NAME.fullmatch(name) else "viridis"


def _grid_values(values: Any, budget: _Budget) -> tuple[list[int], Any]:
    arr = np.ma.asarray(values)
    shape = [int(n) for n in arr.shape]
    if arr.size and budget.take(arr.size):
        data = np.ma.filled(arr.astype(np.float64), np.nan)
        return shape, array_to_json(data)
    return shape, None


def _image(im: Any, budget: _Budget) -> dict[str, Any] | None:
    shape, values = _grid_values(im.get_array(), budget)
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (3, 4)):
        return None
    extent = [_finite(v) for v in im.get_extent()]
    return {
        "kind": "image",
        "shape": shape,
        "values": values,
        "x": None,
        "y": None,
        "extent": extent,
        "cmap": _cmap_name(im),
        "vmin": _opt(im.norm.vmin),
        "vmax": _opt(im.norm.vmax),
        "origin": im.origin if im.origin in ("upper", "lower") else "upper",
    }


def _mesh(mesh: Any, budget: _Budget) -> dict[str, Any] | None:
    coords = np.asarray(mesh.get_coordinates(), dtype=np.float64)
    rows, cols = coords.shape[0] - 1, coords.shape[1] - 1
    array = mesh.get_array()
    if array is None or np.ma.asarray(array).size != rows * cols:
        return None
    shape, values = _grid_values(np.ma.asarray(array).reshape(rows, cols), budget)
    keep = values is not None and budget.take(coords.size)
    return {
        "kind": "mesh",
        "shape": shape,
        "values": values if keep else None,
        "x": array_to_json(coords[..., 0]) if keep else None,
        "y": array_to_json(coords[..., 1]) if keep else None,
        "extent": None,
        "cmap": _cmap_name(mesh),
        "vmin": _opt(mesh.norm.vmin),
        "vmax": _opt(mesh.norm.vmax),
        "origin": "lower",
    }


def _text_evidence(t: Text, where: Any, data: Any, kind: str) -> dict[str, Any]:
    """A text with its anchor in ``data`` coordinates when it has them, else in ``where``'s fraction."""
    from matplotlib.text import Annotation

    x, y, coords = 0.5, 0.5, kind
    try:
        if isinstance(t, Annotation):
            if t.xycoords == "data" and data is not None:
                (x, y), coords = t.xy, "data"
            elif t.xycoords == f"{kind} fraction":
                x, y = t.xy
        elif data is not None and t.get_transform() is data:
            (x, y), coords = t.get_position(), "data"
        else:
            display = t.get_transform().transform(t.get_position())
            x, y = where.inverted().transform(display)
    except Exception:  # odd units or transforms: the text still goes to the reviewer
        x, y, coords = 0.5, 0.5, kind
    return {
        "text": _text(t.get_text()),
        "x": _finite(x, 0.5),
        "y": _finite(y, 0.5),
        "coords": coords,
        "ha": _choice(t.get_horizontalalignment(), _HA, "left"),
        "va": _choice(t.get_verticalalignment(), _VA, "baseline"),
        "rotation": _finite(t.get_rotation()),
        "fontsize": _finite(t.get_fontsize(), 10.0),
        "color": _hex(t.get_color()),
    }


def _visible_texts(texts: Iterable[Text]) -> list[Text]:
    return [t for t in texts if t.get_visible() and t.get_text()]


def _shared(ax: Axes, earlier: list[Axes], grouper: Any) -> int | None:
    """The index of the first earlier Axes sharing this axis, if any."""
    for i, other in enumerate(earlier):
        if grouper.joined(ax, other):
            return i
    return None


def _axes_evidence(ax: Axes, earlier: list[Axes], budget: _Budget) -> dict[str, Any]:
    from matplotlib.collections import (
        EventCollection,
        LineCollection,
        PathCollection,
        PolyCollection,
        QuadMesh,
    )
    from matplotlib.container import BarContainer, ErrorbarContainer
    from matplotlib.image import AxesImage

    handled: set[int] = set()
    errorbar_parts: set[int] = set()
    bars: list[dict[str, Any]] = []
    other: list[str] = []
    for container in ax.containers:
        if isinstance(container, BarContainer):
            bars.append(_bar_group(container))
            handled.update(id(p) for p in container.patches)
        elif isinstance(container, ErrorbarContainer):
            data_line, caplines, barlinecols = container.lines
            for part in (data_line, *caplines, *barlinecols):
                if part is not None:
                    errorbar_parts.add(id(part))
    seen_tags: set[int] = set()
    for patch in ax.patches:
        if id(patch) in handled:
            continue
        tag = getattr(patch, _HIST_TAG, None)
        if isinstance(tag, dict):
            if id(tag) not in seen_tags:
                seen_tags.add(id(tag))
                bars.append(_step_group(patch, tag))
            continue
        other.append(_name(patch))
    lines = []
    for line in ax.lines:
        found = _line(ax, line, id(line) in errorbar_parts, budget)
        if found is None:
            other.append(_name(line))
        else:
            lines.append(found)
    points: list[dict[str, Any]] = []
    segments: list[dict[str, Any]] = []
    polygons: list[dict[str, Any]] = []
    grids: list[dict[str, Any]] = []
    for coll in ax.collections:
        if isinstance(coll, EventCollection):
            points.append({"kind": "events", "n": int(np.size(coll.get_positions()))})
        elif isinstance(coll, PathCollection):
            points.append({"kind": "scatter", "n": int(np.asarray(coll.get_offsets()).shape[0])})
        elif isinstance(coll, LineCollection):
            segs = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in coll.get_segments()]
            if budget.take(sum(s.size for s in segs)):
                segments.append(
                    {
                        "segments": [array_to_json(s) for s in segs],
                        "color": _hex(coll.get_color()),
                        "linewidth": _finite(np.ravel(coll.get_linewidth())[:1].sum(), 1.0),
                        "label": _label(coll),
                        "errorbar": id(coll) in errorbar_parts,
                    }
                )
            else:
                other.append(_name(coll))
        elif isinstance(coll, QuadMesh):
            mesh = _mesh(coll, budget)
            grids.append(mesh) if mesh is not None else other.append(_name(coll))
        elif isinstance(coll, PolyCollection):
            poly = _polygons(coll, budget)
            polygons.append(poly) if poly is not None else other.append(_name(coll))
        else:
            other.append(_name(coll))
    for im in ax.images:
        image = _image(im, budget) if isinstance(im, AxesImage) else None
        grids.append(image) if image is not None else other.append(_name(im))
    other.extend(_name(a) for a in [*ax.artists, *ax.tables, *ax.child_axes])
    legend = ax.get_legend()
    name = ax.name if isinstance(ax.name, str) and _NAME.fullmatch(ax.name) else "unknown"
    return {
        "bounds": [float(v) for v in ax.get_position(original=True).bounds],
        "projection": name,
        "colorbar": ax.get_label() == "<colorbar>" or hasattr(ax, "_colorbar"),
        "frame": bool(ax.patch.get_visible()),
        "axis_on": bool(ax.axison),
        "titles": [_text(ax.get_title(loc)) for loc in ("left", "center", "right")],
        "xlabel": _text(ax.get_xlabel()),
        "ylabel": _text(ax.get_ylabel()),
        "xscale": _choice(ax.get_xscale(), _SCALES, "linear"),
        "yscale": _choice(ax.get_yscale(), _SCALES, "linear"),
        "xdate": _is_date_axis(ax.xaxis),
        "ydate": _is_date_axis(ax.yaxis),
        "yaxis_right": ax.yaxis.get_label_position() == "right",
        "xaxis_top": ax.xaxis.get_label_position() == "top",
        "xaxis_visible": bool(ax.xaxis.get_visible()),
        "yaxis_visible": bool(ax.yaxis.get_visible()),
        "sharex": _shared(ax, earlier, ax.get_shared_x_axes()),
        "sharey": _shared(ax, earlier, ax.get_shared_y_axes()),
        "xticks": _ticks(ax.xaxis),
        "yticks": _ticks(ax.yaxis),
        "legend": None if legend is None else [_text(t.get_text()) for t in legend.get_texts()],
        "bars": bars,
        "lines": lines,
        "points": points,
        "segments": segments,
        "polygons": polygons,
        "grids": grids,
        "texts": [
            _text_evidence(t, ax.transAxes, ax.transData, "axes") for t in _visible_texts(ax.texts)
        ],
        "other": other,
    }


def figure_evidence(fig: Figure) -> dict[str, Any]:
    """The JSON evidence of a figure: every Axes' artists, read without drawing anything."""
    budget = _Budget(MAX_VALUES)
    suptitle = getattr(fig, "_suptitle", None)
    texts = [t for t in _visible_texts(fig.texts) if t is not suptitle]
    other = [_name(a) for a in [*fig.legends, *fig.patches, *fig.lines, *fig.images, *fig.subfigs]]
    w, h = (min(max(_finite(v, 6.4), 0.5), 100.0) for v in fig.get_size_inches())
    evidence = {
        "figsize": [w, h],
        "suptitle": _text(fig.get_suptitle()),
        "texts": [_text_evidence(t, fig.transFigure, None, "figure") for t in texts],
        "axes": [_axes_evidence(ax, fig.axes[:i], budget) for i, ax in enumerate(fig.axes)],
        "other": other,
    }
    # Through strict JSON, so the kernel builds its output exactly as the checker rebuilds it.
    result: dict[str, Any] = json.loads(json.dumps(evidence, allow_nan=False))
    return result


def figure_output(fig: Figure, policy: Policy | None = None) -> FigureOutput:
    """A checked :class:`FigureOutput` of ``fig`` (the site's active policy by default)."""
    return FigureOutput(FigureEvidence.from_json(figure_evidence(fig)), resolve_policy(policy))


# ---------------------------------------------------------------------------
# histograms: count the rows in each bin
# ---------------------------------------------------------------------------
def _counts(ax: Axes, x: Any, edges: np.ndarray, orientation: str) -> list[np.ndarray] | None:
    from matplotlib import cbook

    datasets = cbook._reshape_2D(x, "x")  # type: ignore[attr-defined]
    convert = ax.convert_xunits if orientation == "vertical" else ax.convert_yunits
    out = []
    for xi in datasets:
        arr = np.asarray(convert(xi), dtype=np.float64).ravel()
        arr = arr[np.isfinite(arr)]
        out.append(np.histogram(arr, bins=edges)[0].astype(np.int64))
    return out


def _tag_hist(ax: Axes, bound: inspect.BoundArguments, result: Any) -> None:
    from matplotlib.container import BarContainer

    args = bound.arguments
    n, bins, patches = result
    x = args["x"]
    data = args.get("data")
    if isinstance(x, str) and data is not None:
        x = data[x]
    orientation = str(args.get("orientation", "vertical"))
    edges = np.asarray(bins, dtype=np.float64)
    counts = _counts(ax, x, edges, orientation)
    if not counts:
        return
    histtype = str(args.get("histtype", "bar"))
    flags = {
        "density": bool(args.get("density", False)),
        "weighted": args.get("weights") is not None,
        "cumulative": bool(args.get("cumulative", False)),
        "stacked": False,
        # Bins worked out from the data span exactly its smallest to its largest value.
        "data_range": args.get("range") is None and np.ndim(args.get("bins", 10)) == 0,
    }
    tops = np.asarray(n, dtype=np.float64).reshape(len(counts), -1)
    plain = not (flags["density"] or flags["weighted"] or flags["cumulative"])
    stacked = bool(args.get("stacked", False)) or histtype == "barstacked"
    if plain and not stacked and not np.array_equal(tops, np.asarray(counts, dtype=np.float64)):
        return  # not the counts matplotlib drew: leave the bars to the plain-bar rules
    if histtype.startswith("bar"):
        containers = [patches] if len(counts) == 1 else list(patches)
        for container, cnt in zip(containers, counts, strict=False):
            if isinstance(container, BarContainer) and len(container.patches) == len(cnt):
                setattr(container, _HIST_TAG, {**flags, "counts": cnt.tolist()})
        return
    polygon_lists = [patches] if len(counts) == 1 else list(patches)
    for i, (polys, cnt) in enumerate(zip(polygon_lists, counts, strict=False)):
        tag = {
            **flags,
            "stacked": stacked and len(counts) > 1,
            "counts": cnt.tolist(),
            "values": tops[i].tolist(),
            "edges": edges.tolist(),
            "orientation": orientation,
            "style": "step" if histtype == "step" else "stepfilled",
        }
        for poly in polys:
            setattr(poly, _HIST_TAG, tag)


def patch_hist(axes_class: type) -> Callable[..., Any] | None:
    """Wrap ``axes_class.hist`` so histogram bars carry their bins' row counts; the original back.

    None when it is already wrapped. The wrapper never changes what ``hist``
    returns or draws; when the counts cannot be worked out (unusual units)
    the bars are judged by the rules for plain bars.
    """
    original: Callable[..., Any] = getattr(axes_class, "hist")  # noqa: B009
    if getattr(original, "_phds_wrapped", False):
        return None
    signature = inspect.signature(original)

    @functools.wraps(original)
    def hist(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        with contextlib.suppress(Exception):  # the capture must never break the plot
            _tag_hist(self, signature.bind(self, *args, **kwargs), result)
        return result

    hist._phds_wrapped = True  # type: ignore[attr-defined]
    setattr(axes_class, "hist", hist)  # noqa: B010
    return original


def unpatch_hist(axes_class: type, original: Callable[..., Any]) -> None:
    """Undo :func:`patch_hist`."""
    setattr(axes_class, "hist", original)  # noqa: B010
