"""Structured outputs with the real :func:`phds_tre.sdc.recheck`: honest ones keep their verdict,
forged ones (a claimed status, an edited published table) never pass."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from phds_tre import sdc
from phds_tre.check import STRUCTURED_MIME
from phds_tre.check.checkers import CheckContext, check_output
from phds_tre.check.structured import load_recheck
from phds_tre.sdc.policy import DEFAULT_POLICY, Policy

PHDS = Path(sys.executable).with_name("phds")


def _bundle(out: Any) -> dict[str, Any]:
    """The MIME bundle of an sdc output (``_repr_mimebundle_`` may return (data, metadata))."""
    bundle = out._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    return json.loads(json.dumps(data))  # as it would be after a round trip through a notebook


def _frame(small: int) -> pd.DataFrame:
    """Sex × band counts: F/a 15, F/b 15, M/a 20, M/b ``small``."""
    rows = [("F", "a")] * 15 + [("F", "b")] * 15 + [("M", "a")] * 20 + [("M", "b")] * small
    return pd.DataFrame(rows, columns=["sex", "band"])


def _crosstab(small: int, policy: Policy = DEFAULT_POLICY) -> Any:
    df = _frame(small)
    return sdc.crosstab(df.sex, df.band, policy=policy)


def _check(data: dict[str, Any], policy: Policy = DEFAULT_POLICY) -> Any:
    output = new_output("display_data", data=data, metadata={})
    return check_output(output, CheckContext(policy, load_recheck()))


def test_mime_type_matches_sdc() -> None:
    assert sdc.MIME_TYPE == STRUCTURED_MIME
    assert load_recheck() is sdc.recheck


def test_honest_safe_table_passes() -> None:
    out = _crosstab(12)
    assert out.status == "pass"
    result = _check(_bundle(out))
    assert result.kind == "structured/table"
    assert result.verdict.status == "pass", result.verdict.reasons
    assert any("text/html: not released as-is" in r for r in result.verdict.reasons)


@pytest.mark.parametrize("small", [5, 9, 10])
def test_honest_verdict_is_kept(small: int) -> None:
    out = _crosstab(small)
    assert _check(_bundle(out)).verdict.status == out.status


def test_forged_status_does_not_pass() -> None:
    data = _bundle(_crosstab(5))
    payload = data[STRUCTURED_MIME]
    assert payload["status"] != "pass"
    payload["status"] = "pass"
    payload["reasons"] = []
    payload["checks"]["not_pass"] = []
    payload["checks"]["summary"] = {"threshold": {"pass": 4}}
    verdict = _check(data).verdict
    assert verdict.status != "pass"
    assert any("claimed 'pass'" in r for r in verdict.reasons)


def test_forged_published_table_does_not_pass() -> None:
    # The honest table passes; the kernel then edits one published count down to 3.
    data = _bundle(_crosstab(12))
    forged = copy.deepcopy(data)
    cells = forged[STRUCTURED_MIME]["table"]["data"]
    cells[1][1] = 3.0
    verdict = _check(forged).verdict
    assert verdict.status == "fail"


def test_forged_unsuppressed_cell_does_not_pass() -> None:
    data = _bundle(_crosstab(5))
    payload = data[STRUCTURED_MIME]
    table = payload["table"]["data"]
    suppressed = [(i, j) for i, row in enumerate(table) for j, v in enumerate(row) if v is None]
    assert suppressed, "the 5-cell is suppressed in the honest output"
    for i, j in suppressed:
        table[i][j] = 5.0
    payload["status"] = "pass"
    assert _check(data).verdict.status != "pass"


def test_site_policy_is_the_one_applied() -> None:
    # Made under a lenient kernel-side policy, checked with the site's defaults.
    lenient = Policy(min_count=3)
    out = _crosstab(5, policy=lenient)
    assert out.status == "pass"
    assert _check(_bundle(out), DEFAULT_POLICY).verdict.status != "pass"
    assert _check(_bundle(out), lenient).verdict.status == "pass"


def test_extra_representation_beside_a_real_structured_output_fails() -> None:
    data = _bundle(_crosstab(12))
    data["text/markdown"] = "| F | 15 |"
    assert _check(data).verdict.status == "fail"


def test_garbage_payload_fails() -> None:
    for payload in ({}, {"schema": "phds.output", "version": 1, "kind": "table"}, {"kind": "nope"}):
        assert _check({STRUCTURED_MIME: payload}).verdict.status == "fail"


def test_notebook_with_structured_outputs_through_the_cli(tmp_path: Path) -> None:
    honest = _bundle(_crosstab(12))
    forged = _bundle(_crosstab(12))
    forged[STRUCTURED_MIME]["table"]["data"][0][0] = np.float64(4.0).item()
    cells = []
    for i, data in enumerate([honest, forged]):
        cell = new_code_cell(f"sdc.crosstab(df.sex, df.band)  # {i}", execution_count=i + 1)
        cell.outputs = [new_output("execute_result", data=data, metadata={}, execution_count=i + 1)]
        cells.append(cell)
    path = tmp_path / "structured.ipynb"
    nbformat.write(new_notebook(cells=cells), path)
    proc = subprocess.run(
        [str(PHDS), "check", str(path), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 4, proc.stderr
    doc = json.loads(proc.stdout)
    assert [o["status"] for o in doc["outputs"]] == ["pass", "fail"]
    assert [o["kind"] for o in doc["outputs"]] == ["structured/table", "structured/table"]


def test_a_stricter_site_policy_rebuilds_rather_than_fails() -> None:
    """A kernel run under a lenient policy: the site re-derives the table with its own rules."""
    import pandas as pd

    from phds_tre import sdc
    from phds_tre.check.checkers import CheckContext, check_output
    from phds_tre.sdc.policy import Policy

    df = pd.DataFrame({"a": ["x"] * 4 + ["y"] * 30, "b": ["p"] * 34})
    lenient = sdc.crosstab(df.a, df.b, policy=Policy(min_count=3))
    assert lenient.table.notna().all().all()
    bundle = lenient._repr_mimebundle_()
    output = {"output_type": "display_data", "data": bundle, "metadata": {}}
    verdict = check_output(output, CheckContext(Policy(), sdc.recheck)).verdict
    assert verdict.status == "review"  # the x cell is suppressed under the site's min_count 10
    assert any("another policy" in r for r in verdict.reasons)
