"""``phds check``: exit codes, one-line errors, ``--write`` round trip, ``--format json`` schema.

Fixture notebooks are built here with nbformat (no committed blobs), written
to ``tmp_path``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from click.testing import CliRunner
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from phds_tre.check import read_notebook, stored_verdict
from phds_tre.cli import cli

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgAAAAAgABVKJPXQAAAABJRU5ErkJggg=="
PHDS = Path(sys.executable).with_name("phds")


def _notebook(*outputs: dict[str, Any]) -> nbformat.NotebookNode:
    """A notebook with a markdown cell and one code cell per output."""
    cells = [new_markdown_cell("# Study")]
    for i, output in enumerate(outputs):
        cell = new_code_cell(f"cell_{i}()", execution_count=i + 1)
        cell.outputs = [output]
        cells.append(cell)
    return new_notebook(cells=cells)


def _stream(text: str) -> dict[str, Any]:
    return new_output("stream", name="stdout", text=text)


def _save(tmp_path: Path, nb: nbformat.NotebookNode, name: str = "nb.ipynb") -> Path:
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def _mixed(tmp_path: Path) -> Path:
    """pass, review and fail outputs, plus an error and a figure."""
    nb = _notebook(
        _stream("cohort loaded\n"),
        _stream("n = 1234\n"),
        new_output("execute_result", data={"text/plain": "   n\nA  3\nB  40"}, execution_count=3),
        new_output("error", ename="ValueError", evalue="bad 1234", traceback=["..."]),
        new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"}),
    )
    return _save(tmp_path, nb)


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, ["check", *args])


# ---- exit codes ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "code"),
    [("analysis finished\n", 0), ("analysis finished in 12 s\n", 3), ("A  9\nB  40\n", 4)],
)
def test_exit_status_follows_the_worst_verdict(tmp_path: Path, text: str, code: int) -> None:
    result = _run(str(_save(tmp_path, _notebook(_stream(text)))))
    assert result.exit_code == code, result.output
    assert result.stderr == ""


def test_notebook_without_outputs_passes(tmp_path: Path) -> None:
    result = _run(str(_save(tmp_path, _notebook())))
    assert result.exit_code == 0
    assert "no outputs" in result.stdout


def test_text_report_has_one_line_per_output_and_a_summary(tmp_path: Path) -> None:
    path = _mixed(tmp_path)
    result = _run(str(path))
    assert result.exit_code == 4
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["cell", "out", "output_type", "kind", "status", "reasons"]
    assert len(lines) == 1 + 5 + 1
    assert "PASS" in lines[1] and "REVIEW" in lines[2] and "FAIL" in lines[3]
    assert lines[-1].startswith(
        f"{path}: FAIL — 5 outputs: 2 pass, 2 review, 1 fail (policy sha256:"
    )


def test_policy_file_changes_the_boundary(tmp_path: Path) -> None:
    nb = _save(tmp_path, _notebook(_stream("A  9\nB  40\n")))
    policy = tmp_path / "site.toml"
    policy.write_text("min_count = 9\n")
    assert _run(str(nb)).exit_code == 4
    assert _run(str(nb), "--policy", str(policy)).exit_code == 3


def test_help_documents_the_exit_codes() -> None:
    result = CliRunner().invoke(cli, ["check", "--help"])
    assert result.exit_code == 0
    for line in (
        "0  every output passes",
        "3  the worst verdict is review",
        "4  the worst verdict is fail",
        "2  bad input",
    ):
        assert line in result.output


# ---- bad input: exit 2 and one line -------------------------------------------------
def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    good = _save(tmp_path, _notebook(_stream("ok\n")), "good.ipynb")
    text = good.read_text()
    cases: dict[str, tuple[list[str], str]] = {}

    def file(name: str, content: str) -> str:
        (tmp_path / name).write_text(content)
        return str(tmp_path / name)

    cases["truncated"] = ([file("truncated.ipynb", text[: len(text) // 2])], "not valid JSON")
    cases["not a notebook"] = ([file("obj.ipynb", '{"hello": "world"}')], "not a Jupyter notebook")
    cases["a list"] = ([file("list.ipynb", "[1, 2, 3]")], "not a Jupyter notebook")
    invalid = json.loads(text)
    invalid["cells"][1]["outputs"][0]["output_type"] = "mystery"
    cases["nbformat-invalid"] = (
        [file("invalid.ipynb", json.dumps(invalid))],
        "not a valid nbformat v4 notebook",
    )
    old = json.loads(text)
    old["nbformat"] = 3
    cases["nbformat 3"] = ([file("v3.ipynb", json.dumps(old))], "only version 4")
    duplicate = text.replace('"cells": [', '"cells": [], "cells": [', 1)
    cases["duplicate keys"] = ([file("dup.ipynb", duplicate)], "duplicate JSON key 'cells'")
    cases["binary"] = ([str(tmp_path / "bin.ipynb")], "not UTF-8")
    (tmp_path / "bin.ipynb").write_bytes(b"\xff\xfe\x00garbage")
    cases["missing file"] = ([str(tmp_path / "nope.ipynb")], "cannot read")
    cases["a directory"] = ([str(tmp_path)], "cannot read")
    cases["unknown policy key"] = (
        [str(good), "--policy", file("bad.toml", "min_cont = 5\n")],
        "unknown key 'min_cont'",
    )
    cases["invalid TOML"] = (
        [str(good), "--policy", file("broken.toml", "min_count = \n")],
        "not valid TOML",
    )
    cases["missing policy"] = (
        [str(good), "--policy", str(tmp_path / "none.toml")],
        "cannot read policy",
    )
    cases["unwritable --write"] = (
        [str(good), "--write", str(tmp_path / "no" / "such" / "dir" / "out.ipynb")],
        "cannot write",
    )
    return cases


BAD = [
    "truncated",
    "not a notebook",
    "a list",
    "nbformat-invalid",
    "nbformat 3",
    "duplicate keys",
    "binary",
    "missing file",
    "a directory",
    "unknown policy key",
    "invalid TOML",
    "missing policy",
    "unwritable --write",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    args, expected = _bad_inputs(tmp_path)[case]
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("phds: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_input_through_a_real_process(tmp_path: Path) -> None:
    broken = tmp_path / "broken.ipynb"
    broken.write_text('{"cells": [')
    proc = subprocess.run(
        [str(PHDS), "check", str(broken)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"phds: error: {broken}: not valid JSON")


# ---- --format json ---------------------------------------------------------------------
OUTPUT_KEYS = {
    "cell_index": int,
    "cell_id": (str, type(None)),
    "output_index": int,
    "output_type": str,
    "kind": str,
    "status": str,
    "reasons": list,
    "redact": list,
}


def _assert_schema(doc: dict[str, Any]) -> None:
    assert doc["schema"] == "phds.check/1"
    assert doc["status"] in ("pass", "review", "fail")
    assert doc["policy_hash"].startswith("sha256:") and len(doc["policy_hash"]) == 7 + 64
    assert set(doc["counts"]) == {"pass", "review", "fail"}
    assert isinstance(doc["notebook_reasons"], list)
    for output in doc["outputs"]:
        assert set(output) == set(OUTPUT_KEYS)
        for key, kind in OUTPUT_KEYS.items():
            assert isinstance(output[key], kind), key
        assert output["status"] in ("pass", "review", "fail")
        assert all(isinstance(r, str) and r for r in output["reasons"])


def test_json_report_schema_and_content(tmp_path: Path) -> None:
    path = _mixed(tmp_path)
    result = _run(str(path), "--format", "json")
    assert result.exit_code == 4
    doc = json.loads(result.stdout)
    _assert_schema(doc)
    assert doc["notebook"] == str(path)
    assert doc["status"] == "fail"
    assert doc["counts"] == {"pass": 2, "review": 2, "fail": 1}
    nb = read_notebook(path)
    by_cell = {o["cell_index"]: o for o in doc["outputs"]}
    assert sorted(by_cell) == [1, 2, 3, 4, 5]  # cell 0 is markdown
    assert by_cell[1]["cell_id"] == nb.cells[1].id
    assert [by_cell[i]["status"] for i in range(1, 6)] == [
        "pass",
        "review",
        "fail",
        "pass",
        "review",
    ]
    assert [by_cell[i]["kind"] for i in range(1, 6)] == [
        "stream",
        "stream",
        "text",
        "error",
        "image+text",
    ]
    assert by_cell[4]["redact"] == ["evalue", "traceback"]


def test_json_report_through_a_real_process(tmp_path: Path) -> None:
    path = _mixed(tmp_path)
    proc = subprocess.run(
        [str(PHDS), "check", str(path), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr == ""
    _assert_schema(json.loads(proc.stdout))


# ---- --write -----------------------------------------------------------------------------
def test_write_round_trip(tmp_path: Path) -> None:
    path = _mixed(tmp_path)
    nb = read_notebook(path)
    nb.cells[5].outputs[0].metadata = {"note": "kernel says 7"}
    nbformat.write(nb, path)
    out = tmp_path / "checked.ipynb"
    result = _run(str(path), "--write", str(out), "--format", "json")
    assert result.exit_code == 4
    report = json.loads(result.stdout)

    checked = read_notebook(out)  # valid nbformat v4 (read_notebook validates)
    nbformat.validate(checked)
    assert checked.nbformat == 4
    for entry in report["outputs"]:
        stored = stored_verdict(checked, entry["cell_index"], entry["output_index"])
        assert stored["status"] == entry["status"]
        assert stored["reasons"] == entry["reasons"]
        assert stored["kind"] == entry["kind"]
        assert stored["policy_hash"] == report["policy_hash"]
    # display_data / execute_result carry it in the output's own metadata ...
    figure = checked.cells[5].outputs[0]
    assert figure.metadata["phds"]["verdict"]["status"] == "review"
    assert figure.metadata["note"] == "kernel says 7"  # other metadata untouched
    assert checked.cells[3].outputs[0].metadata["phds"]["verdict"]["status"] == "fail"
    # ... stream and error outputs may not have metadata, so their cell does.
    assert "metadata" not in checked.cells[1].outputs[0]
    assert checked.cells[1].metadata["phds"]["output_verdicts"]["0"]["status"] == "pass"
    error = checked.cells[4].metadata["phds"]["output_verdicts"]["0"]
    assert error["redact"] == ["evalue", "traceback"]
    assert checked.metadata["phds"]["check"]["status"] == "fail"
    # Outputs themselves are unchanged.
    assert checked.cells[4].outputs[0].evalue == "bad 1234"

    # Checking the checked notebook again gives the same verdicts: stored verdicts are not data.
    again = _run(str(out), "--format", "json")
    assert json.loads(again.stdout)["outputs"] == report["outputs"]


def test_write_over_the_input_replaces_stale_verdicts(tmp_path: Path) -> None:
    path = _save(tmp_path, _notebook(_stream("A  9\nB  40\n")))
    assert _run(str(path), "--write", str(path)).exit_code == 4
    first = read_notebook(path)
    assert stored_verdict(first, 1, 0)["status"] == "fail"
    policy = tmp_path / "lenient.toml"
    policy.write_text("min_count = 5\n")
    assert _run(str(path), "--write", str(path), "--policy", str(policy)).exit_code == 3
    second = read_notebook(path)
    assert stored_verdict(second, 1, 0)["status"] == "review"
    assert stored_verdict(second, 1, 0)["policy_hash"] != stored_verdict(first, 1, 0)["policy_hash"]
