"""Follow-up rounds: signed round documents at the hub, at the node, in the client and CLI."""

from __future__ import annotations

import base64
import io
import json
import socket
import tarfile
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
from alembic import command
from alembic.config import Config
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from nbformat.v4 import new_code_cell, new_notebook
from sqlalchemy import create_engine, select, text

from phds_tre.audit import AuditLog
from phds_tre.bundle import StudyBundle, build_bundle
from phds_tre.check import check_notebook
from phds_tre.cli import cli
from phds_tre.client import Hub as Client
from phds_tre.client import HubError
from phds_tre.hub.app import create_app
from phds_tre.hub.auth import create_principal, issue_token
from phds_tre.hub.models import Round, Run, Study
from phds_tre.hub.store import MIGRATIONS, Store
from phds_tre.node import NodeAgent, approve_run, reject_run
from phds_tre.release import build_release, write_release
from phds_tre.release.signing import generate_key, sign_manifest
from phds_tre.rounds import RoundError, build_round, verify_round
from phds_tre.site_policy import ApprovalPolicy, SitePolicy

POLICY = SitePolicy()
PARAMETERS = "min_age: int = 0\nstate: str = ''"


def _b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _notebook(path: Path, *sources: str) -> Path:
    nb = new_notebook(
        cells=[new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]})]
        + [new_code_cell(s) for s in sources],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    nbformat.write(nb, path)
    return path


def _study(tmp: Path, sites: list[str], key: Ed25519PrivateKey, *sources: str) -> StudyBundle:
    nb = _notebook(tmp / f"study-{time.monotonic_ns()}.ipynb", *(sources or ("y = min_age",)))
    fields = {
        "title": "Rounds",
        "researcher": "dr_a",
        "sites": sites,
        "parameters": {"min_age": 1},
        "site_parameters": {sites[-1]: {"min_age": 2}},
    }
    return build_bundle(nb, fields, key)


def _round_body(
    bundle: StudyBundle, number: int, key: Ed25519PrivateKey, **kw: Any
) -> dict[str, Any]:
    nb = nbformat.reads(bundle.notebook.decode("utf-8"), as_version=4)
    return build_round(bundle.manifest, nb, number, key, **kw).to_json()


