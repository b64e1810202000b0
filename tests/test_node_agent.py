"""The hospital node against a real hub on loopback: claim, verify, run, release, resume."""

from __future__ import annotations

import base64
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nbformat.v4 import new_code_cell, new_notebook

from phds_tre.audit import AuditLog
from phds_tre.bundle import build_bundle
from phds_tre.hub.app import create_app
from phds_tre.hub.auth import create_principal, issue_token
from phds_tre.node import NodeAgent, NodeState, approve_run
from phds_tre.release.signing import generate_key
from phds_tre.site_policy import SitePolicy

STUDY = (
    "from phds_tre import data, sdc\n"
    "person = data.connect().table('person')\n"
    "person = person[2024 - person.year_of_birth >= min_age]\n"
    "person['sex'] = person.gender_concept_id.map({8507: 'M', 8532: 'F'})\n"
    "person['band'] = (person.year_of_birth >= 2015).map({True: 'new', False: 'old'})",
    "sdc.crosstab(person.sex, person.band)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from phds_tre.data.synth import generate

    root = tmp_path_factory.mktemp("node-synth")
    generate(root, sites=1, persons=300)
    return next(p for p in root.iterdir() if p.is_dir())


@dataclass
class Hub:
    """A hub served by uvicorn on loopback, with a researcher and this site's node."""

    url: str
    port: int
    app: Any
    tmp: Path
    site: str
    researcher: str
    researcher_key: Ed25519PrivateKey
    node_token: str
    node_key: Path
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline, "the hub did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)

    def submit(self, *sources: str, key: Ed25519PrivateKey | None = None) -> str:
        nb = new_notebook(
            cells=[new_code_cell("min_age = 0", metadata={"tags": ["parameters"]})]
            + [new_code_cell(s) for s in sources],
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
        )
        path = self.tmp / f"study-{time.monotonic_ns()}.ipynb"
        nbformat.write(nb, path)
        fields = {
            "title": f"T {path.name}",
            "researcher": "dr_a",
            "sites": [self.site],
            "parameters": {"min_age": "1"},
        }
        data = build_bundle(path, fields, key or self.researcher_key).to_bytes()
        r = httpx.post(
            f"{self.url}/studies",
            content=data,
            headers={
                "Authorization": f"Bearer {self.researcher}",
                "Content-Type": "application/zip",
            },
        )
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def run(self, study_id: str) -> dict[str, Any]:
        r = httpx.get(
            f"{self.url}/studies/{study_id}", headers={"Authorization": f"Bearer {self.researcher}"}
        )
        assert r.status_code == 200, r.text
        run: dict[str, Any] = r.json()["runs"][0]
        return run

    def agent(self, work: Path, **kw: Any) -> NodeAgent:
        kw.setdefault("trusted_researcher_keys", [self.researcher_key.public_key()])
        return NodeAgent(
            hub_url=self.url,
            token=self.node_token,
            site=self.site,
            data_dir=kw.pop("data_dir"),
            site_policy=SitePolicy(),
            work_dir=work,
            key_path=self.node_key,
            backoff_base_s=0.1,
            backoff_cap_s=0.5,
            **kw,
        )


def _make_hub(tmp: Path, site: str) -> Hub:
    port = _free_port()
    app = create_app(f"sqlite:///{tmp / 'hub.sqlite'}", tmp / "hub", poll_interval_s=0.2)
    store = app.state.hub.store
    rkey = generate_key(tmp / "researcher.pem")
    node_key = tmp / "node.pem"
    nkey = generate_key(node_key)
    create_principal(store, "dr_a", "researcher", None, _b64(rkey))
    create_principal(store, f"node_{site}", "node", site, _b64(nkey))
    researcher, _ = issue_token(store, "dr_a", 3600)
    node, _ = issue_token(store, f"node_{site}", 3600)
    return Hub(f"http://127.0.0.1:{port}", port, app, tmp, site, researcher, rkey, node, node_key)


@pytest.fixture
def hub(tmp_path: Path, site_dir: Path) -> Iterator[Hub]:
    h = _make_hub(tmp_path, site_dir.name)
    h.start()
    yield h
    h.stop()
    h.app.state.hub.store.dispose()


def _audit_events(work: Path) -> list[str]:
    return [str(e.details.get("event")) for e in AuditLog(work / "audit.sqlite").entries()]


def test_a_queued_run_is_run_and_released(hub: Hub, site_dir: Path, tmp_path: Path) -> None:
    study = hub.submit(*STUDY)
    with hub.agent(tmp_path / "node", data_dir=site_dir) as agent:
        run_id = agent.run_once(wait=2)
    assert run_id is not None
    run = hub.run(study)
    assert run["status"] == "released", run["history"]
    seen = [e["status"] for e in run["history"]]
    assert "running" in seen and "checking" in seen
    assert run["cells_total"] >= 3 and run["cells_done"] == run["cells_total"]
    r = httpx.get(
        f"{hub.url}/runs/{run_id}/release", headers={"Authorization": f"Bearer {hub.researcher}"}
    )
    assert r.status_code == 200 and r.content[:2] == b"PK"
    local = NodeState(tmp_path / "node" / "node.sqlite").get(run_id)
    assert local is not None and local.status == "uploaded" and local.attempts == 1
    assert (local.out_dir / "executed.ipynb").exists()  # kept at the site
    events = _audit_events(tmp_path / "node")
    for event in ("run_claimed", "bundle_verified", "execution_started", "release_uploaded"):
        assert event in events
    assert AuditLog(tmp_path / "node" / "audit.sqlite").verify().ok


def test_untrusted_researcher_key_is_rejected(hub: Hub, site_dir: Path, tmp_path: Path) -> None:
    study = hub.submit("print(1)")
    other = Ed25519PrivateKey.generate()
    with hub.agent(
        tmp_path / "node", data_dir=site_dir, trusted_researcher_keys=[other.public_key()]
    ) as agent:
        assert agent.run_once(wait=2) is not None
        assert agent._pool is None  # nothing was executed
    run = hub.run(study)
    assert run["status"] == "rejected"
    assert "not a trusted key" in run["history"][-1]["detail"], run["history"][-1]
    assert "bundle_refused" in _audit_events(tmp_path / "node")


def test_blocked_notebook_is_rejected_with_the_finding(
    hub: Hub, site_dir: Path, tmp_path: Path
) -> None:
    study = hub.submit("import socket")
    with hub.agent(tmp_path / "node", data_dir=site_dir) as agent:
        run_id = agent.run_once(wait=2)
    run = hub.run(study)
    assert run["status"] == "rejected"
    detail = run["history"][-1]["detail"]
    assert "code gate blocked" in detail and "network" in detail, detail
    local = NodeState(tmp_path / "node" / "node.sqlite").get(str(run_id))
    assert local is not None and local.status == "rejected" and local.reported


def test_hub_away_at_start_backs_off_then_works(
    tmp_path: Path, site_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = _make_hub(tmp_path, site_dir.name)
    agent = h.agent(tmp_path / "node", data_dir=site_dir)
    got: list[str | None] = []
    caplog.set_level(logging.WARNING, logger="phds_tre.node")
    worker = threading.Thread(target=lambda: got.append(agent.run_once(wait=5)), daemon=True)
    worker.start()
    try:
        time.sleep(1.0)
        assert worker.is_alive() and not got
        h.start()
        study = h.submit("import socket")
        worker.join(timeout=20)
        assert got and got[0] is not None
        assert h.run(study)["status"] == "rejected"
    finally:
        agent.close()
        worker.join(timeout=5)
        h.stop()
        h.app.state.hub.store.dispose()
    retries = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(retries) >= 2


def _set_local(work: Path, run_id: str, status: str) -> None:
    with sqlite3.connect(work / "node.sqlite") as db:
        db.execute("UPDATE runs SET status = ? WHERE run_id = ?", (status, run_id))


def test_crash_resume_reruns_once_and_releases_once(
    hub: Hub, site_dir: Path, tmp_path: Path
) -> None:
    work = tmp_path / "node"
    study = hub.submit(*STUDY)
    # A node that crashed right after claiming: the claim is recorded, nothing ran.
    with hub.agent(work, data_dir=site_dir) as crashed:
        claim = crashed._claim(2)
        assert claim is not None
        run_id = claim["run"]["id"]
        crashed.state.claim(run_id, study, work / "runs" / run_id / "out", {})
    with hub.agent(work, data_dir=site_dir) as agent:
        assert agent.run_once(wait=0) is None  # resumed, nothing new queued
    local = NodeState(work / "node.sqlite").get(run_id)
    assert local is not None and local.status == "uploaded" and local.attempts == 1
    assert hub.run(study)["status"] == "released"

    # Crashed after the upload but before recording it: re-run once; the hub's 409 is "done".
    _set_local(work, run_id, "running")
    with hub.agent(work, data_dir=site_dir) as agent:
        agent.run_once(wait=0)
    local = NodeState(work / "node.sqlite").get(run_id)
    assert local is not None and local.status == "uploaded" and local.attempts == 2
    assert "release_already_uploaded" in _audit_events(work)
    history = [e["status"] for e in hub.run(study)["history"]]
    assert history.count("released") == 1

    # Interrupted again: attempts are used up, so it is marked failed, not run a third time.
    _set_local(work, run_id, "running")
    with hub.agent(work, data_dir=site_dir) as agent:
        agent.run_once(wait=0)
        assert agent._pool is None
    local = NodeState(work / "node.sqlite").get(run_id)
    assert local is not None and local.status == "failed" and local.attempts == 2
    assert hub.run(study)["status"] == "released"


def test_needs_approval_waits_then_runs_when_approved(
    hub: Hub, site_dir: Path, tmp_path: Path
) -> None:
    work = tmp_path / "node"
    study = hub.submit("import os\nopen('x.txt', 'w').close()\nos.remove('x.txt')")
    with hub.agent(work, data_dir=site_dir) as agent:
        run_id = agent.run_once(wait=2)
        assert run_id is not None
        assert hub.run(study)["status"] == "awaiting_approval"
        approve_run(work, run_id)
        assert agent.run_once(wait=0) is None
    run = hub.run(study)
    assert run["status"] == "released", run["history"]
    assert "approval" in [e.action for e in AuditLog(work / "audit.sqlite").entries()]
