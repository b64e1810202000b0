"""One output at a time: the registry and dispatcher, with a fake re-check for structured outputs.

The fake stands in for :func:`phds_tre.sdc.recheck` so this layer is tested on
its own; ``test_check_structured.py`` uses the real one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from phds_tre.check import REGISTRY, STRUCTURED_MIME, check_notebook
from phds_tre.check.checkers import CheckContext, CheckerRegistry, check_output
from phds_tre.check.verdict import Verdict
from phds_tre.sdc.policy import DEFAULT_POLICY, Policy

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgAAAAAgABVKJPXQAAAABJRU5ErkJggg=="


@dataclass
class FakeRecheck:
    """Returns a fixed status and records what it was asked."""

    status: str = "pass"
    reasons: list[str] = field(default_factory=lambda: ["all cells at or above 10"])
    calls: list[tuple[dict[str, Any], Policy]] = field(default_factory=list)

    def __call__(self, payload: dict[str, Any], policy: Policy) -> FakeRecheck:
        self.calls.append((payload, policy))
        return self


def _ctx(recheck: Any = None) -> CheckContext:
    return CheckContext(DEFAULT_POLICY, recheck)


def _display(data: dict[str, Any], metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    return new_output("display_data", data=data, metadata=metadata or {})


# ---- structured ----------------------------------------------------------------
def test_structured_output_is_rechecked_and_claimed_status_ignored() -> None:
    fake = FakeRecheck(status="fail", reasons=["cell (M, b) has 5 contributors"])
    payload = {"kind": "table", "status": "pass"}
    result = check_output(
        _display({STRUCTURED_MIME: payload, "text/plain": "[PASS]", "text/html": "<b>PASS</b>"}),
        _ctx(fake),
    )
    assert result.verdict.status == "fail"
    assert result.kind == "structured/table"
    assert fake.calls == [(payload, DEFAULT_POLICY)]
    reasons = " | ".join(result.verdict.reasons)
    assert "cell (M, b) has 5 contributors" in reasons
    assert "the kernel claimed 'pass'" in reasons
    assert "text/plain: not released as-is" in reasons
    assert "text/html: not released as-is" in reasons


@pytest.mark.parametrize("status", ["pass", "review", "fail"])
def test_structured_verdict_is_the_rechecks(status: str) -> None:
    result = check_output(
        _display({STRUCTURED_MIME: {"status": status}}), _ctx(FakeRecheck(status))
    )
    assert result.verdict.status == status


def test_other_mime_type_beside_a_structured_output_fails() -> None:
    data = {STRUCTURED_MIME: {"kind": "table"}, "text/plain": "x", "image/png": PNG}
    verdict = check_output(_display(data), _ctx(FakeRecheck("pass"))).verdict
    assert verdict.status == "fail"
    assert any(
        r.startswith("image/png: not allowed beside a structured output") for r in verdict.reasons
    )


def test_structured_output_fails_without_a_recheck() -> None:
    def unavailable(payload: dict[str, Any], policy: Policy) -> Any:
        raise RuntimeError("boom")

    verdict = check_output(_display({STRUCTURED_MIME: {}}), _ctx(unavailable)).verdict
    assert verdict.status == "fail"
    assert "could not be re-checked (RuntimeError: boom)" in verdict.reasons[0]


def test_structured_payload_must_be_an_object() -> None:
    verdict = check_output(_display({STRUCTURED_MIME: "[1, 2]"}), _ctx(FakeRecheck())).verdict
    assert verdict.status == "fail"


def test_recheck_with_an_unknown_status_fails() -> None:
    verdict = check_output(_display({STRUCTURED_MIME: {}}), _ctx(FakeRecheck("ok"))).verdict
    assert verdict.status == "fail"


# ---- unstructured bundles ---------------------------------------------------
def test_dataframe_bundle_is_worst_of_its_representations() -> None:
    data = {"text/plain": "   n\nA  3\nB  40", "text/html": "<p>table</p>"}
    result = check_output(new_output("execute_result", data=data, execution_count=1), _ctx())
    assert result.kind == "html+text"
    assert result.verdict.status == "fail"
    assert any(r.startswith("text/plain: looks like a raw table") for r in result.verdict.reasons)


def test_figure_bundle_reviews() -> None:
    data = {"image/png": PNG, "text/plain": "<Figure size 640x480 with 1 Axes>"}
    result = check_output(_display(data), _ctx())
    assert (result.kind, result.verdict.status) == ("image+text", "review")


@pytest.mark.parametrize(
    "mime",
    [
        "application/javascript",
        "text/javascript",
        "application/vnd.jupyter.widget-view+json",
        "application/vnd.jupyter.widget-state+json",
    ],
)
def test_javascript_and_widgets_fail(mime: str) -> None:
    value: Any = {"model_id": "abc"} if "widget" in mime else "alert(1)"
    verdict = check_output(_display({mime: value, "text/plain": "widget"}), _ctx()).verdict
    assert verdict.status == "fail"


@pytest.mark.parametrize(
    "mime", ["application/vnd.plotly.v1+json", "application/pdf", "TEXT/PLAIN", "text/csv"]
)
def test_unknown_mime_types_fail(mime: str) -> None:
    result = check_output(_display({mime: "x"}), _ctx())
    assert result.verdict.status == "fail"
    assert result.verdict.reasons == (f"{mime}: MIME type not understood by the checker",)
    assert result.kind == "unknown"


def test_application_json_is_free_text() -> None:
    assert (
        check_output(_display({"application/json": {"ok": True}}), _ctx()).verdict.status == "pass"
    )
    assert check_output(_display({"application/json": {"n": 4}}), _ctx()).verdict.status == "review"


def test_empty_bundle_passes() -> None:
    result = check_output(_display({}), _ctx())
    assert (result.kind, result.verdict.status) == ("empty", "pass")


def test_checker_crash_withholds_the_output() -> None:
    registry = CheckerRegistry()

    @registry.register("text/plain", kind="text")
    def broken(value: object, ctx: CheckContext) -> Verdict:
        raise ValueError("cannot parse")

    result = check_output(_display({"text/plain": "x"}), _ctx(), registry)
    assert result.verdict.status == "fail"
    assert "ValueError: cannot parse" in result.verdict.reasons[0]


def test_non_text_value_for_a_text_type_fails() -> None:
    # Not valid nbformat (new_output would refuse it), but the checker must not crash.
    output = {"output_type": "display_data", "data": {"text/plain": {"a": 1}}, "metadata": {}}
    assert check_output(output, _ctx()).verdict.status == "fail"


def test_registry_lists_what_it_understands() -> None:
    assert "text/html" in REGISTRY
    assert "image/svg+xml" in list(REGISTRY)
    assert "application/vnd.plotly.v1+json" not in REGISTRY


# ---- streams ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [("loading cohort\n", "pass"), ("loaded 1234 rows\n", "review"), ("A  9\nB  40\n", "fail")],
)
def test_stream_output(text: str, expected: str) -> None:
    for name in ("stdout", "stderr"):
        result = check_output(new_output("stream", name=name, text=text), _ctx())
        assert (result.kind, result.verdict.status) == ("stream", expected)


# ---- errors --------------------------------------------------------------------
def test_error_releases_only_its_name() -> None:
    output = new_output(
        "error",
        ename="KeyError",
        evalue="'patient 1234'",
        traceback=["\x1b[31mKeyError\x1b[0m: 1234"],
    )
    result = check_output(output, _ctx())
    assert (result.kind, result.verdict.status) == ("error", "pass")
    assert result.verdict.redact == ("evalue", "traceback")
    assert "message and traceback are withheld" in result.verdict.reasons[0]


@pytest.mark.parametrize("ename", ["Key Error", "x=3", "Ошибка", "", "A" * 101, "1Error"])
def test_error_name_that_is_not_a_plain_identifier_fails(ename: str) -> None:
    output = new_output("error", ename=ename, evalue="", traceback=[])
    assert check_output(output, _ctx()).verdict.status == "fail"


def test_error_name_with_digits_reviews() -> None:
    output = new_output("error", ename="Patients3", evalue="", traceback=[])
    verdict = check_output(output, _ctx()).verdict
    assert verdict.status == "review"
    assert verdict.redact == ("evalue", "traceback")


# ---- output metadata ------------------------------------------------------------
def test_metadata_with_hidden_numbers_is_flagged_for_review() -> None:
    output = _display({"text/plain": "done"}, metadata={"note": "n=3", "extra": {"count": 4}})
    verdict = check_output(output, _ctx()).verdict
    assert verdict.status == "review"
    assert any(
        "output metadata (not released): numbers in free text: 3" in r for r in verdict.reasons
    )
    assert any("extra.count=4" in r for r in verdict.reasons)


def test_layout_metadata_is_noted_but_not_flagged() -> None:
    output = _display({"image/png": PNG}, metadata={"image/png": {"width": 640, "height": 480}})
    verdict = check_output(output, _ctx()).verdict
    assert verdict.status == "review"  # the image itself
    assert any("output metadata is not released" in r for r in verdict.reasons)


def test_own_verdict_in_metadata_is_not_rescanned() -> None:
    stored = {"phds": {"verdict": {"status": "pass", "policy_hash": "sha256:0123", "reasons": []}}}
    verdict = check_output(_display({"text/plain": "done"}, metadata=stored), _ctx()).verdict
    assert verdict.status == "pass"


# ---- notebooks ------------------------------------------------------------------
def test_notebook_widgets_metadata_fails_and_markdown_cells_have_no_outputs() -> None:
    nb = new_notebook(
        cells=[
            new_markdown_cell("# 3 patients"),
            new_code_cell("x = 1"),
            new_code_cell("print('hi')"),
        ]
    )
    nb.cells[2].outputs = [new_output("stream", name="stdout", text="hi\n")]
    report = check_notebook(nb, DEFAULT_POLICY, recheck=FakeRecheck())
    assert [(o.cell_index, o.output_index) for o in report.outputs] == [(2, 0)]
    assert report.status == "pass"
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    report = check_notebook(nb, DEFAULT_POLICY, recheck=FakeRecheck())
    assert report.status == "fail"
    assert "widget" in report.notebook.reasons[0]
    assert report.counts() == {"pass": 1, "review": 0, "fail": 0}


# ---- published table vs the re-derived one ----------------------------------------
@dataclass
class _Rederived:
    table: Any


@dataclass
class FakeRecheckWithOutput(FakeRecheck):
    """Like the real re-check: also exposes the output re-derived from the evidence."""

    output: Any = None


def test_edited_published_table_fails_even_when_the_recheck_passes() -> None:
    import pandas as pd

    from phds_tre.sdc.output import table_to_json

    table = pd.DataFrame({"a": [15.0, 20.0], "b": [15.0, 12.0]}, index=["F", "M"])
    honest = {
        "kind": "table",
        "status": "pass",
        "table": table_to_json(table),
        "policy_hash": DEFAULT_POLICY.hash,  # same policy: the tables must agree
    }
    fake = FakeRecheckWithOutput("pass", output=_Rederived(table))
    assert check_output(_display({STRUCTURED_MIME: honest}), _ctx(fake)).verdict.status == "pass"

    forged = {**honest, "table": table_to_json(table.replace(12.0, 3.0))}
    verdict = check_output(_display({STRUCTURED_MIME: forged}), _ctx(fake)).verdict
    assert verdict.status == "fail"
    assert "published table differs" in verdict.reasons[0]

    # Re-derived means may differ in the last bits: not a forgery.
    nudged = {**honest, "table": table_to_json(table * (1 + 1e-13))}
    assert check_output(_display({STRUCTURED_MIME: nudged}), _ctx(fake)).verdict.status == "pass"
