"""The main job: `phds demo` executes the example study with papermill and checks every output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from phds_tre.check.notebook import stored_verdict

PHDS = Path(sys.executable).with_name("phds")


@pytest.mark.slow
def test_demo_executes_and_checks_the_example_study(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [str(PHDS), "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "demo finished" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    statuses = [o["status"] for o in report["outputs"]]
    kinds = [o["kind"] for o in report["outputs"]]
    assert "pass" in statuses and "review" in statuses
    assert sum(k.startswith("structured") for k in kinds) >= 4
    checked = nbformat.read(out / "checked.ipynb", as_version=4)
    nbformat.validate(checked)
    verdicts = [
        stored_verdict(checked, ci, oi)["status"]
        for ci, c in enumerate(checked.cells)
        if c.cell_type == "code"
        for oi in range(len(c.outputs))
    ]
    assert verdicts == statuses
    # the raw printout of rows is never passed
    raw = [o for o in report["outputs"] if o["output_type"] == "stream"]
    assert raw and all(o["status"] != "pass" for o in raw)


def test_demo_rejects_a_bad_policy(tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text("min_count = -1\n")
    proc = subprocess.run(
        [str(PHDS), "demo", "--out", str(tmp_path / "o"), "--policy", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("phds: error:") and "min_count" in proc.stderr
    assert "Traceback" not in proc.stderr
