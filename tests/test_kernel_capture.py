"""The site kernel's capture: pandas, matplotlib and statsmodels displays become checked outputs.

Unit tests build FrameOutput/FigureOutput payloads in this process and send
them through ``phds_tre.sdc.recheck`` and the checker; the kernel tests run
real notebooks in kernels started with the extension and check the executed
notebook with the real checker.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from nbclient import NotebookClient
from nbformat import NotebookNode
from nbformat.v4 import new_code_cell, new_notebook

from phds_tre.check.checkers import CheckContext, check_output
from phds_tre.check.notebook import NotebookReport, check_notebook
from phds_tre.check.structured import check_structured, load_recheck
from phds_tre.kernel import POLICY_ENV, policy_from_env
from phds_tre.kernel.figures import figure_output, patch_hist, unpatch_hist
from phds_tre.sdc import MIME_TYPE, Policy, PolicyError, recheck
from phds_tre.sdc.figure import FigureOutput
from phds_tre.sdc.frame import FrameOutput, frame_output

matplotlib.use("Agg")

EXTENSION = ["--IPKernelApp.extensions=['phds_tre.kernel']"]


def _json(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as the checker receives it: strict JSON, parsed back."""
    return json.loads(json.dumps(payload, allow_nan=False))


def _check(payload: dict[str, Any], policy: Policy | None = None) -> str:
    """The checker's verdict on a bundle holding ``payload``."""
    verdict = check_structured({MIME_TYPE: payload}, policy or Policy(), load_recheck())
    return verdict.status


# ---------------------------------------------------------------------------
# kind "frame"
# ---------------------------------------------------------------------------
SMALL_COUNTS = pd.DataFrame({"a": [3, 40], "b": [25, 31]}, index=pd.Index(["F", "M"], name="sex"))
MEANS = pd.DataFrame(
    {"weight": [21.37, 23.81], "height": [112.4, 118.9]}, index=pd.Index(["F", "M"], name="sex")
)
ROWS = pd.DataFrame(
    {
        "person_id": [1001, 1002, 1003, 1004, 1005],
        "sex": ["F", "M", "F", "F", "M"],
        "weight": [20.1, 22.4, 19.8, 25.0, 23.3],
    }
)


def test_frame_small_counts_fail_and_are_suppressed() -> None:
    out = frame_output(SMALL_COUNTS)
    assert out.status == "fail"
    assert np.isnan(out.table.loc["F", "a"]) and out.table.loc["M", "a"] == 40
    rules = set(out.checks.loc[out.checks["status"] == "fail", "rule"])
    assert rules == {"threshold"}
    # The detail never publishes the suppressed value.
    assert not any("3" in str(d) for d in out.checks["detail"])


def test_frame_of_aggregated_means_is_review_never_pass() -> None:
    out = frame_output(MEANS)
    assert out.status == "review"
    assert "not produced by phds_tre.sdc" in " ".join(out.reasons)
    assert frame_output(MEANS, policy=Policy(min_count=1)).status == "review"


@pytest.mark.parametrize(
    "obj",
    [
        ROWS,
        ROWS[["person_id", "weight"]],  # distinct integers beside a positional index
        ROWS["sex"],  # a text column of rows
        pd.DataFrame({"x": np.linspace(0.5, 99.5, 30)}),  # many rows for one column
        pd.DataFrame({"x": np.linspace(0.5, 99.5, 1200)}),  # more than the evidence keeps
    ],
    ids=["rows", "identifiers", "series", "long", "truncated"],
)
def test_frame_of_rows_fails_as_row_level_data(obj: pd.DataFrame | pd.Series) -> None:
    out = frame_output(obj)
    assert out.status == "fail"
    assert "single_value" in set(out.checks.loc[out.checks["status"] == "fail", "rule"])


