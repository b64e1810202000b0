"""The release notebook: outputs rebuilt by the node, placeholders for the rest, decisions applied."""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json
from typing import Any

import nbformat
import pandas as pd
import pytest
from nbformat import NotebookNode
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from PIL import Image, PngImagePlugin

from phds_tre import sdc
from phds_tre.check import check_notebook, write_verdicts
from phds_tre.check.notebook import NotebookReport
from phds_tre.release import IdentifierIndex, ReleaseError, ReleaseNotebook, build_release
from phds_tre.site_policy import ReleasePolicy, SitePolicy

SECRET = "HSJD-10012345"
MIME = sdc.MIME_TYPE
POLICY = SitePolicy()

# Cell indices of the executed notebook (cell 0 is markdown).
SAFE, SUPPRESSED, STREAM, ERROR, IMAGE, HTML, FORGED, UNKNOWN, NUMBERS = range(1, 10)


def _frame(small: int) -> pd.DataFrame:
    rows = [("F", "a")] * 15 + [("F", "b")] * 15 + [("M", "a")] * 20 + [("M", "b")] * small
    return pd.DataFrame(rows, columns=["sex", "band"])


def _bundle(out: Any) -> dict[str, Any]:
    """The MIME bundle as it is after a round trip through a notebook file."""
    return json.loads(json.dumps(out._repr_mimebundle_()))


def _png_with_text(text: str) -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", text)
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (200, 30, 30)).save(buffer, "PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def executed_notebook() -> NotebookNode:
    """A notebook as a kernel leaves it: real sdc outputs, a stream, an error, an image, HTML …"""
    df = _frame(12)
    safe = _bundle(sdc.crosstab(df.sex, df.band))
    safe["text/html"] = "<p>KERNEL-HTML</p>"  # companions are regenerated, never copied
    suppressed = _bundle(sdc.crosstab(_frame(5).sex, _frame(5).band))
    forged = _bundle(sdc.crosstab(_frame(5).sex, _frame(5).band))
    payload = forged[MIME]
    payload["status"], payload["reasons"] = "pass", []
    payload["checks"] = {"summary": {"threshold": {"pass": 4}}, "not_pass": []}
    payload["table"]["data"][1][1] = 5.0  # the suppressed cell, un-suppressed by the kernel
    forged["text/plain"] = "band a b\nM 20 5"

    def code(source: str, count: int, *outputs: NotebookNode, **metadata: Any) -> NotebookNode:
        return new_code_cell(
            source, execution_count=count, outputs=list(outputs), metadata=metadata
        )

    nb = new_notebook(
        cells=[
            new_markdown_cell("# Cohort study\nSex by band."),
            code(
                "sdc.crosstab(df.sex, df.band)",
                1,
                new_output(
                    "execute_result", data=safe, execution_count=1, metadata={"from": "kernel"}
                ),
                tags=["table"],
                papermill={"duration": 0.5, "status": "completed"},
            ),
            code("display(small)", 2, new_output("display_data", data=suppressed)),
            code(
                "print('cohort loaded')",
                3,
                new_output("stream", name="stdout", text="\x1b[1mcohort loaded\x1b[0m\n"),
            ),
            code(
                "df.loc[secret]",
                4,
                new_output(
                    "error",
                    ename="KeyError",
                    evalue=f"'{SECRET}'",
                    traceback=["\x1b[31mKeyError\x1b[0m", f"KeyError: '{SECRET}'"],
                ),
            ),
            code(
                "plt.show()",
                5,
                new_output("display_data", data={"image/png": _png_with_text(SECRET)}),
            ),
            code(
                "df.head()",
                6,
                new_output(
                    "execute_result",
                    data={
                        "text/html": "<table><tr><td>only 17 girls</td></tr></table>",
                        "text/plain": "17",
                    },
                    execution_count=6,
                ),
            ),
            code("forged", 7, new_output("display_data", data=forged)),
            code("secret()", 8, new_output("display_data", data={"application/x-secret": "abc"})),
            code("print(n)", 9, new_output("stream", name="stdout", text="there are 3 children\n")),
        ],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python", "version": SECRET},
            "papermill": {"parameters": {"site": "HSJD"}},
            "widgets": {"state": {}},
        },
    )
    nbformat.validate(nb)
    return nb