def _signed(document: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """A round document signed as is (no checks): what a careless or hostile client sends."""
    return {"document": document, "signature": sign_manifest(document, key)}


# -- the hub's API ------------------------------------------------------------------------


@dataclass
class Net:
    client: TestClient
    app: Any
    tmp: Path
    key: Ed25519PrivateKey
    other_key: Ed25519PrivateKey
    researcher: str
    other: str
    nodes: dict[str, str]
    node_keys: dict[str, Ed25519PrivateKey]

    def submit(self, bundle: StudyBundle) -> str:
        r = self.client.post(
            "/studies",
            content=bundle.to_bytes(),
            headers={**_auth(self.researcher), "Content-Type": "application/zip"},
        )
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def round(self, study_id: str, body: dict[str, Any], token: str | None = None) -> Any:
        return self.client.post(
            f"/studies/{study_id}/rounds", json=body, headers=_auth(token or self.researcher)
        )

    def study(self, study_id: str) -> dict[str, Any]:
        r = self.client.get(f"/studies/{study_id}", headers=_auth(self.researcher))
        assert r.status_code == 200, r.text
        found: dict[str, Any] = r.json()
        return found

    def claim(self, site: str) -> dict[str, Any]:
        r = self.client.post("/nodes/next?wait=0", headers=_auth(self.nodes[site]))
        assert r.status_code == 200, r.text
        found: dict[str, Any] = r.json()
        return found

    def last_refusal(self) -> dict[str, Any]:
        entries = AuditLog(self.tmp / "hub" / "audit.sqlite").entries()
        return dict([e for e in entries if e.action == "rejection"][-1].details)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    app = create_app(f"sqlite:///{tmp_path / 'hub.sqlite'}", tmp_path / "hub", poll_interval_s=0.2)
    store = app.state.hub.store
    key, other_key = generate_key(tmp_path / "dr_a.pem"), generate_key(tmp_path / "dr_b.pem")
    create_principal(store, "dr_a", "researcher", None, _b64(key))
    create_principal(store, "dr_b", "researcher", None, _b64(other_key))
    node_keys = {}
    for site in ("site_a", "site_b", "site_c"):
        node_keys[site] = generate_key(tmp_path / f"{site}.pem")
        create_principal(store, f"node_{site}", "node", site, _b64(node_keys[site]))
    tokens = {n: issue_token(store, n, 3600)[0] for n in ("dr_a", "dr_b")}
    nodes = {s: issue_token(store, f"node_{s}", 3600)[0] for s in node_keys}
    with TestClient(app) as client:
        yield Net(
            client, app, tmp_path, key, other_key, tokens["dr_a"], tokens["dr_b"], nodes, node_keys
        )
    store.dispose()


def test_a_round_queues_one_run_per_target_site_and_the_claim_carries_it(net: Net) -> None:
    bundle = _study(net.tmp, ["site_a", "site_b"], net.key)
    sid = net.submit(bundle)
    r = net.round(sid, _round_body(bundle, 2, net.key, parameters={"state": "s2"}))
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["round"] == 2 and out["sites"] == ["site_a", "site_b"]
    assert [(run["site"], run["round"], run["status"]) for run in out["runs"]] == [
        ("site_a", 2, "queued"),
        ("site_b", 2, "queued"),
    ]
    study = net.study(sid)
    assert study["rounds"] == 2 and study["sites"] == ["site_a", "site_b"]
    assert [(run["round"], run["site"]) for run in study["runs"]] == [
        (1, "site_a"),
        (1, "site_b"),
        (2, "site_a"),
        (2, "site_b"),
    ]
    # Round 3 to one site only; the node claims the oldest run first (round 1).
    r = net.round(
        sid, _round_body(bundle, 3, net.key, parameters={"state": "s3"}, sites=["site_b"])
    )
    assert r.status_code == 201, r.text
    first, second, third = (net.claim("site_b") for _ in range(3))
    assert first["round"] == 1 and first["round_document"] is None
    assert first["parameters"] == {"min_age": 2}
    assert second["round"] == 2 and second["parameters"] == {"min_age": 2, "state": "s2"}
    assert third["round"] == 3 and third["parameters"] == {"min_age": 2, "state": "s3"}
    # The node gets the researcher's signed document and checks it itself.
    signed = verify_round(
        {"document": third["round_document"], "signature": third["round_signature"]},
        [net.key.public_key()],
        study_id=sid,
    )
    assert signed.document.parameters == {"state": "s3"}
    assert signed.document.parameters_for(bundle.manifest, "site_b") == third["parameters"]
    r = net.client.post("/nodes/next?wait=0", headers=_auth(net.nodes["site_b"]))
    assert r.status_code == 204
    entry = [e for e in AuditLog(net.tmp / "hub" / "audit.sqlite").entries() if e.subject == sid]
    assert [e.details.get("event") for e in entry][-2:] == ["round_submitted", "round_submitted"]


def _runs(net: Net, sid: str) -> int:
    return len(net.study(sid)["runs"])


def test_a_round_of_another_researchers_study_is_refused(net: Net) -> None:
    bundle = _study(net.tmp, ["site_a"], net.key)
    sid = net.submit(bundle)
    # dr_b signs a round with their own key for dr_a's study.
    body = _round_body(bundle, 2, net.other_key, parameters={"state": "x"})
    r = net.round(sid, body, token=net.other)
    assert r.status_code == 403
    assert r.json()["reason"] == "this study belongs to another researcher"
    r = net.round("0" * 64, body)
    assert r.status_code == 404
    assert _runs(net, sid) == 1


def test_a_round_of_a_cancelled_study_is_refused(net: Net) -> None:
    bundle = _study(net.tmp, ["site_a", "site_b"], net.key)
    sid = net.submit(bundle)
    assert net.client.post(f"/studies/{sid}/cancel", headers=_auth(net.researcher)).is_success
    r = net.round(sid, _round_body(bundle, 2, net.key, parameters={"state": "x"}))
    assert r.status_code == 409
    assert r.json()["reason"] == "the study is cancelled: no further rounds"
    assert net.study(sid)["cancelled"] is True and _runs(net, sid) == 2
    assert net.last_refusal()["status"] == 409


def test_unsigned_tampered_or_foreign_signed_rounds_are_refused(net: Net) -> None:
    bundle = _study(net.tmp, ["site_a"], net.key)
    sid = net.submit(bundle)
    body = _round_body(bundle, 2, net.key, parameters={"state": "honest"})

    unsigned = {"document": body["document"], "signature": {}}
    r = net.round(sid, unsigned)
    assert r.status_code == 400
    assert "algorithm is not Ed25519" in r.json()["reason"]

    tampered = json.loads(json.dumps(body))
    tampered["document"]["parameters"]["state"] = "altered"
    r = net.round(sid, tampered)
    assert r.status_code == 400
    assert "does not match the round document" in r.json()["reason"]

    foreign = _round_body(bundle, 2, net.other_key, parameters={"state": "x"})
    r = net.round(sid, foreign)
    assert r.status_code == 403
    assert r.json()["reason"] == "the round is not signed with your registered key"

    not_a_round = _signed({**body["document"], "schema": "phds.study/1"}, net.key)
    r = net.round(sid, not_a_round)
    assert r.status_code == 400 and "schema" in r.json()["reason"]

    other_study = _signed({**body["document"], "study_id": "ab" * 32}, net.key)
    r = net.round(sid, other_study)
    assert r.status_code == 422
    assert r.json()["reason"] == f"the round document is for study {'ab' * 32}"
    assert _runs(net, sid) == 1


def test_round_parameters_are_checked_against_the_notebook(net: Net) -> None:
    bundle = _study(net.tmp, ["site_a", "site_b"], net.key)
    sid = net.submit(bundle)
    good = _round_body(bundle, 2, net.key, parameters={"state": "x"})["document"]

    unknown = _signed({**good, "parameters": {"stat": "x"}}, net.key)
    r = net.round(sid, unknown)
    assert r.status_code == 422
    assert r.json()["reason"] == "the round's parameters do not fit the notebook"
    assert r.json()["problems"][0].startswith("site site_a: ")
    assert "'stat'" in r.json()["problems"][0]

    wrong_type = _signed(
        {**good, "parameters": {}, "site_parameters": {"site_b": {"min_age": "old"}}}, net.key
    )
    r = net.round(sid, wrong_type)
    assert r.status_code == 422
    (problem,) = r.json()["problems"]
    assert problem.startswith("site site_b: parameter 'min_age'"), problem
    # The client refuses the same before anything is signed or sent.
    nb = nbformat.reads(bundle.notebook.decode("utf-8"), as_version=4)
    with pytest.raises(RoundError, match="stat"):
        build_round(bundle.manifest, nb, 2, net.key, parameters={"stat": "x"})
    with pytest.raises(RoundError, match="min_age"):
        build_round(bundle.manifest, nb, 2, net.key, parameters={"min_age": "old"})
    assert _runs(net, sid) == 2


def test_a_round_for_a_site_outside_the_study_is_refused(net: Net) -> None:
    bundle = _study(net.tmp, ["site_a", "site_b"], net.key)
    sid = net.submit(bundle)
    good = _round_body(bundle, 2, net.key, parameters={"state": "x"})["document"]
    r = net.round(sid, _signed({**good, "sites": ["site_a", "site_c"]}, net.key))
    assert r.status_code == 422
    assert r.json()["reason"] == "not sites of the study: site_c"
    nb = nbformat.reads(bundle.notebook.decode("utf-8"), as_version=4)
    with pytest.raises(RoundError, match="not sites of the study: site_c"):
        build_round(bundle.manifest, nb, 2, net.key, sites=["site_c"])
    assert _runs(net, sid) == 2


def test_duplicate_and_skipped_round_numbers_are_refused(net: Net) -> None:
    bundle = _study(net.tmp, ["site_a"], net.key)
    sid = net.submit(bundle)
    r = net.round(sid, _round_body(bundle, 3, net.key, parameters={"state": "x"}))
    assert r.status_code == 422 and r.json()["reason"] == "the next round is 2, not 3"
    assert net.round(sid, _round_body(bundle, 2, net.key)).status_code == 201
    r = net.round(sid, _round_body(bundle, 2, net.key, parameters={"state": "again"}))
    assert r.status_code == 409
    assert r.json()["reason"] == "round 2 exists already (the latest is 2)"
    # Round 1 is the study itself: a round document cannot be number 1.
    document = _round_body(bundle, 3, net.key)["document"]
    r = net.round(sid, _signed({**document, "round": 1}, net.key))
    assert r.status_code == 400 and "round" in r.json()["reason"]
    with net.app.state.hub.store.session() as session:
        assert session.scalars(select(Round.number).where(Round.study_id == sid)).all() == [2]
    assert _runs(net, sid) == 2


def _release_archive(net: Net, site: str, study_id: str, round_number: int | None) -> bytes:
    nb = new_notebook(cells=[new_code_cell("y = 1", execution_count=1)])
    release = build_release(nb, check_notebook(nb, POLICY.disclosure), POLICY)
    fields: dict[str, Any] = {"study_id": study_id, "site": site, "parameters": {}}
    if round_number is not None:
        fields["round"] = round_number
    folder = write_release(
        net.tmp / f"rel-{time.monotonic_ns()}", release, fields, {}, net.node_keys[site]
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname="release")
    return buffer.getvalue()


def test_a_release_must_name_the_round_of_its_run(net: Net) -> None:
    bundle = _study(net.tmp, ["site_a"], net.key)
    sid = net.submit(bundle)
    assert net.round(sid, _round_body(bundle, 2, net.key)).status_code == 201
    first, second = net.claim("site_a"), net.claim("site_a")
    headers = {**_auth(net.nodes["site_a"]), "Content-Type": "application/gzip"}
    for claim in (first, second):
        for status in ("running", "checking"):
            r = net.client.post(
                f"/runs/{claim['run']['id']}/status",
                json={"status": status},
                headers=_auth(net.nodes["site_a"]),
            )
            assert r.status_code == 200, r.text
    # Round 1's release (no round named: a release from before rounds) replayed for round 2.
    r = net.client.post(
        f"/runs/{second['run']['id']}/release",
        content=_release_archive(net, "site_a", sid, None),
        headers=headers,
    )
    assert r.status_code == 400
    assert r.json()["problems"] == ["manifest round is 1, expected 2"]
    for claim, number in ((first, None), (second, 2)):
        r = net.client.post(
            f"/runs/{claim['run']['id']}/release",
            content=_release_archive(net, "site_a", sid, number),
            headers=headers,
        )
        assert r.status_code == 201, r.text
    assert [run["status"] for run in net.study(sid)["runs"]] == ["released", "released"]


# -- migration ------------------------------------------------------------------------------


def test_a_0001_database_upgrades_with_its_data_intact(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "0001_initial")
    engine = create_engine(url)
    now = "2026-05-04 10:00:00.000000"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO principals (id, name, role, site, public_key, created) "
                "VALUES (1, 'dr_a', 'researcher', NULL, NULL, :t)"
            ),
            {"t": now},
        )
        for sid, status in (("a" * 64, "released"), ("b" * 64, "cancelled")):
            conn.execute(
                text(
                    "INSERT INTO studies (id, researcher_id, title, bundle_sha256, bundle_path, "
                    "manifest_json, created) VALUES (:id, 1, 'old', :h, 'blobs/x.zip', '{}', :t)"
                ),
                {"id": sid, "h": "c" * 64, "t": now},
            )
            conn.execute(
                text(
                    "INSERT INTO runs (id, study_id, site, status, cells_done, cells_total, "
                    "created, updated, claims) VALUES (:r, :s, 'site_a', :st, 3, 3, :t, :t, 1)"
                ),
                {"r": f"run-{sid[0]}", "s": sid, "st": status, "t": now},
            )
            conn.execute(
                text(
                    "INSERT INTO run_events (run_id, at, status, actor, detail) "
                    "VALUES (:r, :t, :st, 'hub', 'kept')"
                ),
                {"r": f"run-{sid[0]}", "t": now, "st": status},
            )
    engine.dispose()
    store = Store(url)  # opening the store upgrades to the head
    with store.session() as session:
        runs = {r.id: r for r in session.scalars(select(Run)).all()}
        assert {(r.id, r.status, r.round, r.cells_done) for r in runs.values()} == {
            ("run-a", "released", 1, 3),
            ("run-b", "cancelled", 1, 3),
        }
        assert [e.detail for e in runs["run-a"].events] == ["kept"]
        studies = {s.id: s for s in session.scalars(select(Study)).all()}
        assert studies["a" * 64].cancelled_at is None
        assert studies["b" * 64].cancelled_at is not None  # its run was cancelled
        assert session.scalars(select(Round)).all() == []
    with store.engine.connect() as conn:
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert version == "0002_rounds"
    store.dispose()
    command.downgrade(config, "0001_initial")  # and back, rounds gone, round-1 data kept
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM runs")).scalar() == 2
    engine.dispose()