def test_frame_naming_single_value_statistics_fails() -> None:
    summary = pd.DataFrame({"w": np.linspace(10.3, 40.7, 30)}).describe()  # min, max: a child each
    out = frame_output(summary)
    assert out.status == "fail"
    assert {"max", "min"} <= set(out.checks.loc[out.checks["rule"] == "single_value", "column"])
    allowed = Policy(single_value_statistics=("mode",))
    assert frame_output(summary, policy=allowed).status == "review"
    grouped = pd.DataFrame({"age": {"F": 2.5, "M": 3.5}}).agg(["mean", "max"])
    assert frame_output(grouped).status == "fail"


def test_frame_withholds_text_cells() -> None:
    frame = pd.DataFrame(
        {"note": ["x", "y"], "mean": [4.5, 6.5]}, index=pd.Index(["a", "b"], name="g")
    )
    out = frame_output(frame)
    assert out.status == "review"
    assert out.table["note"].isna().all() and list(out.table["mean"]) == [4.5, 6.5]


@pytest.mark.parametrize(
    "obj",
    [SMALL_COUNTS, MEANS, ROWS, MEANS["weight"], pd.crosstab(ROWS.sex, ROWS.weight > 21)],
    ids=["counts", "means", "rows", "series", "crosstab"],
)
def test_frame_payload_round_trips_through_recheck(obj: pd.DataFrame | pd.Series) -> None:
    out = frame_output(obj)
    payload = _json(out.to_payload())
    assert payload["kind"] == "frame"
    result = recheck(payload, Policy())
    assert result.status == out.status and result.notes == []
    assert isinstance(result.output, FrameOutput)
    assert _json(result.output.to_payload()) == payload
    assert _check(payload) == out.status


def test_frame_rechecked_with_the_site_policy() -> None:
    payload = _json(frame_output(SMALL_COUNTS, policy=Policy(min_count=3)).to_payload())
    assert payload["status"] == "review"
    assert recheck(payload, Policy()).status == "fail"  # the site's min_count is 10


def test_forged_frame_payloads_fail() -> None:
    payload = _json(frame_output(SMALL_COUNTS).to_payload())
    hidden = copy.deepcopy(payload)
    hidden["evidence"]["dtypes"][0] = "text"  # a count column passed off as text
    assert recheck(hidden, Policy()).status == "fail"
    shown = copy.deepcopy(payload)
    shown["table"]["data"][0][0] = 3  # the suppressed count put back into the table
    shown["status"] = "review"
    assert _check(shown) == "fail"
    ragged = copy.deepcopy(payload)
    ragged["evidence"]["data"][0].append(7)
    assert recheck(ragged, Policy()).status == "fail"


# ---------------------------------------------------------------------------
# kind "figure"
# ---------------------------------------------------------------------------
@pytest.fixture
def counted_hist() -> Iterator[None]:
    """``Axes.hist`` wrapped as in the kernel, so histogram bars carry their counts."""
    original = patch_hist(Axes)
    yield
    if original is not None:
        unpatch_hist(Axes, original)


def _axes() -> tuple[Figure, Axes]:
    fig = Figure()
    return fig, fig.add_subplot()


def _bar_values(out: FigureOutput) -> list[float]:
    return list(out.table["value"])


def test_bar_of_three_is_suppressed_and_the_figure_held() -> None:
    fig, ax = _axes()
    ax.bar(["a", "b", "c"], [30, 3, 20])
    out = figure_output(fig)
    values = _bar_values(out)
    assert values[0] == 30 and np.isnan(values[1]) and values[2] == 20
    assert out.status == "review"  # plain bars are never pass; the 3 is gone
    png = out.figure_png()
    assert png.startswith("iVBOR")
    bundle = out._repr_mimebundle_()
    assert set(bundle) == {MIME_TYPE, "text/html", "text/plain"}
    assert "data:image/png;base64," in bundle["text/html"]


def test_counted_histogram(counted_hist: None) -> None:
    values = np.r_[np.full(40, 2.5), np.full(25, 7.5), np.full(3, 12.5)]
    fig, ax = _axes()
    ax.hist(values, bins=[0, 5, 10, 15])
    out = figure_output(fig)
    assert _bar_values(out)[:2] == [40, 25] and np.isnan(_bar_values(out)[2])
    assert out.status == "review"  # suppressed: the site's policy has a reviewer confirm
    assert out.status == recheck(_json(out.to_payload()), Policy()).status
    fig, ax = _axes()
    ax.hist(values[:65], bins=[0, 5, 10])
    assert figure_output(fig).status == "pass"  # every bin counted and passed


