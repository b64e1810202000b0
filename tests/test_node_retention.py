"""Retention: executed notebooks of finished runs are deleted after the site's period."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from phds_tre.audit import AuditLog
from phds_tre.node import NodeAgent
from phds_tre.node.retention import purge_executed
from phds_tre.node.state import NodeState
from phds_tre.sdc.policy import PolicyError
from phds_tre.site_policy import SitePolicy

DAY = 86_400.0


def _run(state: NodeState, work: Path, run_id: str, status: str, age_days: float) -> Path:
    """A run in ``status`` whose files were last written ``age_days`` ago."""
    out = work / "runs" / run_id / "out"
    for folder in (out, out.with_name("out.attempt-1")):
        (folder / "work").mkdir(parents=True)
        (folder / "executed.ipynb").write_text("{}")
        (folder / "checked.ipynb").write_text("{}")
        (folder / "work" / "scratch.csv").write_text("person_id\n1\n")
    (out / "run.json").write_text("{}")
    (out / "release").mkdir()
    (out / "release" / "release.ipynb").write_text("{}")
    when = time.time() - age_days * DAY
    for path in sorted(out.parent.rglob("*"), reverse=True):
        os.utime(path, (when, when), follow_symlinks=False)
    state.claim(run_id, "s" * 64, out, {})
    state.move(run_id, "running")
    if status == "awaiting_review":
        state.hold_for_review(run_id, "dr_a", "held")
    elif status == "uploaded":
        state.move(run_id, "releasing")
        state.move(run_id, "uploaded", uploaded=True)
    else:
        state.move(run_id, status)
    return out


def test_old_finished_runs_lose_their_executed_notebooks_only(tmp_path: Path) -> None:
    work = tmp_path / "node"
    state = NodeState(work / "node.sqlite")
    audit = AuditLog(work / "audit.sqlite")
    old = _run(state, work, "old", "failed", age_days=40)
    recent = _run(state, work, "recent", "failed", age_days=5)
    waiting = _run(state, work, "waiting", "awaiting_review", age_days=400)

    purged = purge_executed(state, audit, 30, actor="node:test")

    assert [p.run_id for p in purged] == ["old"]
    assert sorted(purged[0].deleted) == [
        "out.attempt-1/checked.ipynb",
        "out.attempt-1/executed.ipynb",
        "out.attempt-1/work",
        "out/checked.ipynb",
        "out/executed.ipynb",
        "out/work",
    ]
    assert not (old / "executed.ipynb").exists() and not (old / "work").exists()
    assert (old / "run.json").exists() and (old / "release" / "release.ipynb").exists()
    for kept in (recent, waiting):
        assert (kept / "executed.ipynb").exists() and (kept / "work").exists()
    entries = audit.entries()
    assert [(e.action, e.subject, e.details["event"]) for e in entries] == [
        ("run_finished", "old", "executed_purged")
    ]
    assert entries[0].details["retention_days"] == 30
    assert audit.verify().ok
    # Nothing left to purge: no second entry.
    assert purge_executed(state, audit, 30, actor="node:test") == []
    assert len(audit.entries()) == 1


def test_a_symlink_in_the_scratch_folder_is_removed_not_followed(tmp_path: Path) -> None:
    work = tmp_path / "node"
    state = NodeState(work / "node.sqlite")
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    out = _run(state, work, "r", "uploaded", age_days=0)
    link = out / "work" / "link"
    link.symlink_to(outside)
    purge_executed(state, AuditLog(work / "audit.sqlite"), 0, actor="t", now=time.time() + DAY)
    assert not (out / "work").exists() and outside.read_text() == "keep me"


def test_the_agent_purges_at_start_and_then_hourly(tmp_path: Path) -> None:
    work = tmp_path / "node"
    state = NodeState(work / "node.sqlite")
    _run(state, work, "old", "uploaded", age_days=3)
    policy = SitePolicy.from_mapping({"retention": {"executed_days": 2}})
    agent = NodeAgent(
        "http://127.0.0.1:9",  # never contacted
        "token",
        "site",
        tmp_path,
        policy,
        work,
        tmp_path / "key.pem",
        [],
    )
    try:
        agent.purge_if_due()
        assert not (work / "runs" / "old" / "out" / "executed.ipynb").exists()
        second = _run(state, work, "second", "uploaded", age_days=3)
        agent.purge_if_due()  # within the hour: not yet
        assert (second / "executed.ipynb").exists()
        agent._purged_at = time.monotonic() - agent.PURGE_INTERVAL_S - 1
        agent.purge_if_due()
        assert not (second / "executed.ipynb").exists()
    finally:
        agent.close()
    events = [e.details["event"] for e in AuditLog(work / "audit.sqlite").entries()]
    assert events == ["executed_purged", "executed_purged"]


def test_retention_policy_is_read_and_checked() -> None:
    assert SitePolicy().retention.executed_days == 30
    policy = SitePolicy.from_mapping({"retention": {"executed_days": 7}})
    assert policy.retention.executed_days == 7 and policy.hash != SitePolicy().hash
    with pytest.raises(PolicyError, match=r"retention\.executed_days"):
        SitePolicy.from_mapping({"retention": {"executed_days": -1}})
    with pytest.raises(PolicyError, match=r"retention\.keep_forever"):
        SitePolicy.from_mapping({"retention": {"keep_forever": True}})
