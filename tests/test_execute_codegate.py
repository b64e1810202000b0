"""The static code gate: one finding per construct, with its cell, line and category."""

from __future__ import annotations

import nbformat
import pytest

from phds_tre.execute.codegate import Finding, code_gate
from phds_tre.site_policy import CODE_GATE_CATEGORIES, CodeGatePolicy

ALLOW_ALL = CodeGatePolicy.model_validate(dict.fromkeys(CODE_GATE_CATEGORIES, "allow"))


def notebook(*sources: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell("# a study"))
    for source in sources:
        nb.cells.append(nbformat.v4.new_code_cell(source))
    return nb


def found(*sources: str) -> set[tuple[int, int, str]]:
    """(cell, line, category) of every finding."""
    return {(f.cell, f.line, f.category) for f in code_gate(notebook(*sources), ALLOW_ALL).findings}


@pytest.mark.parametrize(
    ("source", "line", "category"),
    [
        # network
        ("x = 1\nimport socket", 2, "network"),
        ("from urllib.request import urlopen", 1, "network"),
        ("import pandas as pd\n\ndf = pd.read_csv('https://example.org/x.csv')", 3, "network"),
        ("url = 's3://bucket/key'\nimport pandas as pd\npd.read_parquet(url)", 3, "network"),
        ("import requests as r", 1, "network"),
        # subprocess
        ("import os\nos.system('id')", 2, "subprocess"),
        ("import os as o\n\n\no.popen('ls')", 4, "subprocess"),
        ("from os import execv\nexecv('/bin/sh', ['sh'])", 2, "subprocess"),
        ("import subprocess", 1, "subprocess"),
        ("import multiprocessing as mp", 1, "subprocess"),
        ("import ctypes", 1, "subprocess"),
        ("from os import *\nspawnl(0, 'x')", 2, "subprocess"),
        # filesystem
        ("f = open('/etc/passwd')", 1, "filesystem"),
        ("with open('../other_run/out.csv') as f:\n    pass", 1, "filesystem"),
        ("import os\nos.remove('x')", 2, "filesystem"),
        ("import shutil\nshutil.rmtree('results')", 2, "filesystem"),
        ("from pathlib import Path\nPath('/data/site').read_text()", 2, "filesystem"),
        ("p = make()\np.unlink()", 2, "filesystem"),
        ("import os\nd = os.environ['PHDS_SITE_DIR']", 2, "filesystem"),
        ("import pandas as pd\npd.read_parquet('person.parquet')", 2, "filesystem"),
        # dynamic code
        ("exec('print(1)')", 1, "dynamic_code"),
        ("y = eval(s)", 1, "dynamic_code"),
        ("m = __import__('o' + 's')", 1, "dynamic_code"),
        ("import importlib", 1, "dynamic_code"),
        ("import os\nf = getattr(os, 'sys' + 'tem')", 2, "dynamic_code"),
        ("g = globals()", 1, "dynamic_code"),
        ("b = __builtins__", 1, "dynamic_code"),
        ("x = ().__class__.__bases__[0].__subclasses__()", 1, "dynamic_code"),
        ("import pickle\nobj = pickle.loads(blob)", 2, "dynamic_code"),
        ("get_ipython().run_cell('1')", 1, "dynamic_code"),
        # display tampering
        ("import sys\nsys.displayhook = print", 2, "display_tampering"),
        ("import sys\nsys.stdout = open('log.txt', 'w')", 2, "display_tampering"),
        ("ip = get_ipython()\nip.display_formatter.formatters.clear()", 2, "display_tampering"),
        ("get_ipython().events.register('post_run_cell', f)", 1, "display_tampering"),
        ("from IPython.core.formatters import DisplayFormatter", 1, "display_tampering"),
        ("import pandas as pd\npd.DataFrame._repr_html_ = lambda self: ''", 2, "display_tampering"),
        ("import matplotlib.figure\nmatplotlib.figure.Figure.savefig = f", 2, "display_tampering"),
        # phds tampering
        ("import phds_tre.sdc.rules as rules\nrules.MIN_COUNT = 1", 2, "phds_tampering"),
        ("from phds_tre.sdc import policy\nsetattr(policy, 'X', 1)", 2, "phds_tampering"),
        ("from phds_tre.kernel import _capture", 1, "phds_tampering"),
        ("from phds_tre.sdc.policy import set_active_policy", 1, "phds_tampering"),
        (
            "import phds_tre.sdc.policy\n\nphds_tre.sdc.policy.set_active_policy(None)",
            3,
            "phds_tampering",
        ),
        ("display({'application/vnd.phds.output+json': {}}, raw=True)", 1, "phds_tampering"),
        ("out._phds_payload = {}", 1, "phds_tampering"),
        ("import phds_tre.execute.sandbox", 1, "phds_tampering"),
        # shell and magics (IPython syntax)
        ("x = 1\n!curl http://x", 2, "shell"),
        ("files = !ls /", 1, "shell"),
        ("%%bash\necho hi", 1, "shell"),
        ("%%script sh\necho hi", 1, "shell"),
        ("%sx whoami", 1, "shell"),
        ("%system ls", 1, "shell"),
        ("get_ipython().system('id')", 1, "shell"),
        ("x = 1\n%load_ext something", 2, "magic"),
        ("%env A=1", 1, "magic"),
        ("%%capture out\nprint(1)", 1, "magic"),
    ],
)
def test_each_category_with_its_line(source: str, line: int, category: str) -> None:
    assert (1, line, category) in found(source)