# -- the node, over the network ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Live:
    """A hub on loopback (uvicorn in a thread), one researcher, one site's node."""

    url: str
    app: Any
    tmp: Path
    site: str
    site_dir: Path
    key: Ed25519PrivateKey
    key_path: Path
    researcher: str
    node_token: str
    node_key: Path

    def client(self) -> Client:
        return Client(self.url, self.researcher)

    def submit(self, *sources: str) -> tuple[str, StudyBundle]:
        bundle = _study(self.tmp, [self.site], self.key, *sources)
        with self.client() as hub:
            path = self.tmp / f"bundle-{time.monotonic_ns()}.zip"
            path.write_bytes(bundle.to_bytes())
            return str(hub.submit(path)["id"]), bundle

    def runs(self, study_id: str) -> list[dict[str, Any]]:
        with self.client() as hub:
            found: list[dict[str, Any]] = hub.study(study_id)["runs"]
        return found

    def agent(self, work: Path, later_rounds: str = "approve") -> NodeAgent:
        policy = SitePolicy(approval=ApprovalPolicy(later_rounds=later_rounds))  # type: ignore[arg-type]
        return NodeAgent(
            self.url,
            self.node_token,
            self.site,
            self.site_dir,
            policy,
            work,
            self.node_key,
            [self.key.public_key()],
            backoff_base_s=0.1,
            backoff_cap_s=0.5,
        )


