"""``sdc.value_counts``, ``sdc.describe`` and ``sdc.hist``: checked one-variable summaries.

Each call builds :class:`~phds_tre.sdc.table.TableEvidence` like the crosstab
does (one contributor per row) and returns a checked output:

* :func:`value_counts` → :class:`ValueCountsOutput` (kind ``"value_counts"``,
  layout ``"series"``), shaped as :meth:`pandas.Series.value_counts`;
* :func:`describe` → :class:`~phds_tre.sdc.table.TableOutput` (kind ``"table"``,
  layout ``"describe"``), shaped as :meth:`pandas.DataFrame.describe`;
* :func:`hist` → :class:`HistogramOutput` (kind ``"histogram"``, layout
  ``"series"``): counts per bin, exactly as :func:`numpy.histogram` bins them,
  and a matplotlib figure drawn only from the releasable counts.

How a histogram displays: the MIME bundle has the structured JSON payload
(:data:`~phds_tre.sdc.output.MIME_TYPE`, the only part that is re-checked),
``text/plain`` and ``text/html``. The figure is an ``image/png`` *inside the
HTML*, as a ``data:`` URI, not a separate ``image/png`` key: the output checker
fails any representation beside a structured one except the text and HTML
companions, which the node regenerates from the re-checked output. Because the
``"histogram"`` kind is registered for :func:`~phds_tre.sdc.output.recheck`,
the node's regenerated HTML redraws the figure from the counts that passed
under the site's policy; the kernel's picture is never released.
"""

from __future__ import annotations

import base64
import io
import itertools
import math
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from phds_tre.sdc.cells import (
    Grouping,
    Label,
    MeasureStats,
    group_rows,
    measure_stats,
    statistic_values,
)
from phds_tre.sdc.jsonio import label_to_json
from phds_tre.sdc.output import EvidenceError, SDCOutput, register_kind
from phds_tre.sdc.policy import Policy, resolve_policy
from phds_tre.sdc.statistics import STATISTICS
from phds_tre.sdc.table import Block, TableEvidence, TableOutput

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DESCRIBE_ROWS",
    "HistogramOutput",
    "ValueCountsOutput",
    "bin_labels",
    "describe",
    "hist",
    "nice_edges",
    "value_counts",
]

PolicyArg = Policy | str | Path | None

#: describe()'s rows and the statistic that computes each (and decides its rules).
DESCRIBE_ROWS: tuple[tuple[str, str], ...] = (
    ("count", "count"),
    ("mean", "mean"),
    ("std", "std"),
    ("min", "min"),
    ("25%", "q25"),
    ("50%", "median"),
    ("75%", "q75"),
    ("max", "max"),
)


def _nk(policy: Policy) -> int:
    # The p% rule needs the two largest contributions even when the NK rule needs one.
    return max(policy.nk_n, 2)


def _single_axis_grouping(codes: np.ndarray, labels: list[Label], name: str | None) -> Grouping:
    """A one-column grouping (a frequency list) from precomputed row codes."""
    return Grouping(
        row_codes=np.asarray(codes, dtype=np.int64),
        col_codes=np.zeros(len(codes), dtype=np.int64),
        row_labels=labels,
        col_labels=[()],
        row_names=[name],
        col_names=[],
        keep=None,
    )


def _counts_block(grouping: Grouping, policy: Policy) -> Block:
    size = STATISTICS["size"]
    ms = measure_stats(grouping, None, _nk(policy))
    return Block(size, None, statistic_values(grouping, None, size, ms), ms)


def _check_frequency_evidence(ev: TableEvidence, what: str) -> None:
    """The shape every one-column frequency list must have (a forged payload may not)."""
    if ev.layout != "series" or not ev.frequency or ev.col_labels != [()] or ev.col_names:
        raise EvidenceError(f"{what} evidence must be a one-column frequency list")
    if len(ev.blocks) != 1 or ev.blocks[0].stat.key != "size" or ev.blocks[0].value is not None:
        raise EvidenceError(f"{what} evidence must hold exactly one block of counts")


# ---- value_counts -----------------------------------------------------------


