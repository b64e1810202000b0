"""The main job: `phds demo` runs the example study at three synthetic hospitals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from phds_tre.release.verify import verify_release

PHDS = Path(sys.executable).with_name("phds")


@pytest.mark.slow
def test_demo_runs_the_study_at_three_hospitals(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [str(PHDS), "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo finished" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 3
    for name, site in summary.items():
        assert site["status"] in ("released", "awaiting_review"), (name, site)
        assert site["signature_verified"] is True
        assert {"network", "memory", "read_only_data"} <= set(site["controls_held"])
        release = out / "runs" / name / "release"
        assert verify_release(release).ok
        nb = nbformat.read(release / "release.ipynb", as_version=4)
        states = [
            o.metadata.get("phds", {}).get("release")
            for c in nb.cells
            if c.cell_type == "code"
            for o in c.outputs
            if o.output_type in ("display_data", "execute_result")
        ]
        assert "released" in states
    # the small regional hospital holds or withholds more than the large centre
    counts = {n: s["counts"] for n, s in summary.items()}
    large, small = (
        max(counts, key=lambda n: counts[n]["released"]),
        min(counts, key=lambda n: counts[n]["released"]),
    )
    assert counts[large]["released"] > counts[small]["released"]
    # the mortality model is shared where it passed
    assert any(s["shared"] == ["mortality_model"] for s in summary.values())


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