def test_density_histogram_counts_are_checked(counted_hist: None) -> None:
    values = np.r_[np.full(40, 2.5), np.full(3, 7.5)]
    fig, ax = _axes()
    ax.hist(values, bins=[0, 5, 10], density=True)
    out = figure_output(fig)
    # Densities are not whole numbers, but the kernel counted the rows: the small bin is
    # suppressed, and since the areas sum to one it could be recomputed, so it fails.
    assert np.isnan(_bar_values(out)[1])
    assert out.status == "fail"


def test_automatic_bins_disclose_min_and_max(counted_hist: None) -> None:
    fig, ax = _axes()
    ax.hist(np.r_[np.full(40, 2.5), np.full(40, 7.5)], bins=2)
    out = figure_output(fig)
    assert out.status == "fail"
    assert "single_value" in set(out.checks["rule"])
    allowed = Policy(single_value_statistics=("mode",))
    assert figure_output(fig, policy=allowed).status == "pass"


def test_scatter_and_marker_plots_fail() -> None:
    fig, ax = _axes()
    ax.scatter([1, 2, 3], [4, 5, 6])
    assert figure_output(fig).status == "fail"
    fig, ax = _axes()
    ax.plot([1, 2, 3], [4, 5, 6], "o")
    assert figure_output(fig).status == "fail"
    fig, ax = _axes()
    ax.errorbar([1, 2], [4, 5], yerr=[0.5, 0.5], fmt="o", capsize=2)  # estimates, not children
    assert figure_output(fig).status == "review"


def test_lines_images_and_texts_go_to_review() -> None:
    fig, ax = _axes()
    ax.plot([0, 1, 2], [1.0, 0.8, 0.7], drawstyle="steps-post")
    ax.set_title("Survival")
    assert figure_output(fig).status == "review"
    fig, ax = _axes()
    ax.imshow(np.arange(20, 32).reshape(3, 4))
    assert figure_output(fig).status == "review"
    fig, ax = _axes()
    ax.imshow(np.arange(12).reshape(3, 4))  # a heatmap of small whole numbers
    assert figure_output(fig).status == "fail"
    fig, ax = _axes()
    ax.pie([3, 40])  # not understood: left out, and a person decides
    out = figure_output(fig)
    assert out.status == "review" and "does not understand" in " ".join(out.reasons)


def test_redraw_survives_texts_the_renderer_rejects() -> None:
    fig, ax = _axes()
    ax.plot([1, 2], [3.5, 4.5], label=r"$\frac{")
    ax.legend()
    ax.set_title(r"$\nosuchcommand{x}$")
    assert figure_output(fig).figure_png().startswith("iVBOR")


def test_suppressed_bar_beside_its_label_fails() -> None:
    fig, ax = _axes()
    bars = ax.bar(["a", "b"], [30, 3])
    ax.bar_label(bars)  # the text "3" would give the suppressed bar away
    assert figure_output(fig).status == "fail"


def test_figure_payload_round_trips_through_recheck(counted_hist: None) -> None:
    fig, ax = _axes()
    ax.hist(np.r_[np.full(40, 2.5), np.full(3, 7.5)], bins=[0, 5, 10], label="age")
    ax.plot([0, 10], [20, 20], label="mean")
    ax.legend()
    ax.set_xlabel("age (years)")
    out = figure_output(fig)
    payload = _json(out.to_payload())
    assert payload["kind"] == "figure"
    result = recheck(payload, Policy())
    assert result.status == out.status == "fail"  # the line could reveal the suppressed bin
    assert isinstance(result.output, FigureOutput)
    assert _json(result.output.to_payload()) == payload
    assert recheck(payload, Policy(min_count=3)).status == "review"  # nothing suppressed
    assert _check(payload) == "fail"