class ValueCountsOutput(TableOutput):
    """A checked :meth:`pandas.Series.value_counts` (see :func:`value_counts`)."""

    kind = "value_counts"

    def __init__(self, evidence: TableEvidence, policy: Policy) -> None:
        _check_frequency_evidence(evidence, "value_counts")
        normalize = evidence.extra.get("normalize")
        sort = evidence.extra.get("sort")
        if not isinstance(normalize, bool) or not isinstance(sort, bool):
            raise EvidenceError("value_counts evidence needs boolean 'normalize' and 'sort'")
        # Proportions publish their total (they sum to 1), so they are checked with it.
        if evidence.margins != normalize:
            raise EvidenceError("value_counts evidence: a total (margin) goes with normalize only")
        self._normalize = normalize
        self._sort = sort
        super().__init__(evidence, policy)

    def _display_order(self) -> np.ndarray:
        """Published entries by count, descending (ties by first appearance, as pandas);
        then suppressed entries in first-appearance order, so that a suppressed entry's
        position says nothing about its size."""
        r = len(self._evidence.row_labels)
        if not self._sort:
            return np.arange(r)
        counts = self._eval.published[0][:r, 0]
        shown = np.flatnonzero(np.isfinite(counts))
        hidden = np.flatnonzero(~np.isfinite(counts))
        # Evidence rows are in first-appearance order; a stable sort keeps it for ties.
        shown = shown[np.argsort(-counts[shown], kind="stable")]
        return np.concatenate([shown, hidden])

    def _shape(self, masks: bool = False) -> pd.DataFrame | pd.Series:
        base = super()._shape(masks)
        assert isinstance(base, pd.Series)  # the series layout
        r = len(self._evidence.row_labels)
        base = base.iloc[:r]  # normalize: the total is checked, never shown (pandas shows none)
        if self._normalize and not masks:
            published = self._eval.published[0]
            total = published[r, 0]
            counts = published[:r, 0]
            with np.errstate(invalid="ignore", divide="ignore"):
                props = counts / total if np.isfinite(total) and total > 0 else np.full(r, np.nan)
            base = pd.Series(props, index=base.index, name="proportion")
        return base.iloc[self._display_order()]


def value_counts(
    values: Any,
    policy: PolicyArg = None,
    normalize: bool = False,
    dropna: bool = True,
    sort: bool = True,
) -> ValueCountsOutput:
    """A checked :meth:`pandas.Series.value_counts`: how many children have each value.

    ``.table`` is a Series named ``"count"`` (``"proportion"`` with
    ``normalize=True``), indexed by the values (index named after ``values``),
    sorted by count descending with ties in first-appearance order, as pandas
    sorts them. Every count is a cell of a frequency table: a count with
    ``0 < n < min_count`` fails the threshold rule and is suppressed (NaN).
    Zeros cannot arise from observed values; an unobserved category of a
    categorical (which pandas lists with 0) follows the zeros rule. Counts are
    rounded when the policy says so. With ``sort=True`` suppressed entries
    are listed last, in first-appearance order, so that a suppressed entry's
    position does not bound its size; with ``sort=False`` every entry keeps
    pandas' first-appearance order, which does not depend on the counts.

    With ``dropna=False`` the missing values are one more entry, checked like
    the others.

    **Proportions** (``normalize=True``) are each published count divided by
    the published total (the unsuppressed counts and total, rounded if the
    policy rounds, so they equal pandas' proportions when nothing is rounded);
    suppressed entries stay NaN. What a reviewer must know: proportions always
    publish their total — they sum to 1 — so a single suppressed proportion is
    ``1 −`` the others, and anyone who knows the number of children (from a
    cohort table, a paper, another output) recovers every count as
    ``proportion × N``. The total is therefore checked as a margin, and
    secondary suppression hides further entries until no suppressed one can be
    recomputed (see :meth:`~phds_tre.sdc.table.TableOutput.audit`). Plain counts
    carry no total, so they get no secondary suppression: if the total is
    published elsewhere, one suppressed count is that total minus the others.
    """
    if isinstance(values, pd.DataFrame):
        raise TypeError("value_counts takes one column (a Series or array), not a DataFrame")
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    pol = resolve_policy(policy)
    # pandas decides which values are listed (unobserved categories too) and their
    # first-appearance order; sort=False keeps that order independent of the counts.
    listed = series.value_counts(dropna=dropna, sort=False)
    codes = np.asarray(listed.index.get_indexer(series), dtype=np.int64)
    kept = codes >= 0  # dropna=True: missing values fall outside every entry
    codes = codes[kept]
    if not np.array_equal(np.bincount(codes, minlength=len(listed)), listed.to_numpy()):
        raise RuntimeError("value_counts: rows could not be matched to pandas' values")
    labels: list[Label] = [(_label(x),) for x in listed.index]
    name = series.name if isinstance(series.name, str) else None
    grouping = _single_axis_grouping(codes, labels, name)
    evidence = TableEvidence(
        call="value_counts",
        row_labels=labels,
        col_labels=[()],
        row_names=[name],
        col_names=[],
        blocks=[_counts_block(grouping, pol)],
        margins=normalize,
        margins_name="Total",
        frequency=True,
        layout="series",
        series_name="proportion" if normalize else "count",
        extra={"normalize": bool(normalize), "sort": bool(sort)},
    )
    return ValueCountsOutput(evidence, pol)


