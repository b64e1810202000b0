"""A site's whole policy file: disclosure rules plus release, code gate, limits and scan tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from phds_tre.sdc import PolicyError
from phds_tre.site_policy import SitePolicy, load_site_policy

FULL = """
min_count = 5
rounding = "base5"

[release]
auto_release = ["pass", "review"]

[code_gate]
network = "approve"
magic = "allow"

[limits]
cell_timeout_s = 30
memory_mb = 1024

[scan]
identifier_columns = ["person.person_source_value"]
"""


def test_defaults() -> None:
    p = load_site_policy(None)
    assert p.disclosure.min_count == 10
    assert p.release.auto_release == ("pass",)
    assert p.code_gate.action("network") == "block"
    assert p.code_gate.action("filesystem") == "approve"
    assert p.code_gate.action("something-new") == "approve"
    assert p.limits.network == "deny"


def test_full_file(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(FULL)
    p = load_site_policy(path)
    assert p.disclosure.min_count == 5 and p.disclosure.rounding == "base5"
    assert p.release.auto_release == ("pass", "review")
    assert p.code_gate.action("network") == "approve" and p.code_gate.action("magic") == "allow"
    assert p.limits.cell_timeout_s == 30 and p.limits.memory_mb == 1024
    assert p.scan.identifier_columns == ("person.person_source_value",)
    assert p.hash != SitePolicy().hash


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nmemory_mb = 1\n", "limits.memory_mb"),
        ('[code_gate]\nnetwork = "maybe"\n', "code_gate.network"),
        ("[release]\nfoo = 1\n", "release.foo"),
        ('[release]\nauto_release = ["sometimes"]\n', "release.auto_release"),
        ("release = 3\n", r"\[release\] must be a table"),
        ("min_cuont = 3\n", "unknown key 'min_cuont'"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message):
        load_site_policy(path)


def test_phds_check_accepts_a_site_policy_file(tmp_path: Path) -> None:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    nb = new_notebook(
        cells=[new_code_cell("print('done')", outputs=[new_output("stream", text="done\n")])]
    )
    nb_path = tmp_path / "nb.ipynb"
    nbformat.write(nb, nb_path)
    policy = tmp_path / "site.toml"
    policy.write_text(FULL)
    phds = Path(sys.executable).with_name("phds")
    proc = subprocess.run(
        [str(phds), "check", str(nb_path), "--policy", str(policy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