def test_forged_figure_payloads_fail(counted_hist: None) -> None:
    fig, ax = _axes()
    ax.hist(np.r_[np.full(40, 2.5), np.full(3, 7.5)], bins=[0, 5, 10])
    payload = _json(figure_output(fig).to_payload())
    bars = payload["evidence"]["axes"][0]["bars"][0]["bars"]
    assert [b["count"] for b in bars] == [40, 3]

    inflated = copy.deepcopy(payload)  # a count that does not match the bar drawn
    inflated["evidence"]["axes"][0]["bars"][0]["bars"][1]["count"] = 30
    inflated["status"] = "pass"
    result = recheck(inflated, Policy())
    assert result.status == "fail" and "heights are not its counts" in result.reasons[0]

    unsuppressed = copy.deepcopy(payload)  # the suppressed height put back into the table
    unsuppressed["table"]["data"][1][-1] = 3.0
    assert _check(unsuppressed) == "fail"

    hidden_scatter = copy.deepcopy(payload)  # a scatter declared, status claimed pass
    hidden_scatter["evidence"]["axes"][0]["points"] = [{"kind": "scatter", "n": 20}]
    hidden_scatter["status"] = "pass"
    assert recheck(hidden_scatter, Policy()).status == "fail"

    bad_colour = copy.deepcopy(payload)  # free text smuggled into a field the redraw uses
    bad_colour["evidence"]["axes"][0]["bars"][0]["color"] = "patient 1001"
    assert recheck(bad_colour, Policy()).status == "fail"


# ---------------------------------------------------------------------------
# the extension's policy
# ---------------------------------------------------------------------------
def test_policy_from_env() -> None:
    assert policy_from_env({}) is None
    assert policy_from_env({POLICY_ENV: '{"min_count": 5}'}) == Policy(min_count=5)
    with pytest.raises(PolicyError, match="min_cont"):
        policy_from_env({POLICY_ENV: '{"min_cont": 5}'})
    with pytest.raises(PolicyError, match="JSON"):
        policy_from_env({POLICY_ENV: "min_count=5"})


# ---------------------------------------------------------------------------
# statsmodels and the capture's dispatch (no kernel)
# ---------------------------------------------------------------------------
MODEL_DATA = pd.DataFrame(
    {
        "x": np.linspace(-2, 2, 60),
        "g": np.tile(["a", "b", "c"], 20),
        "y": np.sin(np.arange(60)) + np.linspace(-2, 2, 60),
    }
).assign(b=lambda d: (d.y > 0).astype(int))


def _fits() -> list[tuple[Any, Any]]:
    """(a statsmodels fit made directly, the same model through the safe API)."""
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    from phds_tre import sdc

    d = MODEL_DATA
    return [
        (smf.ols("y ~ x + C(g)", d).fit(), sdc.ols("y ~ x + C(g)", d)),
        (smf.logit("b ~ x", d).fit(disp=0), sdc.logit("b ~ x", d)),
        (smf.glm("b ~ x", d, family=sm.families.Binomial()).fit(), sdc.glm("b ~ x", d)),
    ]


def test_model_from_results_matches_the_safe_api() -> None:
    from phds_tre.sdc.models import model_output_from_result

    for fit, checked in _fits():
        a, b = model_output_from_result(fit).to_payload(), checked.to_payload()
        a["evidence"].pop("fit"), b["evidence"].pop("fit")
        assert a == b


