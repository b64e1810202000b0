"""End to end: outputs made by a real kernel (pandas, matplotlib, sdc, an error) through ``phds check``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

PHDS = Path(sys.executable).with_name("phds")

SETUP = """\
import matplotlib
matplotlib.use("module://matplotlib_inline.backend_inline")
import matplotlib.pyplot as plt
import pandas as pd
from phds_tre import sdc
rows = [("F", "a")] * 15 + [("F", "b")] * 15 + [("M", "a")] * 20 + [("M", "b")] * 5
df = pd.DataFrame(rows, columns=["sex", "band"])
"""

# (code, expected output kind, expected status)
CELLS = [
    ("print('cohort loaded')", "stream", "pass"),
    ("df.sex.value_counts()", "text", "review"),  # 30 and 25: a raw table, no small count
    ("pd.crosstab(df.sex, df.band)", "html+text", "fail"),  # the raw 5 is a small count
    (
        "sdc.crosstab(df.sex, df.band)",
        "structured/table",
        "review",
    ),  # suppressed: a reviewer confirms
    ("plt.bar(['a', 'b'], [30, 12]); plt.show()", "image+text", "review"),
    ("df['no such column']", "error", "pass"),  # the name only
]


@pytest.mark.slow
def test_executed_notebook(tmp_path: Path) -> None:
    nb = new_notebook(
        cells=[new_markdown_cell("# Study"), new_code_cell(SETUP)]
        + [new_code_cell(code) for code, _, _ in CELLS],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
    )
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    path = tmp_path / "executed.ipynb"
    nbformat.write(nb, path)

    checked = tmp_path / "checked.ipynb"
    proc = subprocess.run(
        [str(PHDS), "check", str(path), "--format", "json", "--write", str(checked)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 4, proc.stderr
    doc = json.loads(proc.stdout)
    got = [(o["cell_index"], o["kind"], o["status"]) for o in doc["outputs"]]
    expected = [(i + 2, kind, status) for i, (_, kind, status) in enumerate(CELLS)]
    assert got == expected, json.dumps(doc["outputs"], indent=1)
    nbformat.validate(nbformat.read(checked, as_version=4))