@pytest.fixture
def live(tmp_path: Path, synth_sites: Path, phds_home: Path) -> Iterator[Live]:
    site_dir = sorted(p for p in synth_sites.iterdir() if p.is_dir())[0]
    site = site_dir.name
    app = create_app(f"sqlite:///{tmp_path / 'hub.sqlite'}", tmp_path / "hub", poll_interval_s=0.2)
    store = app.state.hub.store
    key_path = tmp_path / "dr_a.pem"
    key = generate_key(key_path)
    node_key = tmp_path / "node.pem"
    create_principal(store, "dr_a", "researcher", None, _b64(key))
    create_principal(store, f"node_{site}", "node", site, _b64(generate_key(node_key)))
    researcher, _ = issue_token(store, "dr_a", 3600)
    node_token, _ = issue_token(store, f"node_{site}", 3600)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline, "the hub did not start"
        time.sleep(0.02)
    yield Live(
        f"http://127.0.0.1:{port}",
        app,
        tmp_path,
        site,
        site_dir,
        key,
        key_path,
        researcher,
        node_token,
        node_key,
    )
    server.should_exit = True
    thread.join(timeout=10)
    store.dispose()


def _manifest(live: Live, study_id: str, out: Path, round_number: int | None) -> dict[str, Any]:
    with live.client() as hub:
        summary = hub.results(study_id, out, round=round_number)
    entry = summary["sites"][live.site]
    assert entry["verified"], entry
    manifest: dict[str, Any] = json.loads((out / entry["path"] / "manifest.json").read_text())
    return manifest


