"""`phds run`: one study at one site — gate, sandboxed execution, checks, signed release."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from phds_tre.release.verify import verify_release
from phds_tre.run import RunError, SiteRun
from phds_tre.site_policy import SitePolicy

PHDS = Path(sys.executable).with_name("phds")


def _notebook(tmp_path: Path, *sources: str, parameters: str = "min_age = 0") -> Path:
    cells = [
        new_markdown_cell("# study"),
        new_code_cell(parameters, metadata={"tags": ["parameters"]}),
    ]
    cells += [new_code_cell(s) for s in sources]
    nb = new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
    )
    path = tmp_path / "study.ipynb"
    nbformat.write(nb, path)
    return path


STUDY = (
    "from phds_tre import data, sdc\n"
    "site = data.connect()\n"
    "person = site.table('person')\n"
    "person = person[2024 - person.year_of_birth >= min_age]\n"
    "person['sex'] = person.gender_concept_id.map({8507: 'M', 8532: 'F'})\n"
    "person['band'] = (person.year_of_birth >= 2015).map({True: 'born 2015+', False: 'before 2015'})",
    "sdc.crosstab(person.sex, person.band)",
    "print('done')",
)


def _run(tmp_path: Path, site_dir: Path, nb: Path, **kw: object) -> dict:
    run = SiteRun(
        notebook_path=nb, site_dir=site_dir, out_dir=tmp_path / "out", echo=lambda _: None, **kw
    )  # type: ignore[arg-type]
    return run.run()


def test_a_clean_study_runs_and_releases(tmp_path: Path, site_dir: Path, phds_home: Path) -> None:
    nb = _notebook(tmp_path, *STUDY)
    record = _run(tmp_path, site_dir, nb, parameters={"min_age": "1"})
    out = tmp_path / "out"
    assert record["status"] == "released", record
    assert record["parameters"] == {"min_age": 1}
    assert record["code_gate"]["status"] == "clean"
    assert record["execution"]["status"] == "completed"
    assert all(c["held"] for c in record["execution"]["controls"].values()), record["execution"][
        "controls"
    ]
    for name in (
        "executed.ipynb",
        "checked.ipynb",
        "run.json",
        "release/release.ipynb",
        "release/manifest.json",
        "release/results.json",
    ):
        assert (out / name).exists(), name
    assert json.loads((out / "run.json").read_text())["status"] == "released"
    result = verify_release(out / "release")
    assert result.ok, result.problems
    released = (out / "release" / "release.ipynb").read_text()
    assert "evidence" not in released
    manifest = json.loads((out / "release" / "manifest.json").read_text())
    assert manifest["site"] == site_dir.name and manifest["parameters"] == {"min_age": 1}


def test_blocked_code_never_runs(tmp_path: Path, site_dir: Path, phds_home: Path) -> None:
    nb = _notebook(tmp_path, "import socket\nsocket.create_connection(('1.1.1.1', 53))")
    record = _run(tmp_path, site_dir, nb)
    assert record["status"] == "blocked"
    assert record["code_gate"]["status"] == "blocked"
    finding = record["code_gate"]["findings"][0]
    assert finding["category"] == "network" and finding["line"] >= 1
    assert record["execution"] is None
    assert not (tmp_path / "out" / "release").exists()
    assert not (tmp_path / "out" / "executed.ipynb").exists()


def test_findings_that_need_approval_wait_for_it(
    tmp_path: Path, site_dir: Path, phds_home: Path
) -> None:
    nb = _notebook(tmp_path, "%who", "print('hello')")
    record = _run(tmp_path, site_dir, nb)
    assert record["status"] == "awaiting_approval"
    assert not (tmp_path / "out" / "release").exists()
    approved = SiteRun(
        notebook_path=nb,
        site_dir=site_dir,
        out_dir=tmp_path / "out2",
        approved=True,
        echo=lambda _: None,
    ).run()
    assert approved["status"] == "released"


def test_wrong_parameters_are_errors_not_warnings(
    tmp_path: Path, site_dir: Path, phds_home: Path
) -> None:
    nb = _notebook(tmp_path, "print(min_age)")
    with pytest.raises(RunError, match="min_ages"):
        _run(tmp_path, site_dir, nb, parameters={"min_ages": "3"})
    with pytest.raises(RunError, match="min_age"):
        _run(tmp_path, site_dir, nb, parameters={"min_age": "three"})
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["status"] == "error" and "min_age" in record["error"]


def test_a_failing_cell_releases_only_the_error_name(
    tmp_path: Path, site_dir: Path, phds_home: Path
) -> None:
    nb = _notebook(
        tmp_path,
        "from phds_tre import data\nrec = data.connect().table('person').person_source_value.iloc[0]",
        "raise ValueError('record ' + rec)",
    )
    record = _run(tmp_path, site_dir, nb)
    assert record["status"] == "failed"
    release = nbformat.read(tmp_path / "out" / "release" / "release.ipynb", as_version=4)
    errors = [
        o
        for c in release.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "error"
    ]
    assert all(o.evalue == "" and o.traceback == [] for o in errors)
    from phds_tre import data

    first = data.connect(site_dir).table("person").person_source_value.iloc[0]
    assert first not in (tmp_path / "out" / "release" / "release.ipynb").read_text()
    assert first in (tmp_path / "out" / "executed.ipynb").read_text()  # it was there to leak


def test_a_killed_kernel_is_recorded_and_nothing_is_released(
    tmp_path: Path, site_dir: Path, phds_home: Path
) -> None:
    nb = _notebook(tmp_path, "print('before')", "import os\nos._exit(1)")
    record = _run(tmp_path, site_dir, nb, approved=True)
    assert record["status"] in ("killed", "failed"), record
    if record["status"] == "killed":
        assert not (tmp_path / "out" / "release").exists()
        assert record["error"]


def test_an_infinite_loop_times_out(tmp_path: Path, site_dir: Path, phds_home: Path) -> None:
    nb = _notebook(tmp_path, "while True:\n    pass")
    policy = SitePolicy.from_mapping({"limits": {"cell_timeout_s": 3.0}})
    record = _run(tmp_path, site_dir, nb, site_policy=policy)
    assert record["status"] == "timeout"
    assert not (tmp_path / "out" / "release").exists()


def test_malformed_notebook_is_one_clear_line(
    tmp_path: Path, site_dir: Path, phds_home: Path
) -> None:
    bad = tmp_path / "bad.ipynb"
    bad.write_text('{"cells": [}')
    proc = subprocess.run(
        [str(PHDS), "run", str(bad), "--data", str(site_dir), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("phds: error:") and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "o" / "run.json").read_text())["status"] == "error"


def test_cli_run_end_to_end(tmp_path: Path, site_dir: Path, phds_home: Path) -> None:
    nb = _notebook(tmp_path, *STUDY)
    proc = subprocess.run(
        [
            str(PHDS),
            "run",
            str(nb),
            "--data",
            str(site_dir),
            "--out",
            str(tmp_path / "o"),
            "-p",
            "min_age",
            "2",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run released" in proc.stdout
    key = next((phds_home / "keys").glob("*.pem.pub"))
    verify = subprocess.run(
        [str(PHDS), "verify", str(tmp_path / "o" / "release"), "--key", str(key)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_full_disk_is_recorded_and_leaves_no_release(
    tmp_path: Path, site_dir: Path, phds_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import phds_tre.release.manifest as manifest

    real_write_bytes = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:
        if ".release-" in str(self):  # the release being built: the disk fills up mid-way
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    nb = _notebook(tmp_path, *STUDY)
    with pytest.raises(RunError, match="No space left"):
        _run(tmp_path, site_dir, nb)
    monkeypatch.setattr(Path, "write_bytes", real_write_bytes)
    out = tmp_path / "out"
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "error" and "No space left" in record["error"]
    assert not (out / "release").exists()
    assert not list(out.glob(".release-*")), "a half-written release was left behind"
    assert manifest  # the module under test


def test_huge_outputs_are_cut_and_recorded(tmp_path: Path, site_dir: Path, phds_home: Path) -> None:
    nb = _notebook(tmp_path, "print('x' * 5_000_000)", "print('after')")
    record = _run(tmp_path, site_dir, nb)
    assert record["execution"]["status"] == "completed"
    assert record["execution"]["controls"]["output_size"]["held"] is True
    executed = (tmp_path / "out" / "executed.ipynb").stat().st_size
    assert executed < 3_000_000
    assert record["status"] in ("awaiting_review", "released")
