"""The hub's REST API: the whole flow, and every refusal with its reason and audit entry."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from nbformat.v4 import new_code_cell, new_notebook, new_output
from sqlalchemy import MetaData

from phds_tre.audit import AuditLog
from phds_tre.bundle import StudyBundle, StudyManifest, build_bundle, verify_bundle
from phds_tre.check import check_notebook
from phds_tre.hub.app import create_app
from phds_tre.hub.auth import create_principal, issue_token
from phds_tre.release import build_release, write_release
from phds_tre.release.signing import generate_key, sign_manifest
from phds_tre.site_policy import SitePolicy

POLICY = SitePolicy()


def _b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Net:
    """A hub with an admin, a researcher and two site nodes, each with a token and key."""

    client: TestClient
    tmp: Path
    data: Path
    db_url: str
    admin: str
    researcher: str
    researcher_key: Ed25519PrivateKey
    nodes: dict[str, str]
    node_keys: dict[str, Ed25519PrivateKey]

    def audit(self) -> list[Any]:
        return AuditLog(self.data / "audit.sqlite").entries()

    def last_refusal(self) -> dict[str, Any]:
        entry = [e for e in self.audit() if e.action == "rejection"][-1]
        return dict(entry.details)


@pytest.fixture
def net(tmp_path: Path, hub_db_url: str) -> Iterator[Net]:
    data = tmp_path / "hub"
    app = create_app(hub_db_url, data, poll_interval_s=0.2, max_study_bytes=200_000)
    store = app.state.hub.store
    create_principal(store, "root", "admin")
    admin, _ = issue_token(store, "root", 3600)
    with TestClient(app) as client:
        rkey = generate_key(tmp_path / "researcher.pem")
        r = client.post(
            "/admin/principals",
            json={"name": "dr_a", "role": "researcher", "public_key": _b64(rkey)},
            headers=_auth(admin),
        )
        assert r.status_code == 201, r.text
        nodes: dict[str, str] = {}
        node_keys: dict[str, Ed25519PrivateKey] = {}
        for site in ("site_a", "site_b"):
            node_keys[site] = generate_key(tmp_path / f"{site}.pem")
            body = {"name": f"node_{site}", "role": "node", "site": site}
            body["public_key"] = _b64(node_keys[site])
            assert (
                client.post("/admin/principals", json=body, headers=_auth(admin)).status_code == 201
            )
        tokens = {}
        for name in ("dr_a", "node_site_a", "node_site_b"):
            r = client.post("/admin/tokens", json={"principal": name}, headers=_auth(admin))
            assert r.status_code == 201, r.text
            tokens[name] = r.json()["token"]
        nodes = {"site_a": tokens["node_site_a"], "site_b": tokens["node_site_b"]}
        yield Net(client, tmp_path, data, hub_db_url, admin, tokens["dr_a"], rkey, nodes, node_keys)
    app.state.hub.store.dispose()


def _notebook(path: Path) -> Path:
    nb = new_notebook(
        cells=[
            new_code_cell("min_age: int = 0", metadata={"tags": ["parameters"]}),
            new_code_cell("print('done')"),
        ]
    )
    nbformat.write(nb, path)
    return path


def _bundle(
    net: Net, sites: list[str], key: Ed25519PrivateKey | None = None, title: str = "T"
) -> bytes:
    nb = _notebook(net.tmp / "study.ipynb")
    fields = {
        "title": title,
        "researcher": "dr_a",
        "sites": sites,
        "parameters": {"min_age": "2"},
        "site_parameters": {"site_b": {"min_age": "5"}} if "site_b" in sites else {},
        "created": "2026-05-04T10:00:00Z",
    }
    return build_bundle(nb, fields, key or net.researcher_key).to_bytes()


def _parts(data: bytes) -> tuple[bytes, StudyManifest, dict[str, Any]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        manifest = StudyManifest.model_validate(json.loads(archive.read("manifest.json")))
        return archive.read("notebook.ipynb"), manifest, json.loads(archive.read("signature.json"))


def _submit(net: Net, data: bytes, token: str | None = None) -> Any:
    return net.client.post(
        "/studies",
        content=data,
        headers={**_auth(token or net.researcher), "Content-Type": "application/zip"},
    )


def _release_archive(
    net: Net, site: str, study_id: str, *, fmt: str = "tar.gz", key: Ed25519PrivateKey | None = None
) -> bytes:
    nb = new_notebook(
        cells=[
            new_code_cell(
                "print('done')",
                execution_count=1,
                outputs=[new_output("stream", name="stdout", text="done\n")],
            )
        ]
    )
    report = check_notebook(nb, POLICY.disclosure)
    release = build_release(nb, report, POLICY)
    out = net.tmp / f"rel-{site}-{fmt}-{time.monotonic_ns()}"
    fields = {"study_id": study_id, "site": site, "parameters": {}, "policy_hash": POLICY.hash}
    folder = write_release(out, release, fields, {}, key or net.node_keys[site])
    buffer = io.BytesIO()
    if fmt == "zip":
        with zipfile.ZipFile(buffer, "w") as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, f"release/{path.relative_to(folder).as_posix()}")
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            archive.add(folder, arcname="release")
    return buffer.getvalue()


def _claim(net: Net, site: str, wait: int = 0) -> Any:
    return net.client.post(f"/nodes/next?wait={wait}", headers=_auth(net.nodes[site]))


def _status(net: Net, site: str, run_id: str, **body: Any) -> Any:
    return net.client.post(f"/runs/{run_id}/status", json=body, headers=_auth(net.nodes[site]))


def _upload(net: Net, site: str, run_id: str, data: bytes, media: str = "application/gzip") -> Any:
    return net.client.post(
        f"/runs/{run_id}/release",
        content=data,
        headers={**_auth(net.nodes[site]), "Content-Type": media},
    )


# -- the whole flow ---------------------------------------------------------------------


def test_whole_flow(net: Net) -> None:
    data = _bundle(net, ["site_a", "site_b"])
    r = _submit(net, data)
    assert r.status_code == 201, r.text
    study = r.json()
    study_id = study["id"]
    assert {run["site"]: run["status"] for run in study["runs"]} == {
        "site_a": "queued",
        "site_b": "queued",
    }
    assert [e["status"] for e in study["runs"][0]["history"]] == ["submitted", "queued"]
    # Idempotent for the same researcher.
    again = _submit(net, data)
    assert again.status_code == 200 and again.json()["id"] == study_id

    claimed: dict[str, dict[str, Any]] = {}
    for site, min_age in (("site_a", 2), ("site_b", 5)):
        r = _claim(net, site)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["run"]["site"] == site and got["study_id"] == study_id
        assert got["parameters"] == {"min_age": min_age}
        bundle = net.client.get(got["bundle_url"], headers=_auth(net.nodes[site]))
        assert bundle.status_code == 200 and bundle.content.startswith(b"PK")
        claimed[site] = got["run"]
    # Each site's only run is taken: nothing more for either.
    assert _claim(net, "site_a").status_code == 204

    run_a = claimed["site_a"]["id"]
    assert _status(net, "site_a", run_a, status="running", cells_total=2).status_code == 200
    r = _status(net, "site_a", run_a, status="running", cells_done=1)
    assert r.status_code == 200 and (r.json()["cells_done"], r.json()["cells_total"]) == (1, 2)
    assert _status(net, "site_a", run_a, status="checking", cells_done=2).status_code == 200
    assert _status(net, "site_a", run_a, status="awaiting_review").status_code == 200

    archive = _release_archive(net, "site_a", study_id)
    r = _upload(net, "site_a", run_a, archive)
    assert r.status_code == 201, r.text
    assert r.json()["files"] > 0
    # Nothing is released twice.
    assert _upload(net, "site_a", run_a, archive).status_code == 409
    assert "twice" in net.last_refusal()["reason"]

    # Site b fails; the researcher sees both outcomes with full histories.
    run_b = claimed["site_b"]["id"]
    assert _status(net, "site_b", run_b, status="running").status_code == 200
    assert _status(net, "site_b", run_b, status="failed", detail="kernel died").status_code == 200
    view = net.client.get(f"/studies/{study_id}", headers=_auth(net.researcher)).json()
    runs = {run["site"]: run for run in view["runs"]}
    assert runs["site_a"]["status"] == "released" and runs["site_a"]["released"]
    assert [e["status"] for e in runs["site_a"]["history"]] == [
        "submitted",
        "queued",
        "queued",
        "running",
        "checking",
        "awaiting_review",
        "released",
    ]
    assert runs["site_b"]["status"] == "failed"

    download = net.client.get(f"/runs/{run_a}/release", headers=_auth(net.researcher))
    assert download.status_code == 200 and download.content == archive
    assert (
        net.client.get(f"/runs/{run_b}/release", headers=_auth(net.researcher)).status_code == 409
    )

    listed = net.client.get("/studies", headers=_auth(net.researcher)).json()
    assert [s["id"] for s in listed] == [study_id]
    verified = net.client.get("/admin/audit/verify", headers=_auth(net.admin)).json()
    assert verified["ok"] and verified["count"] > 10
    actions = {e.details.get("event") for e in net.audit()}
    assert {"study_submitted", "run_claimed", "run_status", "release_stored"} <= actions
    assert {"release_downloaded", "bundle_downloaded", "token_issued"} <= actions


def test_zip_release_and_cancel(net: Net) -> None:
    study_id = _submit(net, _bundle(net, ["site_a", "site_b"])).json()["id"]
    run_a = _claim(net, "site_a").json()["run"]["id"]
    _status(net, "site_a", run_a, status="running")
    _status(net, "site_a", run_a, status="checking")
    r = _upload(
        net,
        "site_a",
        run_a,
        _release_archive(net, "site_a", study_id, fmt="zip"),
        "application/zip",
    )
    assert r.status_code == 201, r.text
    r = net.client.post(f"/studies/{study_id}/cancel", headers=_auth(net.researcher))
    assert {run["site"]: run["status"] for run in r.json()["runs"]} == {
        "site_a": "released",
        "site_b": "cancelled",
    }
    # A cancelled run is no longer handed out.
    assert _claim(net, "site_b").status_code == 204


def test_long_poll_wakes_on_submit(net: Net) -> None:
    results: dict[str, Any] = {}

    def poll() -> None:
        results["r"] = _claim(net, "site_b", wait=10)

    thread = threading.Thread(target=poll)
    start = time.monotonic()
    thread.start()
    time.sleep(0.3)
    assert _submit(net, _bundle(net, ["site_b"])).status_code == 201
    thread.join(15)
    assert results["r"].status_code == 200
    assert time.monotonic() - start < 5


# -- refusals: status, reason and an audit entry each ------------------------------------


def test_tampered_bundle_is_refused(net: Net) -> None:
    data = _bundle(net, ["site_a"])
    src = zipfile.ZipFile(io.BytesIO(data))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out:
        for info in src.infolist():
            content = src.read(info)
            if info.filename == "notebook.ipynb":
                content = content.replace(b"done", b"leak")
            out.writestr(info, content)
    r = _submit(net, buffer.getvalue())
    assert r.status_code == 400
    assert any("notebook.ipynb" in p for p in r.json()["problems"])
    assert net.last_refusal()["status"] == 400


def test_wrong_signer_is_refused(net: Net) -> None:
    r = _submit(net, _bundle(net, ["site_a"], key=Ed25519PrivateKey.generate()))
    assert r.status_code == 403
    assert "registered key" in r.json()["reason"]
    assert net.last_refusal()["status"] == 403


def test_not_a_zip_unknown_site_and_wrong_type(net: Net) -> None:
    r = _submit(net, b"not a zip at all")
    assert r.status_code == 400 and "not a zip" in r.json()["reason"]
    r = _submit(net, _bundle(net, ["site_a", "site_zz"]))
    assert r.status_code == 422 and "site_zz" in r.json()["reason"]
    assert "site_zz" in net.last_refusal()["reason"]
    r = net.client.post(
        "/studies",
        content=b"{}",
        headers={**_auth(net.researcher), "Content-Type": "application/json"},
    )
    assert r.status_code == 415


def test_oversized_upload_is_refused(net: Net) -> None:
    r = _submit(net, b"PK" + b"\0" * 300_000)
    assert r.status_code == 413 and "limit" in r.json()["reason"]
    assert net.last_refusal()["status"] == 413


def test_bad_tokens(net: Net) -> None:
    cases = {
        None: "missing",
        "phds_0000000000000000_nope": "invalid",
        "garbage": "malformed",
        net.researcher[:-2] + "xx": "invalid",
    }
    for token, word in cases.items():
        headers = _auth(token) if token else {}
        r = net.client.get("/studies", headers=headers)
        assert r.status_code == 401, token
        assert word in r.json()["reason"]
        assert r.headers["www-authenticate"] == "Bearer"
        assert net.last_refusal()["status"] == 401
    # Wrong role: 403.
    r = net.client.get("/studies", headers=_auth(net.nodes["site_a"]))
    assert r.status_code == 403 and "researcher" in r.json()["reason"]
    assert net.last_refusal()["status"] == 403
    r = net.client.post("/admin/tokens", json={"principal": "dr_a"}, headers=_auth(net.researcher))
    assert r.status_code == 403


def test_expired_and_revoked_tokens(net: Net) -> None:
    short = net.client.post(
        "/admin/tokens", json={"principal": "dr_a", "expires_in_s": 1}, headers=_auth(net.admin)
    ).json()
    time.sleep(1.1)
    r = net.client.get("/studies", headers=_auth(short["token"]))
    assert r.status_code == 401 and "expired" in r.json()["reason"]
    token_id = net.researcher.split("_")[1]
    r = net.client.post(f"/admin/tokens/{token_id}/revoke", headers=_auth(net.admin))
    assert r.status_code == 200 and r.json()["revoked"]
    r = net.client.get("/studies", headers=_auth(net.researcher))
    assert r.status_code == 401 and "revoked" in r.json()["reason"]
    assert net.last_refusal()["reason"] == "token revoked"


def test_other_researcher_and_other_site(net: Net) -> None:
    data = _bundle(net, ["site_a"])
    study_id = _submit(net, data).json()["id"]
    key2 = Ed25519PrivateKey.generate()
    net.client.post(
        "/admin/principals",
        json={"name": "dr_b", "role": "researcher", "public_key": _b64(key2)},
        headers=_auth(net.admin),
    )
    other = net.client.post("/admin/tokens", json={"principal": "dr_b"}, headers=_auth(net.admin))
    other_token = other.json()["token"]
    assert net.client.get("/studies", headers=_auth(other_token)).json() == []
    r = net.client.get(f"/studies/{study_id}", headers=_auth(other_token))
    assert r.status_code == 403 and "another researcher" in r.json()["reason"]
    # dr_a's bundle, sent by dr_b: not signed by dr_b's key.
    assert _submit(net, data, other_token).status_code == 403
    # The same study (same manifest, so the same id) signed by dr_b: it is dr_a's study.
    original = verify_bundle(StudyBundle(*_parts(data))).bundle
    assert original is not None
    resigned = StudyBundle(
        original.notebook, original.manifest, sign_manifest(original.manifest.to_json(), key2)
    )
    r = _submit(net, resigned.to_bytes(), other_token)
    assert r.status_code == 409 and "another researcher" in r.json()["reason"]

    run_id = _claim(net, "site_a").json()["run"]["id"]
    # site_b's node sees neither the run nor the bundle of a study that does not target it.
    r = _status(net, "site_b", run_id, status="running")
    assert r.status_code == 403 and "another site" in r.json()["reason"]
    r = net.client.get(f"/nodes/bundles/{study_id}", headers=_auth(net.nodes["site_b"]))
    assert r.status_code == 403
    assert _upload(net, "site_b", run_id, b"x").status_code == 403
    r = net.client.get(f"/runs/{run_id}/release", headers=_auth(other_token))
    assert r.status_code == 403


def test_status_lifecycle_is_enforced(net: Net) -> None:
    _submit(net, _bundle(net, ["site_a"]))
    run_id = _claim(net, "site_a").json()["run"]["id"]
    r = _status(net, "site_a", run_id, status="checking")
    assert r.status_code == 409 and "cannot become checking" in r.json()["reason"]
    r = _status(net, "site_a", run_id, status="released")
    assert r.status_code == 422  # only a verified upload releases
    r = _status(net, "site_a", run_id, status="running", cells_done=3, cells_total=2)
    assert r.status_code == 422 and "cells_done" in r.json()["reason"]
    assert _status(net, "site_a", run_id, status="failed").status_code == 200
    r = _status(net, "site_a", run_id, status="running")
    assert r.status_code == 409 and "finished" in r.json()["reason"]
    assert net.last_refusal()["status"] == 409


def test_tampered_and_foreign_releases_are_refused(net: Net) -> None:
    study_id = _submit(net, _bundle(net, ["site_a", "site_b"])).json()["id"]
    run_id = _claim(net, "site_a").json()["run"]["id"]
    _status(net, "site_a", run_id, status="running")
    # Not yet releasable.
    good = _release_archive(net, "site_a", study_id)
    assert _upload(net, "site_a", run_id, good).status_code == 409
    _status(net, "site_a", run_id, status="checking")

    # A file altered after signing.
    buffer = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(good), mode="r:gz") as src,
        tarfile.open(fileobj=buffer, mode="w:gz") as out,
    ):
        for member in src.getmembers():
            if member.isfile():
                content = src.extractfile(member).read()  # type: ignore[union-attr]
                if member.name.endswith("release.ipynb"):
                    content = content.replace(b"done", b"DONE")
                member.size = len(content)
                out.addfile(member, io.BytesIO(content))
            else:
                out.addfile(member)
    r = _upload(net, "site_a", run_id, buffer.getvalue())
    assert r.status_code == 400
    assert any("release.ipynb: altered" in p for p in r.json()["problems"])
    assert net.last_refusal()["status"] == 400

    # Signed by site_b's key, or made for site_b: refused.
    r = _upload(
        net,
        "site_a",
        run_id,
        _release_archive(net, "site_a", study_id, key=net.node_keys["site_b"]),
    )
    assert r.status_code == 400 and any("not a trusted key" in p for p in r.json()["problems"])
    r = _upload(net, "site_a", run_id, _release_archive(net, "site_a", "0" * 64))
    assert r.status_code == 400 and "not for this run" in r.json()["reason"]

    # Path traversal in the archive.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as out:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 3
        out.addfile(info, io.BytesIO(b"bad"))
    r = _upload(net, "site_a", run_id, buffer.getvalue())
    assert r.status_code == 400 and "path traversal" in r.json()["reason"]
    assert not (net.data / "evil.txt").exists() and not (net.data.parent / "evil.txt").exists()
    # A link in the archive.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as out:
        info = tarfile.TarInfo("release/manifest.json")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        out.addfile(info)
    r = _upload(net, "site_a", run_id, buffer.getvalue())
    assert r.status_code == 400 and "not a regular file" in r.json()["reason"]
    # Still releasable with a good archive.
    assert _upload(net, "site_a", run_id, good).status_code == 201


def test_admin_refusals(net: Net) -> None:
    r = net.client.post(
        "/admin/principals",
        json={"name": "n", "role": "node", "site": "site_c"},
        headers=_auth(net.admin),
    )
    assert r.status_code == 422 and "public_key" in r.json()["reason"]
    r = net.client.post(
        "/admin/principals",
        json={
            "name": "dr_a",
            "role": "researcher",
            "public_key": _b64(Ed25519PrivateKey.generate()),
        },
        headers=_auth(net.admin),
    )
    assert r.status_code == 409
    r = net.client.post("/admin/tokens", json={"principal": "nobody"}, headers=_auth(net.admin))
    assert r.status_code == 404
    r = net.client.post(
        "/admin/tokens", json={"principal": "dr_a", "expires_in_s": 0}, headers=_auth(net.admin)
    )
    assert r.status_code == 422
    assert net.last_refusal()["status"] == 422
    assert net.client.post("/admin/tokens/ffff/revoke", headers=_auth(net.admin)).status_code == 404


# -- documents and storage ---------------------------------------------------------------


def test_openapi_lists_every_route(net: Net) -> None:
    doc = net.client.get("/openapi.json").json()
    assert doc["info"]["title"] == "phds_tre hub"
    expected = {
        ("/health", "get"),
        ("/admin/principals", "post"),
        ("/admin/tokens", "post"),
        ("/admin/tokens/{token_id}/revoke", "post"),
        ("/admin/audit/verify", "get"),
        ("/studies", "post"),
        ("/studies", "get"),
        ("/studies/{study_id}", "get"),
        ("/studies/{study_id}/cancel", "post"),
        ("/studies/{study_id}/rounds", "post"),
        ("/studies/{study_id}/bundle", "get"),
        ("/runs/{run_id}/release", "get"),
        ("/runs/{run_id}/release", "post"),
        ("/runs/{run_id}/status", "post"),
        ("/nodes/next", "post"),
        ("/nodes/bundles/{study_id}", "get"),
    }
    found = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert found == expected
    assert "application/zip" in doc["paths"]["/studies"]["post"]["requestBody"]["content"]
    dialect = net.db_url.split(":")[0].split("+")[0]
    assert net.client.get("/health").json() == {"status": "ok", "database": dialect}


def test_tokens_are_stored_hashed(net: Net) -> None:
    # Every row of every table, as text; on SQLite also the raw file (WAL, free pages).
    store = net.client.app.state.hub.store  # type: ignore[attr-defined]
    tables = MetaData()
    tables.reflect(store.engine)
    with store.engine.connect() as conn:
        raw = "".join(repr(conn.execute(t.select()).all()) for t in tables.sorted_tables).encode()
    if net.db_url.startswith("sqlite:///"):
        db = Path(net.db_url.removeprefix("sqlite:///"))
        for sibling in db.parent.glob(f"{db.name}*"):
            raw += sibling.read_bytes()
    audit = (net.data / "audit.sqlite").read_bytes()
    for token in (net.admin, net.researcher, *net.nodes.values()):
        secret = token.split("_", 2)[2].encode()
        assert secret not in raw and secret not in audit
        assert token.split("_")[1].encode() in raw  # the id is there: the secret is not
    assert json.dumps(net.client.get("/admin/audit/verify", headers=_auth(net.admin)).json())