@pytest.fixture
def nb() -> NotebookNode:
    return executed_notebook()


@pytest.fixture
def report(nb: NotebookNode) -> NotebookReport:
    return check_notebook(nb, POLICY.disclosure)


def _release(nb: NotebookNode, report: NotebookReport, **kwargs: Any) -> ReleaseNotebook:
    kwargs.setdefault("site_policy", POLICY)
    release = build_release(nb, report, **kwargs)
    nbformat.validate(nbformat.reads(release.dumps(), as_version=4))
    return release


def _states(release: ReleaseNotebook) -> dict[int, str]:
    return {item.cell_index: item.state for item in release.items}


def test_states_without_decisions(nb: NotebookNode, report: NotebookReport) -> None:
    before = copy.deepcopy(nb)
    release = _release(nb, report)
    assert _states(release) == {
        SAFE: "released",
        SUPPRESSED: "held",
        STREAM: "released",
        ERROR: "released",
        IMAGE: "held",
        HTML: "held",
        FORGED: "withheld",
        UNKNOWN: "withheld",
        NUMBERS: "held",  # numbers in free text: a reviewer decides
    }
    assert release.counts == {"released": 3, "held": 4, "withheld": 2}
    item = release.item(FORGED, 0)
    assert (item.verdict, item.kind, item.decision) == ("fail", "structured/table", None)
    assert nb == before  # the executed notebook is not modified


def test_structured_output_rebuilt_from_the_recheck(
    nb: NotebookNode, report: NotebookReport
) -> None:
    release = _release(nb, report)
    out = release.output(SAFE, 0)
    assert out.output_type == "execute_result" and out.execution_count == 1
    assert set(out.data) == {MIME, "text/html", "text/plain"}
    rechecked = sdc.recheck(nb.cells[SAFE].outputs[0].data[MIME], POLICY.disclosure).output
    assert rechecked is not None
    assert out.data[MIME] == json.loads(json.dumps(rechecked.release_payload()))
    assert "evidence" not in out.data[MIME] and "policy" not in out.data[MIME]
    assert out.data["text/html"] == rechecked._repr_html_()
    assert "KERNEL-HTML" not in out.data["text/html"]
    assert out.data["text/plain"] == repr(rechecked)
    assert out.metadata == {"phds": {"release": "released"}}


def test_no_evidence_anywhere_in_the_release(nb: NotebookNode, report: NotebookReport) -> None:
    approve_all = {
        (i.cell_index, i.output_index): "approve"
        for i in _release(nb, report).items
        if i.cell_index != ERROR  # an approved error message would carry SECRET, by approval
    }
    release = _release(nb, report, decisions=approve_all)
    assert release.counts == {"released": 7, "held": 0, "withheld": 2}
    text = release.dumps()
    assert '"evidence"' not in text
    assert SECRET not in text  # not from the error, the image chunk or the notebook metadata


def test_placeholders_explain_without_quoting(nb: NotebookNode, report: NotebookReport) -> None:
    release = _release(nb, report)
    for cell, state in (
        (SUPPRESSED, "held"),
        (HTML, "held"),
        (FORGED, "withheld"),
        (NUMBERS, "held"),
    ):
        out = release.output(cell, 0)
        item = release.item(cell, 0)
        assert out.output_type == "display_data"
        assert set(out.data) == {"text/plain"}
        assert out.metadata["phds"] == {"release": state, "reason": item.reason}
        assert item.reason in out.data["text/plain"] and state in out.data["text/plain"]
    assert "17" not in release.output(HTML, 0).data["text/plain"]
    assert "3" not in release.output(NUMBERS, 0).data["text/plain"]
    assert "5" not in release.output(FORGED, 0).data["text/plain"]
    assert release.item(SUPPRESSED, 0).reason == "awaiting review by the site (verdict: review)"
    assert release.item(UNKNOWN, 0).reason == "withheld: it failed the site's disclosure checks"


def test_stream_and_error_released_forms(nb: NotebookNode, report: NotebookReport) -> None:
    release = _release(nb, report)
    stream = release.output(STREAM, 0)
    assert dict(stream) == {"output_type": "stream", "name": "stdout", "text": "cohort loaded\n"}
    error = release.output(ERROR, 0)
    assert dict(error) == {
        "output_type": "error",
        "ename": "KeyError",
        "evalue": "",
        "traceback": [],
    }
    assert "error name" in release.item(ERROR, 0).reason


