"""The study notebooks in notebooks/: each runs at every synthetic hospital and in Binder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nbformat
import papermill
import pytest

from phds_tre.run import SiteRun

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
#: Each demo study notebook and the results it shares for combining across hospitals.
STUDIES = {
    "example.ipynb": {"mortality_model"},
    "benchmarking.ipynb": {"sepsis_outcome"},
    "haemophilia_feasibility.ipynb": {"haemophilia_by_age"},
    "sepsis_logistic.ipynb": {"site_model", "glm_round"},
}


def _sites(synth_sites: Path) -> list[Path]:
    return sorted(p for p in synth_sites.iterdir() if p.is_dir())


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_notebook_teaches_and_is_parameterised(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    markdown = [c for c in nb.cells if c.cell_type == "markdown"]
    assert len(markdown) >= 3  # it explains what happens and why outputs are suppressed
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STUDIES))
def test_notebook_runs_at_every_synthetic_hospital(
    name: str, synth_sites: Path, tmp_path: Path, phds_home: Path
) -> None:
    released: set[str] = set()
    share_states: list[str] = []
    for site in _sites(synth_sites):
        out = tmp_path / site.name
        record = SiteRun(
            notebook_path=NOTEBOOKS / name, site_dir=site, out_dir=out, echo=lambda _: None
        ).run()
        # The study itself never fails: what differs between hospitals is what is released.
        assert record["status"] in ("released", "awaiting_review"), (site.name, record["status"])
        assert record["execution"]["status"] == "completed"
        executed = nbformat.read(out / "executed.ipynb", as_version=4)
        errors = [
            o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"
        ]
        assert errors == []
        released |= set((record.get("release") or {}).get("shared", []))
        share_states += [o["release"] for o in record["outputs"] if o["kind"].startswith("share")]
    # Every hospital shares; a share is released, or held for the reviewer (a suppressed
    # table must be confirmed by a person), never something the study did not name.
    assert len(share_states) >= len(_sites(synth_sites)) * len(STUDIES[name])
    assert {"released", "held"} & set(share_states)
    assert released <= STUDIES[name]


@pytest.mark.slow
def test_notebooks_run_in_binder_mode(synth_sites: Path, tmp_path: Path) -> None:
    """Binder: binder/start points data.connect() at a synthetic hospital; a plain kernel runs them."""
    site = _sites(synth_sites)[0]
    env = subprocess.run(
        [str(ROOT / "binder" / "start"), "env"],
        env={**os.environ, "HOME": str(tmp_path), "PHDS_SITE_DIR": str(site)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"PHDS_SITE_DIR={site}" in env and f"PHDS_SITE_NAME={site.name}" in env
    postbuild = (ROOT / "binder" / "postBuild").read_text()
    assert "phds synth --out" in postbuild and os.access(ROOT / "binder" / "postBuild", os.X_OK)
    old = {k: os.environ.get(k) for k in ("PHDS_SITE_DIR", "PHDS_SITE_NAME")}
    os.environ["PHDS_SITE_DIR"], os.environ["PHDS_SITE_NAME"] = str(site), site.name
    try:
        for name in sorted(STUDIES):
            executed = papermill.execute_notebook(
                str(NOTEBOOKS / name),
                str(tmp_path / name),
                kernel_name="python3",
                progress_bar=False,
            )
            errors = [
                o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"
            ]
            assert errors == [], name
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