def test_a_later_round_runs_without_approval_when_the_site_allows_it(
    live: Live, tmp_path: Path
) -> None:
    sid, _ = live.submit()
    with live.agent(tmp_path / "node", later_rounds="auto") as agent:
        assert agent.run_once(wait=5) is not None
        with live.client() as hub:
            hub.submit_round(sid, live.key, {"state": "two", "min_age": "5"})
            with pytest.raises(TimeoutError, match=r"round 2 of study \w+ unfinished: \w+ queued"):
                hub.wait(sid, timeout=0.2, interval=0.05)
        assert agent.run_once(wait=5) is not None
        with live.client() as hub:
            study = hub.wait(sid, 2, timeout=30, interval=0.05)
    assert [(r["round"], r["status"]) for r in study["runs"]] == [(1, "released"), (2, "released")]
    second = _manifest(live, sid, tmp_path / "latest", None)
    assert second["round"] == 2
    assert second["parameters"] == {"min_age": 5, "state": "two"}
    first = _manifest(live, sid, tmp_path / "first", 1)
    assert first["round"] == 1 and first["parameters"] == {"min_age": 2}
    events = [
        e.details.get("event") for e in AuditLog(tmp_path / "node" / "audit.sqlite").entries()
    ]
    assert "awaiting_approval" not in events
    with live.client() as hub, pytest.raises(HubError, match="has no round 3"):
        hub.results(sid, tmp_path / "none", round=3)
    token = tmp_path / "token"
    token.write_text(live.researcher)
    token.chmod(0o600)
    env = {"PHDS_HUB_URL": live.url, "PHDS_TOKEN_FILE": str(token)}
    r = CliRunner().invoke(
        cli, ["results", sid, "--out", str(tmp_path / "r1"), "--round", "1"], env=env
    )
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"{live.site}: verified, ") and "(round" not in r.output
    r = CliRunner().invoke(cli, ["results", sid, "--out", str(tmp_path / "r2")], env=env)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].endswith("(round 2)")


