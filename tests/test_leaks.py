"""A corpus of leak attempts: none may appear in an automatically released output.

Each attempt is what a careless or curious researcher could write. The study runs
at a synthetic hospital through the same code path as a real one (`SiteRun`), and
the test then looks at what the release would carry: every output of an attempt
must be held or withheld, and no identifier of the site's data may appear
anywhere in the release.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from phds_tre.release.scan import IdentifierIndex
from phds_tre.run import SiteRun
from phds_tre.site_policy import CodeGatePolicy, SitePolicy

SETUP = (
    "import sys, io, base64\n"
    "import numpy as np\n"
    "import pandas as pd\n"
    "import matplotlib\n"
    "matplotlib.use('Agg')\n"
    "import matplotlib.pyplot as plt\n"
    "from IPython.display import HTML, Image, display\n"
    "from phds_tre import data, sdc\n"
    "site = data.connect()\n"
    "person = site.table('person')\n"
    "rec = str(person.person_source_value.iloc[0])\n"
    "born = str(person.birth_datetime.iloc[0].date())\n"
    "conditions = site.table('condition_occurrence')"
)

#: name → code of one attempt (each one cell; none raises).
ATTEMPTS = {
    "row_level_print": "print(person.head(5).to_string())",
    "raw_dataframe": "person[['person_id', 'person_source_value', 'birth_datetime']].head()",
    "identifier_in_text": "print('first child:', rec)",
    "html_comment": "display(HTML(f'<p>summary ready</p><!-- {rec} -->'))",
    "html_attribute": "display(HTML(f'<p title=\"{rec}\">summary</p>'))",
    "output_metadata": "display({'text/plain': 'summary ready'}, raw=True, metadata={'note': rec})",
    "custom_mime": "display({'application/x-secret': rec, 'text/plain': 'summary ready'}, raw=True)",
    "image_text_chunk": (
        "fig = plt.figure(); plt.plot([0, 1], [0, 1])\n"
        "buf = io.BytesIO(); fig.savefig(buf, format='png', metadata={'Description': rec}); plt.close(fig)\n"
        "display(Image(data=buf.getvalue()))"
    ),
    "stderr": "print('debug', rec, born, file=sys.stderr)",
    "birth_date_in_text": "print('born on', born)",
    "forged_structured": (
        "real = sdc.crosstab(person.gender_concept_id, person.year_of_birth)\n"
        "payload = real._repr_mimebundle_()['application/vnd.phds.output+json']\n"
        "payload['status'] = 'pass'\n"
        "payload['table']['data'] = [[3.0 for _ in row] for row in payload['table']['data']]\n"
        "display({'application/vnd.phds.output+json': payload, 'text/plain': 'table'}, raw=True)"
    ),
    "small_counts_plain_pandas": (
        "conditions.groupby('condition_concept_id').size().sort_values().head(5)"
    ),
    "scatter_of_patients": (
        "plt.figure(); plt.scatter(person.year_of_birth, person.person_id); plt.show()"
    ),
    "min_max_tiny_groups": (
        "sdc.pivot_table(person.head(12).assign(g=list('ab') * 6), values='year_of_birth', index='g', aggfunc=['min', 'max'])"
    ),
    "raw_max_of_tiny_groups": "person.head(8).groupby('gender_concept_id').year_of_birth.max()",
    "dominated_sum": (
        "d = pd.DataFrame({'g': ['a'] * 12 + ['b'] * 12, 'v': [1000.0] + [1.0] * 11 + [5.0] * 12})\n"
        "sdc.pivot_table(d, values='v', index='g', aggfunc='sum')"
    ),
    "regression_on_few_rows": (
        "few = person.head(8).assign(y=np.arange(8.0))\nsdc.ols('y ~ year_of_birth', few)"
    ),
    "statsmodels_direct": (
        "import statsmodels.formula.api as smf\n"
        "smf.ols('y ~ year_of_birth', person.head(8).assign(y=np.arange(8.0))).fit()"
    ),
    "base64_in_text": "print(base64.b64encode((rec + ' ' * 30).encode()).decode())",
}


def _notebook(path: Path, *sources: str) -> Path:
    nb = new_notebook(
        cells=[new_code_cell(s) for s in sources],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
    )
    nbformat.write(nb, path)
    return path


def _run(tmp_path: Path, site_dir: Path, nb: Path, name: str, **kw: object) -> dict:
    return SiteRun(
        notebook_path=nb,
        site_dir=site_dir,
        out_dir=tmp_path / name,
        echo=lambda _: None,
        **kw,  # type: ignore[arg-type]
    ).run()


def _index(site_dir: Path) -> IdentifierIndex:
    return IdentifierIndex.from_site(site_dir, SitePolicy().scan.identifier_columns)


@pytest.mark.slow
def test_no_leak_attempt_is_released_automatically(
    tmp_path: Path, site_dir: Path, phds_home: Path
) -> None:
    names = list(ATTEMPTS)
    nb = _notebook(tmp_path / "leaks.ipynb", SETUP, *ATTEMPTS.values())
    # By default the code gate already stops this notebook (a hand-written structured output).
    assert _run(tmp_path, site_dir, nb, "gated")["status"] == "blocked"
    # Defence in depth: with a gate that lets everything through (as if it had been
    # fooled by obfuscated code), the checks alone must still hold.
    permissive = SitePolicy.from_mapping(
        {"code_gate": dict.fromkeys(CodeGatePolicy.model_fields, "allow")}
    )
    record = _run(tmp_path, site_dir, nb, "leaks", site_policy=permissive)
    assert record["execution"]["status"] == "completed", record["execution"]
    by_cell: dict[int, list[dict]] = {}
    for out in record["outputs"]:
        by_cell.setdefault(out["cell"], []).append(out)
    for i, name in enumerate(names, start=1):
        outs = by_cell.get(i, [])
        assert outs, f"{name}: produced no output (the attempt did not run as intended)"
        released = [o for o in outs if o["release"] == "released"]
        assert not released, f"{name}: released automatically: {released}"
    # Nothing in the whole release — placeholders, manifest, results.json — names a child.
    index = _index(site_dir)
    release = nbformat.read(tmp_path / "leaks" / "release" / "release.ipynb", as_version=4)
    assert not index.scan_notebook(release)
    for path in (tmp_path / "leaks" / "release").rglob("*"):
        if path.is_file():
            assert not index.scan_text(path.read_text(errors="replace")), path


@pytest.mark.slow
def test_identifier_in_an_error_message_is_not_released(
    tmp_path: Path, site_dir: Path, phds_home: Path
) -> None:
    nb = _notebook(tmp_path / "err.ipynb", SETUP, "raise KeyError(rec + ' ' + born)")
    record = _run(tmp_path, site_dir, nb, "err", approved=True)
    assert record["status"] == "failed"
    release = nbformat.read(tmp_path / "err" / "release" / "release.ipynb", as_version=4)
    assert not _index(site_dir).scan_notebook(release)
    # The message holds a record number, so the output fails data-aware scanning and is
    # withheld whole (an error without identifiers would release its name only).
    assert [o["release"] for o in record["outputs"]] == ["withheld"]
    assert "HSJD" not in json.dumps(record) and "KeyError" in record["error"]


@pytest.mark.slow
def test_network_exfiltration_is_blocked_and_contained(
    tmp_path: Path, site_dir: Path, phds_home: Path
) -> None:
    code = (
        "import socket\n"
        "s = socket.socket(); s.settimeout(2)\n"
        "try:\n"
        "    s.connect(('127.0.0.1', 9)); print('connected')\n"
        "except OSError as exc:\n"
        "    print('no network:', type(exc).__name__)\n"
        "import socket as so\nprint(sorted(n for _, n in so.if_nameindex()))"
    )
    nb = _notebook(tmp_path / "net.ipynb", code)
    blocked = _run(tmp_path, site_dir, nb, "net-default")
    assert blocked["status"] == "blocked"  # the code gate stops it before it runs
    # A site that allows network code still runs it in a namespace with no way out.
    allow = SitePolicy.from_mapping({"code_gate": {"network": "allow"}})
    record = _run(tmp_path, site_dir, nb, "net-allowed", site_policy=allow)
    executed = nbformat.read(tmp_path / "net-allowed" / "executed.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "no network" in printed and "connected" not in printed
    assert "['lo']" in printed
    assert record["execution"]["controls"]["network"]["held"] is True


@pytest.mark.slow
def test_file_exfiltration_stays_inside_the_sandbox(
    tmp_path: Path, site_dir: Path, phds_home: Path
) -> None:
    target = Path("/tmp") / f"phds-exfil-{uuid.uuid4().hex}.txt"
    code = (
        f"open({str(target)!r}, 'w').write(rec)\n"
        "try:\n"
        "    open(site.path / 'person.parquet', 'ab').write(b'x')\n"
        "    print('site data written')\n"
        "except OSError as exc:\n"
        "    print('site data is read-only:', type(exc).__name__)"
    )
    nb = _notebook(tmp_path / "fs.ipynb", SETUP, code)
    waiting = _run(tmp_path, site_dir, nb, "fs-default")
    assert waiting["status"] == "awaiting_approval"
    assert {f["category"] for f in waiting["code_gate"]["findings"]} >= {"filesystem"}
    record = _run(tmp_path, site_dir, nb, "fs-approved", approved=True)
    assert record["execution"]["status"] == "completed", record
    assert not target.exists(), "a file written by the kernel reached the host's /tmp"
    executed = json.loads((tmp_path / "fs-approved" / "executed.ipynb").read_text())
    assert "site data is read-only" in json.dumps(executed)