def test_code_inside_timing_and_capture_magics_is_analysed() -> None:
    assert (1, 3, "subprocess") in found("%%capture out\nimport os\nos.system('x')")
    assert (1, 2, "network") in found("x = 1\n%time import socket")
    assert (1, 1, "dynamic_code") in found("%timeit -n 3 eval('1')")


def test_benign_code_is_clean() -> None:
    source = """\
%matplotlib inline
import os
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
from IPython.display import display, Markdown
from phds_tre import data
site = data.connect()
df = pd.DataFrame({"a": [1, 2]})
pd.options.display.max_rows = 20
df.to_csv("results.csv")
with open("notes.txt", "w") as fh:
    fh.write(os.path.join("a", "b"))
print("see https://example.org for the method")
class Table:
    def _repr_html_(self):
        return "<b>x</b>"
%time total = df.a.sum()
"""
    result = code_gate(notebook(source), CodeGatePolicy())
    assert result.findings == []
    assert result.status == "clean"


def test_aliases_carry_across_cells() -> None:
    assert (2, 1, "subprocess") in found("import os as o", "o.system('id')")
    assert (2, 1, "shell") in found("ip = get_ipython()", "ip.system('id')")


def test_unparseable_cell_is_a_finding() -> None:
    findings = code_gate(notebook("x = 1\ny = (\n"), ALLOW_ALL).findings
    assert [(f.cell, f.category) for f in findings] == [(1, "dynamic_code")]
    assert "cannot be analysed" in findings[0].reason


def test_finding_carries_reason_excerpt_and_action() -> None:
    result = code_gate(notebook("a = 1\nimport os\nos.system('rm -rf /')  # bye"), CodeGatePolicy())
    finding = next(f for f in result.findings if f.category == "subprocess")
    assert finding == Finding(
        cell=1,
        line=3,
        category="subprocess",
        reason="calls os.system",
        excerpt="os.system('rm -rf /')  # bye",
        action="block",
    )
    assert finding.to_dict()["line"] == 3
    assert result.to_dict()["status"] == "blocked"


def test_status_follows_the_site_policy() -> None:
    nb = notebook("%load_ext foo", "import os\nos.remove('x')")
    assert code_gate(nb, CodeGatePolicy()).status == "needs_approval"  # magic, filesystem: approve
    assert code_gate(nb, CodeGatePolicy(filesystem="block")).status == "blocked"
    allow = CodeGatePolicy(magic="allow", filesystem="allow")
    result = code_gate(nb, allow)
    assert result.status == "clean"
    assert len(result.findings) == 2  # allowed findings are still listed
    assert "2 finding(s)" in result.summary()
    assert code_gate(notebook("!ls"), CodeGatePolicy()).status == "blocked"  # shell: block


def test_markdown_and_raw_cells_are_not_code() -> None:
    nb = notebook()
    nb.cells.append(nbformat.v4.new_raw_cell("import socket"))
    nb.cells.append(nbformat.v4.new_markdown_cell("`os.system('x')`"))
    assert code_gate(nb, CodeGatePolicy()).findings == []