def test_a_later_round_waits_for_the_site_admin_by_default(live: Live, tmp_path: Path) -> None:
    work = tmp_path / "node"
    sid, _ = live.submit()
    with live.agent(work) as agent:
        agent.run_once(wait=5)
        with live.client() as hub:
            hub.submit_round(sid, live.key, {"state": "two"})
        run_id = agent.run_once(wait=5)
        assert run_id is not None
        waiting = live.runs(sid)[1]
        assert waiting["status"] == "awaiting_approval"
        assert "round 2: the site approves every later round" in waiting["history"][-1]["detail"]
        assert not (work / "runs" / run_id / "out").exists()  # nothing ran yet
        approve_run(work, run_id, admin="ada")
        assert agent.run_once(wait=0) is None
    assert [r["status"] for r in live.runs(sid)] == ["released", "released"]


def test_auto_later_rounds_still_need_approval_without_a_clean_round_1(
    live: Live, tmp_path: Path
) -> None:
    work = tmp_path / "node"
    gated = "import os\nopen('x.txt', 'w').close()\nos.remove('x.txt')"  # filesystem: approve
    rejected, _ = live.submit(gated + "\n# rejected")
    approved, _ = live.submit(gated)
    with live.agent(work, later_rounds="auto") as agent:
        first = agent.run_once(wait=5)
        second = agent.run_once(wait=5)
        assert first and second
        reject_run(work, first, "not this one", admin="ada")
        approve_run(work, second, admin="ada")
        agent.run_once(wait=0)  # reports the rejection, runs the approved one
        assert [r["status"] for r in live.runs(rejected)] == ["rejected"]
        assert [r["status"] for r in live.runs(approved)] == ["released"]
        with live.client() as hub:
            hub.submit_round(rejected, live.key, {"state": "two"})
            hub.submit_round(approved, live.key, {"state": "two"})
        agent.run_once(wait=5)
        agent.run_once(wait=5)
    # Round 1 never ran here: the later round waits even though the policy says auto.
    later = live.runs(rejected)[1]
    assert later["status"] == "awaiting_approval"
    assert "round 1 of the study did not run at this site" in later["history"][-1]["detail"]
    # Round 1 ran (approved), but the code gate is not clean: the later round waits too.
    later = live.runs(approved)[1]
    assert later["status"] == "awaiting_approval"
    assert "code gate needs_approval" in later["history"][-1]["detail"]