def _label(x: object) -> object:
    if isinstance(x, np.generic):
        x = x.item()
    # pd.NA / NaT / None all mean "missing": one float NaN label, as pandas shows it.
    if x is None or (not isinstance(x, (str, bytes, tuple)) and bool(pd.isna(x))):
        return float("nan")
    return x


# ---- describe ---------------------------------------------------------------


def describe(data: pd.DataFrame | pd.Series, policy: PolicyArg = None) -> TableOutput:
    """A checked :meth:`pandas.DataFrame.describe` of the numeric columns.

    Rows ``count, mean, std, min, 25%, 50%, 75%, max``, one column per numeric
    (non-boolean) column, as pandas; a Series gives a one-column frame. Each
    (statistic, column) is checked on its own:

    * ``count``: minimum cell count (and the zeros rule for an all-missing column);
    * ``mean``, ``std``: minimum count, NK dominance and the p% rule;
    * ``min``, ``max``: one child's own value — they fail (and are suppressed)
      unless the site's ``single_value_statistics`` leaves them out. ACRO 1.0.2
      passed max/min over 10 or more children;
    * ``25%``, ``50%``, ``75%``: minimum count, dominance, and the policy's
      median rule (``"median"`` in ``single_value_statistics``,
      ``median_min_count``), since quartiles are order statistics like the median.

    Negative values put the dominance rules out of reach (review); missing
    values are left out of every statistic, as pandas does, and the missing
    rule sends the column to review.
    """
    frame = data.to_frame() if isinstance(data, pd.Series) else data
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"describe takes a DataFrame or Series, not {type(data).__name__}")
    if frame.columns.has_duplicates:
        raise ValueError("describe needs unique column names")
    columns = [c for c in frame.columns if _describable(frame[c])]
    if not columns:
        raise ValueError(
            "describe summarises numeric columns and there are none; for categories use "
            "sdc.value_counts (pandas' count/unique/top/freq would publish a single value)"
        )
    variables = []
    for c in columns:
        label = label_to_json(c)
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise ValueError(f"describe needs str or int column names, not {c!r}")
        variables.append(label)
    pol = resolve_policy(policy)
    n = len(frame)
    grouping = group_rows([], [], n)  # one cell: every row of the column
    k = _nk(pol)
    arrays = [frame[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in columns]
    measures = [measure_stats(grouping, arr, k) for arr in arrays]
    quartiles = [_quartiles(arr, ms) for arr, ms in zip(arrays, measures, strict=True)]
    blocks: list[Block] = []
    block_rows: list[str] = []
    for row, key in DESCRIBE_ROWS:
        stat = STATISTICS[key]
        for variable, arr, ms, qs in zip(variables, arrays, measures, quartiles, strict=True):
            value: Any = variable  # a column label: str or int, kept as pandas has it
            values = qs[key] if key in qs else statistic_values(grouping, arr, stat, ms)
            blocks.append(Block(stat, value, values, ms))
            block_rows.append(row)
    evidence = TableEvidence(
        call="describe",
        row_labels=grouping.row_labels,
        col_labels=grouping.col_labels,
        row_names=[],
        col_names=[],
        blocks=blocks,
        margins=False,
        layout="describe",
        extra={
            "rows": [row for row, _ in DESCRIBE_ROWS],
            "variables": variables,
            "block_rows": block_rows,
        },
    )
    return TableOutput(evidence, pol)


def _quartiles(arr: np.ndarray, ms: MeasureStats) -> dict[str, np.ndarray]:
    """25%, 50%, 75% of one column, shaped like a block's values (cell and margins).

    describe has one cell, whose margins hold the same rows: one linear
    ``nanquantile`` (pandas' method) instead of grouping four times per
    statistic, which made describe 13× slower than pandas on a million rows.
    """
    keys = ("q25", "median", "q75")
    if ms.n[0, 0] == 0:  # all missing: undefined, and nanquantile would warn
        return {key: np.full(ms.n.shape, np.nan) for key in keys}
    qs = np.nanquantile(arr, [0.25, 0.5, 0.75])
    return {key: np.full(ms.n.shape, q) for key, q in zip(keys, qs, strict=True)}


def _describable(column: pd.Series) -> bool:
    dtype = column.dtype
    return (
        pd.api.types.is_numeric_dtype(dtype)
        and not pd.api.types.is_bool_dtype(dtype)
        and not pd.api.types.is_complex_dtype(dtype)
    )


# ---- hist ---------------------------------------------------------------------


def nice_edges(vmin: float, vmax: float, bins: int) -> np.ndarray:
    """Equal-width edges on "nice" numbers that cover ``[vmin, vmax]`` in at most ``bins`` bins.

    The width is the smallest of 1, 2, 2.5 or 5 × a power of ten whose
    multiples cover the data in ``bins`` bins or fewer, and every edge is a
    multiple of it (as R's ``pretty`` chooses axis ticks); so there are about
    ``bins`` bins, between roughly half as many and ``bins``. The edges are a
    coarsening of the data's range: they say that the minimum lies in the
    first bin, not what it is — unlike numpy's default edges, which *are* the
    exact minimum and maximum. A single value is widened to ``±0.5`` first,
    as numpy does.
    """
    if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmin > vmax:
        raise ValueError(f"cannot make bins for the range [{vmin}, {vmax}]")
    if bins < 1:
        raise ValueError("bins must be a positive number of bins")
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    first = math.floor(math.log10((vmax - vmin) / bins))
    # Edges are integers × 10**power, so they are exact decimals (no 0.1 + 0.2 drift).
    candidates = [
        (exp - 1, mantissa) for exp in range(first, first + 6) for mantissa in (10, 20, 25, 50)
    ]
    # Aligned to the width; one bin straddling zero needs the width's power of ten instead.
    for align_to_power in (False, True):
        for power, mantissa in candidates:
            align = 10 if align_to_power else mantissa
            edges = _aligned_edges(vmin, vmax, power, mantissa, align, bins)
            if edges is not None:
                return edges
    raise ValueError(f"cannot make {bins} nice bins for the range [{vmin}, {vmax}]")


def _aligned_edges(
    vmin: float, vmax: float, power: int, step: int, align: int, bins: int
) -> np.ndarray | None:
    scale = 10.0**power if power >= 0 else 1.0 / 10.0 ** (-power)
    lo = math.floor(vmin / scale / align) * align
    hi = math.ceil(vmax / scale)
    for low in (lo, lo - align):  # one step down if the division rounded up
        count = max(math.ceil((hi - low) / step), 1)
        if count > bins:
            continue
        units = low + step * np.arange(count + 1, dtype=np.float64)
        edges = units * 10.0**power if power >= 0 else units / 10.0 ** (-power)
        if edges[0] <= vmin and edges[-1] >= vmax and np.all(np.diff(edges) > 0):
            return edges
    return None


def _fmt(x: float) -> str:
    short = f"{x:.15g}"
    return short if float(short) == x else repr(float(x))


def bin_labels(edges: Sequence[float] | np.ndarray) -> list[str]:
    """``"[a, b)"`` for every bin, ``"[a, b]"`` for the last: numpy's bins are half-open
    except the last, which includes its top edge."""
    e = [float(x) for x in edges]
    out = [f"[{_fmt(a)}, {_fmt(b)})" for a, b in itertools.pairwise(e)]
    if out:
        out[-1] = out[-1][:-1] + "]"
    return out


def _bin_codes(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of every in-range value as :func:`numpy.histogram` assigns it (others dropped)."""
    v = values[(values >= edges[0]) & (values <= edges[-1])]
    codes = np.searchsorted(edges, v, side="right") - 1
    codes[v == edges[-1]] = len(edges) - 2  # the last bin is closed: its top edge counts
    return codes.astype(np.int64)


class HistogramOutput(TableOutput):
    """Checked histogram counts (see :func:`hist`) and their figure.

    ``table``: counts per bin (index ``"[a, b)"``, the last ``"[a, b]"``);
    ``edges``: the bin edges used; ``figure``: the releasable counts drawn.
    """

    kind = "histogram"

    def __init__(self, evidence: TableEvidence, policy: Policy, ax: Axes | None = None) -> None:
        _check_frequency_evidence(evidence, "histogram")
        if evidence.margins:
            raise EvidenceError("histogram evidence has no margins")
        try:
            edges = np.asarray(evidence.extra["edges"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise EvidenceError("histogram evidence needs numeric bin edges") from None
        if (
            edges.ndim != 1
            or len(edges) != len(evidence.row_labels) + 1
            or not np.all(np.isfinite(edges))
            or not np.all(np.diff(edges) > 0)
        ):
            raise EvidenceError("histogram evidence: edges must be increasing, one more than bins")
        if [t for (t,) in evidence.row_labels] != bin_labels(edges):
            raise EvidenceError("histogram evidence: bin labels do not match the edges")
        self.edges = edges
        super().__init__(evidence, policy)
        self._figure: Figure | None = None
        self._png: str | None = None
        if ax is not None:
            self._draw(ax)
            self._figure = ax.get_figure(root=True)

    @property
    def figure(self) -> Figure:
        """The histogram of the releasable counts (the researcher's, when ``ax`` was given)."""
        if self._figure is None:
            self._figure = self._new_figure()
        return self._figure

    def _new_figure(self) -> Figure:
        from matplotlib.figure import Figure

        # A bare Figure, not pyplot: nothing is shown behind the checker's back.
        fig = Figure(figsize=(6.4, 4.0), layout="constrained")
        self._draw(fig.add_subplot())
        return fig

    def _draw(self, ax: Axes) -> None:
        """Bars for released counts only; a suppressed bin is a hatched full-height band."""
        from matplotlib.transforms import blended_transform_factory

        counts = np.asarray(self.table, dtype=np.float64)
        left, right = self.edges[:-1], self.edges[1:]
        shown = np.isfinite(counts)
        ax.bar(
            left[shown],
            counts[shown],
            width=(right - left)[shown],
            align="edge",
            color="#4c72b0",
            edgecolor="white",
            label="count",
        )
        # Suppressed: spans the axes' height (axes coordinates), never the count.
        band_text = blended_transform_factory(ax.transData, ax.transAxes)
        for n, i in enumerate(np.flatnonzero(~shown)):
            ax.axvspan(
                left[i],
                right[i],
                fill=False,
                hatch="///",
                edgecolor="#888888",
                linewidth=0.8,
                label="suppressed" if n == 0 else "_nolegend_",
                gid="phds-suppressed",
            )
            ax.text(
                (left[i] + right[i]) / 2,
                0.5,
                "suppressed",
                transform=band_text,
                rotation=90,
                ha="center",
                va="center",
                fontsize=8,
                color="#555555",
            )
        ax.set_xlim(self.edges[0], self.edges[-1])
        name = self._evidence.row_names[0] if self._evidence.row_names else None
        ax.set_xlabel(str(name) if name else "value")
        ax.set_ylabel("count")
        if not shown.all():
            ax.legend(loc="upper right", fontsize=8)

    def figure_png(self) -> str:
        """Base64 PNG of a figure drawn afresh from the releasable counts (for display)."""
        if self._png is None:
            # Always a fresh figure: the researcher's ``ax`` may hold other, unchecked artists.
            fig = self._new_figure()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=96)
            self._png = base64.b64encode(buf.getvalue()).decode("ascii")
        return self._png

    def _repr_html_(self) -> str:
        page = super()._repr_html_()
        img = (
            '<div><img alt="histogram of the releasable counts" '
            f'src="data:image/png;base64,{self.figure_png()}"/></div>'
        )
        if page.endswith("</div>"):  # inside the output's own box
            return page[: -len("</div>")] + img + "</div>"
        return page + img

    def __repr__(self) -> str:
        return super().__repr__() + "\n(figure: .figure, drawn from the releasable counts)"


def hist(
    values: Any,
    bins: int | Sequence[float] | np.ndarray = 10,
    range: tuple[float, float] | None = None,  # numpy's name for it
    policy: PolicyArg = None,
    ax: Axes | None = None,
) -> HistogramOutput:
    """A checked histogram: counts per bin as a table, and a figure of the releasable ones.

    Bins follow :func:`numpy.histogram` exactly: ``[a, b)`` except the last,
    ``[a, b]``, so a value on the top edge is counted (ACRO 1.0.2 dropped it).
    ``bins`` is a number of equal bins or a sequence of strictly increasing
    edges (then ``range`` is ignored, as in numpy). Missing values and values
    outside the edges are left out, as numpy and matplotlib do.

    **Edges.** With ``range`` or explicit edges, the edges are exactly numpy's.
    Without them, numpy would put the outer edges on the data's exact minimum
    and maximum — two children's own values. Here the edges are instead
    rounded outward to "nice" numbers (:func:`nice_edges`: equal widths of 1,
    2, 2.5 or 5 × a power of ten, edges on multiples of the width, at most
    ``bins`` bins — often fewer), so they differ from
    ``numpy.histogram(values, bins)``; the edges used are the table's index
    (``"[a, b)"`` labels) and ``.edges``, and ``numpy.histogram(values,
    out.edges)`` gives the same counts. Data-derived edges still say that the
    first and last bins hold someone (the minimum and maximum lie in them),
    even when those bins are suppressed; give ``range`` (e.g. the plausible
    range of the measure) for edges that say nothing about the data.

    **Rules.** Each bin is a cell of a frequency table: ``0 < n < min_count``
    fails the threshold rule and the bin is suppressed; an empty bin follows
    the zeros rule. The total is not shown, so there is no secondary
    suppression: if the number of children is published elsewhere, one
    suppressed bin is that total minus the others.

    **Figure.** ``.figure`` shows bars for the released counts only; a
    suppressed bin is an empty hatched band labelled "suppressed", the full
    height of the axes, never its count. With ``ax`` the bars are drawn there
    (a pyplot figure is then also shown by Jupyter as a raw image, which the
    checker sends to review); the output's own display is its HTML, with a
    PNG of the figure drawn afresh from the releasable counts.
    """
    arr = _numeric_values(values)
    pol = resolve_policy(policy)
    present = arr[~np.isnan(arr)]
    nice = False
    if isinstance(bins, str):
        raise ValueError(
            f"bins={bins!r}: numpy's bin estimators are computed from the data and are not "
            "supported; give a number of bins or the edges"
        )
    if np.ndim(bins) == 1:
        edges = np.asarray(bins, dtype=np.float64)
        if len(edges) < 2 or not np.all(np.isfinite(edges)) or not np.all(np.diff(edges) > 0):
            raise ValueError("bin edges must be finite and strictly increasing (at least two)")
    else:
        nbins = operator.index(bins)  # type: ignore[arg-type]
        if nbins < 1:
            raise ValueError("bins must be a positive number of bins")
        if range is not None:
            edges = np.histogram_bin_edges(present, bins=nbins, range=range)
        else:
            if not np.all(np.isfinite(present)):
                raise ValueError("values contain infinity: give range= or the bin edges")
            lo, hi = (float(present.min()), float(present.max())) if len(present) else (0.0, 1.0)
            edges = nice_edges(lo, hi, nbins)
            nice = True
    codes = _bin_codes(present, edges)
    labels: list[Label] = [(lab,) for lab in bin_labels(edges)]
    name = _series_name(values)
    grouping = _single_axis_grouping(codes, labels, name or "bin")
    evidence = TableEvidence(
        call="hist",
        row_labels=labels,
        col_labels=[()],
        row_names=[name or "bin"],
        col_names=[],
        blocks=[_counts_block(grouping, pol)],
        margins=False,
        frequency=True,
        layout="series",
        series_name="count",
        extra={"edges": [float(x) for x in edges], "nice_edges": nice},
    )
    return HistogramOutput(evidence, pol, ax=ax)


def _series_name(values: Any) -> str | None:
    name = getattr(values, "name", None)
    return name if isinstance(name, str) else None


def _numeric_values(values: Any) -> np.ndarray:
    series = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values).ravel())
    if pd.api.types.is_bool_dtype(series.dtype):
        series = series.astype(np.float64)
    dtype = series.dtype
    if not pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_complex_dtype(dtype):
        raise TypeError(f"hist needs numeric values, not {series.dtype}")
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


# ---- re-checking ------------------------------------------------------------------


def _evidence_of(payload: dict[str, Any]) -> TableEvidence:
    evidence = payload.get("evidence")
    if not isinstance(evidence, dict):
        raise EvidenceError("the structured output carries no evidence to re-check")
    return TableEvidence.from_json(evidence)


def _value_counts_from_payload(payload: dict[str, Any], policy: Policy) -> SDCOutput[Any]:
    return ValueCountsOutput(_evidence_of(payload), policy)


def _histogram_from_payload(payload: dict[str, Any], policy: Policy) -> SDCOutput[Any]:
    return HistogramOutput(_evidence_of(payload), policy)


register_kind(ValueCountsOutput.kind, _value_counts_from_payload)
register_kind(HistogramOutput.kind, _histogram_from_payload)