def test_decisions_change_states(nb: NotebookNode, report: NotebookReport) -> None:
    decisions = {
        (SUPPRESSED, 0): "approve",
        (IMAGE, 0): "approve",
        (HTML, 0): "approve",
        (ERROR, 0): "approve",
        (STREAM, 0): "reject",
        (SAFE, 0): "redact",
        (FORGED, 0): "approve",  # an approval cannot release a tampered output
    }
    release = _release(nb, report, decisions=decisions)
    states = _states(release)
    assert [states[c] for c in (SUPPRESSED, IMAGE, HTML, ERROR)] == ["released"] * 4
    assert (states[STREAM], states[SAFE], states[FORGED]) == ("withheld",) * 3
    assert release.item(STREAM, 0).reason == "rejected by the site's reviewer"
    assert release.item(SAFE, 0).reason == "redacted by the reviewer"
    assert "did not match the site's re-check" in release.item(FORGED, 0).reason
    assert release.item(IMAGE, 0).decision == "approve"

    suppressed = release.output(SUPPRESSED, 0).data[MIME]
    assert suppressed["table"]["data"][1][1] is None and "evidence" not in suppressed
    error = release.output(ERROR, 0)
    assert error.evalue == f"'{SECRET}'"
    assert error.traceback == ["KeyError", f"KeyError: '{SECRET}'"]  # escapes removed
    html = release.output(HTML, 0)
    assert html.output_type == "execute_result" and html.execution_count == 6
    assert set(html.data) == {"text/html", "text/plain"}
    assert html.metadata == {"phds": {"release": "released"}}


def test_approved_image_is_reencoded_without_its_chunks(
    nb: NotebookNode, report: NotebookReport
) -> None:
    release = _release(nb, report, decisions={(IMAGE, 0): "approve"})
    data = base64.b64decode(release.output(IMAGE, 0).data["image/png"])
    assert SECRET.encode() not in data and b"tEXt" not in data
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (6, 4)
        assert image.convert("RGB").getpixel((0, 0)) == (200, 30, 30)


def test_metadata_stripped_sources_and_counts_kept(
    nb: NotebookNode, report: NotebookReport
) -> None:
    release = _release(nb, report)
    out_nb = release.notebook
    assert set(out_nb.metadata) == {"kernelspec", "language_info", "phds"}
    assert out_nb.metadata["language_info"] == {"name": "python"}
    assert out_nb.metadata["phds"]["release"]["counts"] == release.counts
    for original, cell in zip(nb.cells, out_nb.cells, strict=True):
        assert cell.source == original.source and cell.cell_type == original.cell_type
        assert cell.get("id") == original.get("id")
        if cell.cell_type == "code":
            assert cell.execution_count == original.execution_count
            for out in cell.outputs:
                if out.output_type in ("display_data", "execute_result"):
                    assert set(out.metadata) == {"phds"}
                    assert set(out.metadata["phds"]) <= {"release", "reason"}
    assert out_nb.cells[SAFE].metadata == {"tags": ["table"]}
    assert out_nb.cells[STREAM].metadata == {}


def test_implausible_execution_count_is_dropped(nb: NotebookNode, report: NotebookReport) -> None:
    nb.cells[SAFE].execution_count = 10012345
    nb.cells[SAFE].outputs[0].execution_count = 10012345
    release = _release(nb, report)
    assert release.notebook.cells[SAFE].execution_count is None
    assert release.output(SAFE, 0).execution_count is None


def test_stored_verdicts_are_not_trusted(nb: NotebookNode, report: NotebookReport) -> None:
    # A kernel (or anyone) writing "pass" into the notebook's metadata changes nothing.
    forged_report = dataclasses.replace(
        report,
        outputs=tuple(
            dataclasses.replace(o, verdict=dataclasses.replace(o.verdict, status="pass"))
            for o in report.outputs
        ),
    )
    written = write_verdicts(copy.deepcopy(nb), forged_report)
    assert _states(_release(written, report)) == _states(_release(nb, report))


