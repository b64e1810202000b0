"""Bad input to the hub, on SQLite and PostgreSQL: a clear 4xx naming the problem, and an audit entry.

Each test checks the status code, that the reason names what is wrong, and that the hub's
audit log has a ``rejection`` entry for exactly that request (same status, reason, path).
"""

from __future__ import annotations

import datetime as dt
import io
import zipfile
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import test_hub_api
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from test_hub_api import Net, _auth, _bundle, _claim, _release_archive, _status, _submit, _upload

from phds_tre.hub.models import Run, Token, utc_now

#: The hub with an admin, a researcher and two site nodes (one per store) from test_hub_api.
net = test_hub_api.net


def _refused(net: Net, r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    """Assert the refusal: status, every word in the reason, and its audit entry; the body."""
    assert r.status_code == status, r.text
    body = dict(r.json())
    for word in words:
        assert word in body["reason"], (word, body)
    audited = net.last_refusal()
    assert audited["status"] == status and audited["reason"] == body["reason"]
    assert audited["path"] == r.request.url.path
    return body


def _runs(net: Net) -> list[Run]:
    with net.client.app.state.hub.store.session() as session:  # type: ignore[attr-defined]
        return list(session.scalars(select(Run).order_by(Run.site)))


@pytest.fixture
def released_run(net: Net) -> Iterator[tuple[str, str]]:
    """(study id, run id) of a site_a run that is checking, claimed by site_a's node."""
    study_id = _submit(net, _bundle(net, ["site_a", "site_b"])).json()["id"]
    run_id = _claim(net, "site_a").json()["run"]["id"]
    assert _status(net, "site_a", run_id, status="running").status_code == 200
    assert _status(net, "site_a", run_id, status="checking").status_code == 200
    yield study_id, run_id


# -- study bundles -----------------------------------------------------------------------------


def test_tampered_bundle(net: Net) -> None:
    data = _bundle(net, ["site_a"])
    source = zipfile.ZipFile(io.BytesIO(data))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out:
        for info in source.infolist():
            content = source.read(info)
            if info.filename == "notebook.ipynb":
                at = content.index(b"done")  # one byte of the code changed after signing
                content = content[:at] + b"D" + content[at + 1 :]
            out.writestr(info, content)
    body = _refused(net, _submit(net, buffer.getvalue()), 400, "failed verification")
    assert any("notebook.ipynb" in p for p in body["problems"])
    assert _runs(net) == []


def test_bundle_signed_by_another_key(net: Net) -> None:
    r = _submit(net, _bundle(net, ["site_a"], key=Ed25519PrivateKey.generate()))
    _refused(net, r, 403, "not signed with your registered key")
    assert _runs(net) == []


def test_unknown_target_site(net: Net) -> None:
    r = _submit(net, _bundle(net, ["site_a", "site_zz"]))
    body = _refused(net, r, 422, "unknown sites", "site_zz")
    assert body["problems"] == ["unknown site 'site_zz'"]
    assert _runs(net) == []  # not even site_a's run: a study is stored whole or not at all


def test_oversized_study_upload(net: Net) -> None:
    limit = net.client.app.state.hub.max_study_bytes  # type: ignore[attr-defined]
    big = b"PK" + b"\0" * limit
    headers = {**_auth(net.researcher), "Content-Type": "application/zip"}
    # An honest Content-Length is refused before the body is read.
    r = net.client.post("/studies", content=big, headers=headers)
    _refused(net, r, 413, f"is {len(big)} bytes", f"limit of {limit}")
    # A Content-Length that lies, and none at all (chunked): refused while reading.
    r = net.client.post("/studies", content=big, headers={**headers, "Content-Length": "100"})
    _refused(net, r, 413, f"more than the limit of {limit} bytes")
    r = net.client.post("/studies", content=iter([big[:1000], big[1000:]]), headers=headers)
    _refused(net, r, 413, f"more than the limit of {limit} bytes")
    assert list((net.data / "blobs").iterdir()) == []


# -- tokens and roles -------------------------------------------------------------------------


def test_expired_token(net: Net) -> None:
    token_id = net.researcher.split("_")[1]
    with net.client.app.state.hub.store.session() as session:  # type: ignore[attr-defined]
        session.get_one(Token, token_id).expires = utc_now() - dt.timedelta(seconds=1)
    r = net.client.get("/studies", headers=_auth(net.researcher))
    _refused(net, r, 401, "token expired")
    assert r.headers["www-authenticate"] == "Bearer"


def test_revoked_token(net: Net) -> None:
    token_id = net.nodes["site_a"].split("_")[1]
    assert net.client.post(f"/admin/tokens/{token_id}/revoke", headers=_auth(net.admin)).is_success
    _refused(net, _claim(net, "site_a"), 401, "token revoked")


def test_researcher_calling_node_routes(net: Net) -> None:
    study_id = _submit(net, _bundle(net, ["site_a"])).json()["id"]
    mine = _auth(net.researcher)
    r = net.client.post("/nodes/next?wait=0", headers=mine)
    _refused(net, r, 403, "for node tokens, not researcher tokens")
    assert net.last_refusal()["path"] == "/nodes/next"
    r = net.client.get(f"/nodes/bundles/{study_id}", headers=mine)
    _refused(net, r, 403, "for node tokens")
    run_id = _runs(net)[0].id
    r = net.client.post(f"/runs/{run_id}/status", json={"status": "running"}, headers=mine)
    _refused(net, r, 403, "for node tokens")
    assert _runs(net)[0].claims == 0  # nothing claimed on the researcher's behalf


def test_node_calling_admin_routes(net: Net) -> None:
    theirs = _auth(net.nodes["site_a"])
    r = net.client.post("/admin/tokens", json={"principal": "node_site_a"}, headers=theirs)
    _refused(net, r, 403, "for admin tokens, not node tokens")
    r = net.client.post("/admin/principals", json={"name": "x", "role": "admin"}, headers=theirs)
    _refused(net, r, 403, "for admin tokens")
    _refused(net, net.client.get("/admin/audit/verify", headers=theirs), 403, "admin")


# -- another site's node -----------------------------------------------------------------------


def test_another_sites_node_cannot_claim_or_read_a_run(net: Net) -> None:
    study_id = _submit(net, _bundle(net, ["site_a"])).json()["id"]
    # site_b's node is never handed site_a's run.
    assert _claim(net, "site_b").status_code == 204
    assert _runs(net)[0].claims == 0
    run_id = _claim(net, "site_a").json()["run"]["id"]
    r = _status(net, "site_b", run_id, status="running")
    _refused(net, r, 403, f"run {run_id} is for another site")
    r = net.client.get(f"/nodes/bundles/{study_id}", headers=_auth(net.nodes["site_b"]))
    _refused(net, r, 403, "does not target your site")
    r = _upload(net, "site_b", run_id, _release_archive(net, "site_b", study_id))
    _refused(net, r, 403, "another site")
    assert _runs(net)[0].status == "queued"


# -- releases ----------------------------------------------------------------------------------


def test_release_for_a_run_of_another_site(net: Net, released_run: tuple[str, str]) -> None:
    study_id, run_id = released_run
    # site_a's node (its own key) uploads a release made for site_b's run of the same study.
    archive = _release_archive(net, "site_b", study_id, key=net.node_keys["site_a"])
    body = _refused(net, _upload(net, "site_a", run_id, archive), 400, "not for this run")
    assert body["problems"] == ["manifest site is 'site_b', expected 'site_a'"]
    # site_b's own release cannot go to site_a's run either.
    archive = _release_archive(net, "site_b", study_id)
    body = _refused(net, _upload(net, "site_a", run_id, archive), 400, "failed verification")
    assert any("not a trusted key" in p for p in body["problems"])
    assert not list((net.data / "releases").iterdir())


def test_second_release_for_the_same_run(net: Net, released_run: tuple[str, str]) -> None:
    study_id, run_id = released_run
    first = _release_archive(net, "site_a", study_id)
    assert _upload(net, "site_a", run_id, first).status_code == 201
    second = _release_archive(net, "site_a", study_id)
    _refused(net, _upload(net, "site_a", run_id, second), 409, "already has a release")
    # The first release is what the researcher gets.
    download = net.client.get(f"/runs/{run_id}/release", headers=_auth(net.researcher))
    assert download.content == first


def test_oversized_release_upload(net: Net, released_run: tuple[str, str]) -> None:
    study_id, run_id = released_run
    archive = _release_archive(net, "site_a", study_id)
    limit = len(archive) - 1
    net.client.app.state.hub.max_release_bytes = limit  # type: ignore[attr-defined]
    headers = {**_auth(net.nodes["site_a"]), "Content-Type": "application/gzip"}
    r = net.client.post(f"/runs/{run_id}/release", content=archive, headers=headers)
    _refused(net, r, 413, f"is {len(archive)} bytes", f"limit of {limit}")
    lying = {**headers, "Content-Length": "10"}
    r = net.client.post(f"/runs/{run_id}/release", content=archive, headers=lying)
    _refused(net, r, 413, f"more than the limit of {limit} bytes")
    assert [r.status for r in _runs(net) if r.id == run_id] == ["checking"]


# -- malformed requests ------------------------------------------------------------------------


def test_malformed_json(net: Net) -> None:
    r = net.client.post(
        "/admin/tokens",
        content=b'{"principal": "dr_a",',
        headers={**_auth(net.admin), "Content-Type": "application/json"},
    )
    body = _refused(net, r, 422, "invalid request", "JSON decode error")
    assert body["problems"] and all("JSON" in p for p in body["problems"])
    r = _status(net, "site_a", "no-such-run", status="sleeping")
    _refused(net, r, 422, "status")
