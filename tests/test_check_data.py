"""`phds check --data SITE_DIR`: data-aware scanning of an executed notebook."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook, new_output

from phds_tre import data

PHDS = Path(sys.executable).with_name("phds")


def _notebook(tmp_path: Path, text: str) -> Path:
    nb = new_notebook(cells=[new_code_cell("...", outputs=[new_output("stream", text=text)])])
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    return path


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PHDS), "check", *args], capture_output=True, text=True, check=False)


def test_an_identifier_of_the_site_fails_only_with_the_site_data(
    tmp_path: Path, site_dir: Path
) -> None:
    record = str(data.connect(site_dir).table("person").person_source_value.iloc[3])
    nb = _notebook(tmp_path, f"see {record.lower().replace('-', ' ')}\n")
    without = _check(str(nb))
    assert without.returncode == 3  # numbers in free text: review
    with_data = _check(str(nb), "--data", str(site_dir))
    assert with_data.returncode == 4, with_data.stdout
    assert "person_source_value" in with_data.stdout
    assert record not in with_data.stdout  # the report never repeats the identifier


def test_missing_site_folder_is_bad_input(tmp_path: Path) -> None:
    nb = _notebook(tmp_path, "hello\n")
    proc = _check(str(nb), "--data", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("phds: error:") and "Traceback" not in proc.stderr
