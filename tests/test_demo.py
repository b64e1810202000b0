"""The main job: `phds demo` runs a federated network of three synthetic hospitals on localhost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from phds_tre.release.verify import verify_release

PHDS = Path(sys.executable).with_name("phds")


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (the demo's folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.mark.slow
def test_demo_runs_the_whole_network_and_writes_a_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [str(PHDS), "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo finished: all released and verified" in proc.stdout
    assert _processes_mentioning(str(out)) == []  # hub, nodes and kernels all stopped

    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True
    studies = summary["studies"]
    assert set(studies) == {
        "example.ipynb",
        "benchmarking.ipynb",
        "haemophilia_feasibility.ipynb",
        "sepsis_logistic.ipynb",
    }
    for name, entry in studies.items():
        if name != "sepsis_logistic.ipynb":  # rounds: checked below
            assert set(entry["runs"].values()) == {"released"}
        assert entry["verified"] and entry["complete"]

    # The federated logistic regression converged through follow-up rounds and equals
    # statsmodels on the pooled rows (the demo holds the synthetic data to show it).
    glm = studies["sepsis_logistic.ipynb"]
    assert glm["equal_to_pooled"] is True
    assert glm["combined"]["pooled_check"]["max_relative_difference"] < 1e-6
    assert len(glm["combined"]["rounds"]) == glm["combined"]["iterations"] + 1
    assert "hospital_c_girona" in glm["withheld"]  # too few deaths: named, not used

    # At least one output was held and decided by the demo reviewer, with a comment.
    # The reviewer worked through each node's review API (phds node serve --review-port).
    decisions = [d for e in studies.values() for d in e["decisions"]]
    assert decisions and all(d["comment"] for d in decisions)
    assert {"approve", "reject"} <= {d["decision"] for d in decisions}
    assert {d["reviewer"] for d in decisions} == {"demo-reviewer"}
    manifest = json.loads(
        (
            out / "results" / "example" / decisions[0]["site"] / "release" / "manifest.json"
        ).read_text()
    )
    assert manifest["review"]["released_by"] == "demo-reviewer"
    assert {d["reviewer"] for d in manifest["decisions"].values()} == {"demo-reviewer"}

    # Every downloaded release verifies against its hospital's key, and an approved
    # output is in the released notebook.
    releases = sorted((out / "results").glob("*/*/release"))
    assert len(releases) == 9  # three studies at three hospitals (rounds are kept apart)
    approved_states = []
    for release in releases:
        assert verify_release(release).ok, release
        nb = nbformat.read(release / "release.ipynb", as_version=4)
        approved_states += [
            o.metadata.get("phds", {}).get("release")
            for c in nb.cells
            if c.cell_type == "code"
            for o in c.outputs
            if o.output_type in ("display_data", "execute_result")
        ]
    assert "released" in approved_states and "withheld" in approved_states

    # The combined results: a funnel plot, a forest plot and pooled intervals.
    assert {
        "benchmarking_funnel.png",
        "mortality_lactate_forest.png",
        "haemophilia_pooled.png",
        "sepsis_glm_forest.png",
    } <= set(summary["figures"])
    for name in (n for n in summary["figures"] if n.endswith(".png")):
        assert (out / "figures" / name).stat().st_size > 1000
    bench = studies["benchmarking.ipynb"]["combined"]
    # The small hospital has fewer than 10 deaths: it is named as withheld, not guessed.
    assert "hospital_c_girona" in bench["withheld"]
    assert len(bench["hospitals"]) == 2
    forest = studies["example.ipynb"]["combined"]["lactate_log_odds_per_mmol"]
    assert forest["ci"][0] < forest["estimate"] < forest["ci"][1]
    assert (out / "report.md").read_text().count("![") >= 2


@pytest.mark.slow
def test_ctrl_c_stops_everything_the_demo_started(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [str(PHDS), "demo", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    logs = out / "network" / "logs"
    deadline = time.monotonic() + 180
    # Wait until every node is serving: the moment the most is running.
    while time.monotonic() < deadline:
        serving = [p for p in logs.glob("node-*.log") if "serving runs" in p.read_text()]
        if len(serving) == 3:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the demo's nodes did not start")
    assert len(_processes_mentioning(str(out))) >= 4  # the hub and three nodes at least
    proc.send_signal(signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "every process it started has been stopped" in stderr
    assert "Traceback" not in stderr
    assert _processes_mentioning(str(out)) == []


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
    assert not (tmp_path / "o").exists()  # nothing started, nothing written