def test_capture_dispatch() -> None:
    import statsmodels.formula.api as smf

    from phds_tre.kernel.capture import Capture

    capture = Capture(shell=None)  # dispatch only; nothing installed
    assert capture.bundle(object()) is None
    assert capture.bundle("text") is None
    frame = capture.bundle(MEANS)
    assert frame is not None and frame[MIME_TYPE]["kind"] == "frame"
    fig, ax = _axes()
    patches = ax.hist([1.0, 2.0], bins=[0, 3])
    assert capture.bundle(patches) == capture.bundle(ax.bar([1], [2])) == capture.bundle(fig.axes)
    note = capture.bundle(patches)
    assert (
        note is not None
        and set(note) == {"text/plain"}
        and not any(c.isdigit() for c in note["text/plain"])
    )
    assert capture.bundle(fig)[MIME_TYPE]["kind"] == "figure"  # type: ignore[index]
    small = MODEL_DATA.head(8)
    model = capture.bundle(smf.ols("y ~ x", small).fit())
    assert model is not None and model[MIME_TYPE]["kind"] == "model"
    assert model[MIME_TYPE]["status"] == "fail"  # residual df 6
    weighted = capture.bundle(smf.wls("y ~ x", MODEL_DATA).fit())  # not rebuildable exactly
    assert weighted is not None and weighted[MIME_TYPE]["kind"] == "frame"
    assert weighted[MIME_TYPE]["status"] == "review"
    unlinked = capture.bundle(smf.ols("y ~ x", small).fit().summary())  # summary made before
    assert unlinked is not None and unlinked[MIME_TYPE]["kind"] == "frame"
    capture.watcher.when_imported("statsmodels.iolib.summary", capture._patch_summary)
    try:
        linked = capture.bundle(smf.ols("y ~ x", small).fit().summary())
        assert linked is not None and linked[MIME_TYPE]["kind"] == "model"
        assert linked[MIME_TYPE]["status"] == "fail"
    finally:
        capture.uninstall()
    from statsmodels.iolib.summary import Summary

    assert not getattr(Summary.add_table_params, "_phds_wrapped", False)


# ---------------------------------------------------------------------------
# real kernels
# ---------------------------------------------------------------------------
SETUP = """\
import numpy as np, pandas as pd
import matplotlib.pyplot as plt
import statsmodels.formula.api as smf
rng = np.random.default_rng(7)
df = pd.DataFrame({
    "person_id": np.arange(5001, 5061),
    "sex": rng.choice(["F", "M"], 60),
    "age": rng.integers(0, 18, 60),
    "weight": rng.normal(25, 6, 60).round(1),
})
"""

#: (name, code, expected kind of the captured output, expected verdict)
CELLS = [
    ("small_counts", "pd.DataFrame({'n': [3, 48]}, index=pd.Index(['A', 'B'], name='site'))",
     "structured/frame", "fail"),
    ("means", "df.groupby('sex')[['weight']].mean()", "structured/frame", "review"),
    ("head", "df.head()", "structured/frame", "fail"),
    ("bar", "plt.bar(['a', 'b', 'c'], [30, 3, 20]);", "structured/figure", "review"),
    ("scatter", "plt.scatter(df.age, df.weight);", "structured/figure", "fail"),
    ("hist", "plt.hist(df.weight, bins=[0, 15, 25, 35, 60]);", "structured/figure", "review"),
    ("show", "plt.bar(['a', 'b'], [30, 40]); plt.show()", "structured/figure", "review"),
    ("display", "fig, ax = plt.subplots(); ax.plot([1, 2], [3.5, 4.5]); display(fig)",
     "structured/figure", "review"),
    ("small_model", "smf.ols('weight ~ age', df.head(8)).fit().summary()", "structured/model",
     "fail"),
    ("model", "smf.ols('weight ~ age + sex', df).fit()", "structured/model", "pass"),
    ("artists", "plt.hist(df.weight, bins=[0, 100])", "text", "pass"),
    ("agg", "plt.switch_backend('Agg'); plt.bar(['a', 'b'], [30, 4]);", "structured/figure",
     "review"),
    ("raw", "import base64, io\nbuf = io.BytesIO(); f = plt.figure(); f.savefig(buf); plt.close(f)\n"
     "display({'image/png': base64.b64encode(buf.getvalue()).decode()}, raw=True)", "image",
     "review"),
]  # fmt: skip


