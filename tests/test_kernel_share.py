"""``phds_tre.share``: named results for combining across sites, re-checked like any output."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient
from nbformat import NotebookNode
from nbformat.v4 import new_code_cell, new_notebook

from phds_tre import sdc
from phds_tre.check.checkers import SHARE_MIME as CHECKER_SHARE_MIME
from phds_tre.check.checkers import CheckContext, check_output
from phds_tre.check.notebook import check_notebook
from phds_tre.check.structured import load_recheck
from phds_tre.kernel.share import SHARE_MIME, share_bundle
from phds_tre.sdc import MIME_TYPE, Policy

ROWS = pd.DataFrame(
    {
        "sex": ["F"] * 40 + ["M"] * 44,
        "sepsis": [True] * 12 + [False] * 28 + [True] * 15 + [False] * 29,
    }
)
CTX = CheckContext(Policy(), load_recheck())


def _display(bundle: dict[str, Any]) -> dict[str, Any]:
    """The bundle as it sits in an executed notebook: a display_data output, strict JSON."""
    data = json.loads(json.dumps(bundle, allow_nan=False))
    return {"output_type": "display_data", "data": data, "metadata": {}}


def _verdict(bundle: dict[str, Any]) -> tuple[str, str]:
    found = check_output(_display(bundle), CTX)
    return found.kind, found.verdict.status


def test_mime_type_agrees_with_the_checker() -> None:
    assert SHARE_MIME == CHECKER_SHARE_MIME == "application/vnd.phds.share+json"


def test_share_of_a_checked_table_is_its_payload() -> None:
    out = sdc.crosstab(ROWS.sex, ROWS.sepsis)
    bundle = share_bundle("sepsis_by_sex", out)
    assert set(bundle) == {SHARE_MIME, "text/plain"}
    envelope = bundle[SHARE_MIME]
    assert envelope["schema"] == "phds.share" and envelope["version"] == 1
    assert envelope["name"] == "sepsis_by_sex"
    assert envelope["payload"] == json.loads(json.dumps(out.to_payload()))
    assert _verdict(bundle) == ("share+text", out.status) == ("share+text", "pass")


def test_share_of_a_table_with_small_counts_is_rechecked() -> None:
    small = pd.concat([ROWS.iloc[:43], ROWS.iloc[-3:]])  # 3 boys with sepsis, 3 without
    out = sdc.crosstab(small.sex, small.sepsis, policy=Policy(min_count=3))
    assert out.status == "pass"  # under the kernel's lax policy ...
    assert _verdict(share_bundle("lax", out))[1] != "pass"  # ... the site's own disagrees


@pytest.mark.parametrize(
    "value",
    [
        {"beta_age": 0.42, "var_beta_age": 0.0031},
        {"beta_age": {"estimate": 0.42, "variance": 0.0031}},
        pd.Series([0.42, 0.0031], index=pd.Index(["beta", "variance"], name="name")),
    ],
    ids=["flat", "nested", "series"],
)
def test_share_of_estimates_is_review(value: object) -> None:
    bundle = share_bundle("estimates", value)
    assert bundle[SHARE_MIME]["payload"]["kind"] == "frame"
    assert _verdict(bundle) == ("share+text", "review")


def test_share_of_small_sufficient_statistics_fails() -> None:
    assert _verdict(share_bundle("xtx", {"n": 4, "sum_age": 31.5}))[1] == "fail"
    assert _verdict(share_bundle("xtx", np.array([[120.0, 35.5], [35.5, 14.25]])))[1] == "review"


@pytest.mark.parametrize("name", ["", "1st", "bad name", "a/b", "é", "x" * 65, None, 3], ids=repr)
def test_bad_names_raise(name: Any) -> None:
    with pytest.raises(ValueError, match="name"):
        share_bundle(name, {"a": 1.5})


@pytest.mark.parametrize(
    "value", ["text", [1, 2], {"a": "b"}, {1: 2.0}, np.zeros((2, 2, 2)), {"a": True}], ids=repr
)
def test_unshareable_values_raise(value: object) -> None:
    with pytest.raises(TypeError, match="share"):
        share_bundle("x", value)


def test_name_with_numbers_goes_to_review() -> None:
    out = sdc.crosstab(ROWS.sex, ROWS.sepsis)
    assert _verdict(share_bundle("model2", out))[1] == "review"


def _forged(change: Any) -> dict[str, Any]:
    bundle = share_bundle("sepsis", sdc.crosstab(ROWS.sex, ROWS.sepsis))
    forged = copy.deepcopy(bundle)
    change(forged[SHARE_MIME])
    return forged


@pytest.mark.parametrize(
    "change",
    [
        lambda e: e.pop("name"),
        lambda e: e.update(extra=1),
        lambda e: e.update(schema="phds.output"),
        lambda e: e.update(version=True),
        lambda e: e.update(version=2),
        lambda e: e.update(name="has space"),
        lambda e: e.update(payload=[1, 2]),
        lambda e: e["payload"].update(kind="nonsense"),
        lambda e: e["payload"]["evidence"]["blocks"][0]["n"][0].__setitem__(0, 3),
        lambda e: e["payload"]["table"]["data"][0].__setitem__(0, 9),
    ],
    ids=[
        "no-name",
        "extra-key",
        "schema",
        "version-bool",
        "version",
        "name",
        "payload-list",
        "kind",
        "evidence",
        "table",
    ],
)
def test_malformed_envelopes_fail(change: Any) -> None:
    assert _verdict(_forged(change))[1] == "fail"


def test_share_envelope_alone_is_checked() -> None:
    bundle = share_bundle("sepsis", sdc.crosstab(ROWS.sex, ROWS.sepsis))
    only = {SHARE_MIME: bundle[SHARE_MIME]}
    assert _verdict(only) == ("share", "pass")
    beside = {**bundle, MIME_TYPE: bundle[SHARE_MIME]["payload"]}
    assert _verdict(beside)[1] == "fail"  # nothing rides beside a structured output


def test_import_phds_tre_stays_cheap() -> None:
    code = (
        "import sys, phds_tre, phds_tre.kernel\n"
        "heavy = ['pandas', 'IPython', 'matplotlib', 'phds_tre.kernel.share']\n"
        "print([m for m in heavy if m in sys.modules])\n"
        "print(phds_tre.share.__module__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split("\n")[:2] == ["[]", "phds_tre.kernel.share"]


# ---------------------------------------------------------------------------
# a real kernel, the extension loaded with %load_ext
# ---------------------------------------------------------------------------
SETUP = """\
%load_ext phds_tre.kernel
import pandas as pd
from phds_tre import sdc, share
df = pd.DataFrame({"sex": ["F"] * 40 + ["M"] * 44,
                   "sepsis": [True] * 12 + [False] * 28 + [True] * 15 + [False] * 29})