def _alter_round(live: Live, study_id: str, document: dict[str, Any], signature: Any) -> None:
    with live.app.state.hub.store.session() as session:
        stored = session.scalars(select(Round).where(Round.study_id == study_id)).one()
        stored.document_json = json.dumps(document)
        stored.signature_json = json.dumps(signature)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("tampered", "does not match the round document"),
        ("bad_parameter", "round refused: parameters: parameter 'min_age'"),
        ("other_key", "signed with another key than the study"),
        ("not_this_site", "does not name this site"),
    ],
)
def test_the_node_refuses_a_round_the_hub_altered(
    live: Live, tmp_path: Path, change: str, reason: str
) -> None:
    sid, _ = live.submit()
    with live.client() as hub:
        sent = hub.submit_round(sid, live.key, {"state": "two"})
    assert sent["round"] == 2
    with live.app.state.hub.store.session() as session:
        stored = session.scalars(select(Round).where(Round.study_id == sid)).one()
        document, signature = json.loads(stored.document_json), json.loads(stored.signature_json)
    trusted = [live.key.public_key()]
    if change == "tampered":
        document["parameters"]["state"] = "altered by the hub"
    elif change == "bad_parameter":  # validly signed, but the hub's check was bypassed
        document["parameters"]["min_age"] = "old"
        signature = sign_manifest(document, live.key)
    elif change == "other_key":  # a key the site trusts, but not the study's
        other = Ed25519PrivateKey.generate()
        trusted.append(other.public_key())
        signature = sign_manifest(document, other)
    else:
        document["sites"] = ["somewhere_else"]
        signature = sign_manifest(document, live.key)
    _alter_round(live, sid, document, signature)
    agent = live.agent(tmp_path / "node", later_rounds="auto")
    agent.trusted_keys = trusted
    with agent:
        with live.app.state.hub.store.session() as session:  # round 1 is not the point here
            session.get_one(Run, live.runs(sid)[0]["id"]).status = "cancelled"
        assert agent.run_once(wait=5) is not None
        assert agent._pool is None  # nothing ran
    later = live.runs(sid)[1]
    assert later["status"] == "rejected"
    assert reason in later["history"][-1]["detail"], later["history"][-1]
    assert "round_refused" in [
        e.details.get("event") for e in AuditLog(tmp_path / "node" / "audit.sqlite").entries()
    ]


# -- the command line -------------------------------------------------------------------------


def test_phds_round_and_status_show_rounds(live: Live, tmp_path: Path) -> None:
    sid, _ = live.submit()
    token = tmp_path / "token"
    token.write_text(live.researcher)
    token.chmod(0o600)
    env = {
        "PHDS_HUB_URL": live.url,
        "PHDS_TOKEN_FILE": str(token),
        "PHDS_KEY": str(live.key_path),
        "PHDS_HOME": str(tmp_path / "home"),
    }
    runner = CliRunner()
    r = runner.invoke(cli, ["round", sid, "-p", "state", "two", "-p", "min_age", "3"], env=env)
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"round 2 of study {sid}: {live.site}"
    r = runner.invoke(cli, ["round", sid, "-p", "min_age", "old"], env=env)
    assert r.exit_code == 2
    assert r.stderr.startswith("phds: error: round 3: parameters: parameter 'min_age'")
    r = runner.invoke(cli, ["round", sid, "--sites", "site_zz"], env=env)
    assert r.exit_code == 2
    assert r.stderr.strip() == "phds: error: round 3: not sites of the study: site_zz"
    r = runner.invoke(cli, ["status", sid], env=env)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[1].split()[:4] == ["ROUND", "SITE", "STATUS", "CELLS"]
    assert [line.split()[:3] for line in lines[2:]] == [
        ["1", live.site, "queued"],
        ["2", live.site, "queued"],
    ]
    r = runner.invoke(cli, ["watch", sid, "--timeout", "0.2", "--interval", "0.05"], env=env)
    assert r.exit_code == 3  # nothing serves the site: both rounds still queued
    assert r.stdout.splitlines() == [
        f"{live.site} round 1: queued (- cells)",
        f"{live.site} round 2: queued (- cells)",
    ]
    with httpx.Client() as http:
        r = http.get(f"{live.url}/studies/{sid}/bundle", headers=_auth(live.researcher))
    assert r.status_code == 200 and r.content[:2] == b"PK"