def _execute(cells: list[str], env: dict[str, str] | None = None) -> NotebookNode:
    nb = new_notebook(
        cells=[new_code_cell(c) for c in cells],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    client = NotebookClient(
        nb, timeout=60, kernel_name="python3", allow_errors=True, extra_arguments=EXTENSION
    )
    client.execute(env={**os.environ, **(env or {})})
    return nb


def _outputs(nb: NotebookNode, report: NotebookReport, cell: int) -> list[tuple[Any, Any]]:
    """(output, its report) of one cell, without the stream noise of library warnings."""
    found = []
    for r in report.outputs:
        if r.cell_index == cell and r.output_type != "stream":
            found.append((nb.cells[cell].outputs[r.output_index], r))
    return found


@pytest.fixture(scope="module")
def executed() -> tuple[NotebookNode, NotebookReport]:
    nb = _execute([SETUP, *(code for _, code, _, _ in CELLS)])
    return nb, check_notebook(nb, Policy())


def _by_name(executed: tuple[NotebookNode, NotebookReport], name: str) -> list[tuple[Any, Any]]:
    nb, report = executed
    index = 1 + [n for n, *_ in CELLS].index(name)
    return _outputs(nb, report, index)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kind", "status"), [(n, k, s) for n, _, k, s in CELLS])
def test_kernel_capture_verdicts(
    executed: tuple[NotebookNode, NotebookReport], name: str, kind: str, status: str
) -> None:
    outputs = _by_name(executed, name)
    assert [r.kind for _, r in outputs].count(kind) == 1, [(r.kind, r.status) for _, r in outputs]
    ((_, found),) = [(o, r) for o, r in outputs if r.kind == kind]
    assert found.status == status, found.verdict.reasons
    # Whatever else the cell showed (a note instead of an artist's repr) passes.
    assert all(r.status == "pass" for _, r in outputs if r is not found)


@pytest.mark.slow
def test_no_raw_image_left_for_captured_figures(
    executed: tuple[NotebookNode, NotebookReport],
) -> None:
    nb, report = executed
    raw = [
        r.cell_index
        for r in report.outputs
        if "image/png" in (nb.cells[r.cell_index].outputs[r.output_index].get("data") or {})
    ]
    assert raw == [1 + [n for n, *_ in CELLS].index("raw")]  # only the deliberate bypass
    for name in ("bar", "scatter", "hist", "show", "display", "agg"):
        ((output, _),) = _by_name(executed, name)
        assert set(output["data"]) == {MIME_TYPE, "text/html", "text/plain"}
        assert "data:image/png;base64," in output["data"]["text/html"]


@pytest.mark.slow
def test_kernel_redraws_without_the_small_bars(
    executed: tuple[NotebookNode, NotebookReport],
) -> None:
    ((bar, _),) = _by_name(executed, "bar")
    values = [row[-1] for row in bar["data"][MIME_TYPE]["table"]["data"]]
    assert values == [30.0, None, 20.0]
    ((agg, _),) = _by_name(executed, "agg")
    assert [row[-1] for row in agg["data"][MIME_TYPE]["table"]["data"]] == [30.0, None]
    ((hist, _),) = _by_name(executed, "hist")
    payload = hist["data"][MIME_TYPE]
    counts = [b["count"] for b in payload["evidence"]["axes"][0]["bars"][0]["bars"]]
    assert sum(counts) == 60
    shown = [row[-1] for row in payload["table"]["data"]]
    assert all((v is None) == (0 < c < 10 or c == 0) for v, c in zip(shown, counts, strict=True))
    assert any(v is None for v in shown), counts


@pytest.mark.slow
def test_kernel_policy_from_environment() -> None:
    code = "pd.DataFrame({'n': [7, 48]}, index=pd.Index(['A', 'B'], name='site'))"
    nb = _execute(["import pandas as pd", code], env={POLICY_ENV: '{"min_count": 5}'})
    (output,) = nb.cells[1].outputs
    payload = output["data"][MIME_TYPE]
    assert payload["policy"]["min_count"] == 5
    assert payload["status"] == "review"  # the kernel used the site's min_count of 5 ...
    default = frame_output(pd.DataFrame({"n": [7, 48]}, index=pd.Index(["A", "B"], name="site")))
    assert default.status == "fail"  # ... not the default 10
    ctx = CheckContext(Policy(min_count=5), load_recheck())
    assert check_output(output, ctx).verdict.status == "review"
    assert check_output(output, CheckContext(Policy(), load_recheck())).verdict.status == "fail"