def test_recheck_overrides_a_report_that_is_too_kind(
    nb: NotebookNode, report: NotebookReport
) -> None:
    # Even with a report that says pass, the forged payload's own re-check withholds it.
    kind_report = dataclasses.replace(
        report,
        outputs=tuple(
            dataclasses.replace(o, verdict=dataclasses.replace(o.verdict, status="pass"))
            if o.cell_index == FORGED
            else o
            for o in report.outputs
        ),
    )
    release = _release(nb, kind_report)
    # The re-check itself says review (the evidence has a small cell): held, never released.
    assert release.item(FORGED, 0).state == "held"
    assert release.output(FORGED, 0).data.keys() == {"text/plain"}


def test_output_without_verdict_is_withheld(nb: NotebookNode, report: NotebookReport) -> None:
    partial = dataclasses.replace(
        report, outputs=tuple(o for o in report.outputs if o.cell_index != STREAM)
    )
    release = _release(nb, partial)
    assert release.item(STREAM, 0).state == "withheld"
    assert release.item(STREAM, 0).verdict == "none"


def test_site_policy_auto_release(nb: NotebookNode, report: NotebookReport) -> None:
    lenient = SitePolicy(release=ReleasePolicy(auto_release=("pass", "review")))
    states = _states(_release(nb, report, site_policy=lenient))
    assert states[SUPPRESSED] == "released"
    assert states[HTML] == "held"  # rich output still needs a reviewer's approval
    strict = SitePolicy(release=ReleasePolicy(auto_release=()))
    release = _release(nb, report, site_policy=strict)
    assert release.item(SAFE, 0).state == "held"
    assert (
        release.item(SAFE, 0).reason
        == "awaiting review by the site (the site reviews every output)"
    )


def test_rechecks_given_by_the_caller_are_used(nb: NotebookNode, report: NotebookReport) -> None:
    failing = sdc.Recheck("fail", ["re-checked elsewhere"], None)
    release = _release(nb, report, rechecks={(SAFE, 0): failing})
    assert release.item(SAFE, 0).state == "withheld"


def test_identifier_index_rescans_released_forms(nb: NotebookNode, report: NotebookReport) -> None:
    nb.cells[STREAM].outputs[0].text = f"patient {SECRET}\n"
    report = check_notebook(nb, POLICY.disclosure)
    index = IdentifierIndex.from_values({"person.person_source_value": [SECRET]})
    release = _release(
        nb, report, decisions={(STREAM, 0): "approve", (ERROR, 0): "approve"}, index=index
    )
    for cell in (STREAM, ERROR):
        item = release.item(cell, 0)
        assert item.state == "withheld" and "person.person_source_value" in item.reason
        assert SECRET not in item.reason
    assert SECRET not in release.dumps()


def test_bad_decisions(nb: NotebookNode, report: NotebookReport) -> None:
    with pytest.raises(ReleaseError, match="not one of"):
        build_release(nb, report, POLICY, decisions={(SAFE, 0): "maybe"})
    with pytest.raises(ReleaseError, match="no such output"):
        build_release(nb, report, POLICY, decisions={(0, 0): "approve"})
    other = check_notebook(
        new_notebook(cells=[new_code_cell("x", outputs=[new_output("stream", text="a")])]),
        POLICY.disclosure,
    )
    with pytest.raises(ReleaseError, match="does not have"):
        build_release(new_notebook(), other, POLICY)


def test_a_reviewer_can_release_a_rule_failure_as_an_exception() -> None:
    """A model with too few residual degrees of freedom fails; an approval with a reason releases it."""
    df = pd.DataFrame({"y": [0, 1, 0, 1, 1, 0, 1, 0], "x": [float(i) for i in range(8)]})
    failing = _bundle(sdc.ols("x ~ y", df))
    assert failing[MIME]["status"] == "fail"
    nb = new_notebook(
        cells=[
            new_markdown_cell("# small model"),
            new_code_cell(
                "sdc.ols('x ~ y', df)",
                execution_count=1,
                outputs=[new_output("execute_result", data=failing, execution_count=1)],
            ),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    report = check_notebook(nb, POLICY.disclosure)
    assert _release(nb, report).item(1, 0).state == "withheld"
    release = _release(nb, report, decisions={(1, 0): "approve"})
    item = release.item(1, 0)
    assert (item.state, item.verdict, item.decision) == ("released", "fail", "approve")
    assert "exception" in item.reason
    assert release.output(1, 0).data[MIME]["status"] == "fail"  # released as it was checked