"""
CELLS = [
    "share('sepsis_by_sex', sdc.crosstab(df.sex, df.sepsis))",
    "share('estimates', {'beta': 0.42, 'variance': 0.0031})",
    "share('bad name', {'beta': 0.42})",
    "import phds_tre; phds_tre.share('by_sex', df.groupby('sex').sepsis.mean())",
]


@pytest.fixture(scope="module")
def executed() -> NotebookNode:
    nb = new_notebook(
        cells=[new_code_cell(c) for c in [SETUP, *CELLS]],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    NotebookClient(nb, timeout=60, kernel_name="python3", allow_errors=True).execute()
    return nb


@pytest.mark.slow
def test_kernel_share(executed: NotebookNode) -> None:
    report = check_notebook(executed, Policy())
    got = {(r.cell_index, r.kind, r.status) for r in report.outputs if r.kind != "stream"}
    assert got == {
        (1, "share+text", "pass"),
        (2, "share+text", "review"),
        (3, "error", "pass"),  # the error's name only
        (4, "share+text", "review"),
    }
    assert executed.cells[3].outputs[0]["ename"] == "ValueError"
    payload = executed.cells[1].outputs[0]["data"][SHARE_MIME]["payload"]
    assert payload["kind"] == "table" and sdc.recheck(payload, Policy()).status == "pass"
