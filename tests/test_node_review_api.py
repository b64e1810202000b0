"""The node's local review API: the same rules over REST, with reviewer tokens."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from test_node_review import AUTHOR, REVIEWER, Held, canned_outputs, make_held_run

from phds_tre.audit import AuditLog
from phds_tre.cli import cli
from phds_tre.node.api import (
    LOOPBACK,
    ReviewServer,
    create_review_app,
    issue_reviewer_token,
    revoke_reviewer_token,
)


@pytest.fixture
def held(tmp_path: Path, site_dir: Path) -> Held:
    return make_held_run(tmp_path, site_dir, canned_outputs(site_dir))


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_tokens_are_required_and_checked(held: Held) -> None:
    token = issue_reviewer_token(held.work, REVIEWER)
    client = TestClient(create_review_app(held.work))
    none = client.get("/review/runs")
    assert none.status_code == 401 and "reviewer token is required" in none.json()["reason"]
    assert none.headers["www-authenticate"] == "Bearer"
    wrong_secret = token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb")
    for bad in (wrong_secret, "phdsr_0123456789abcdef_" + "x" * 43, "not-a-token"):
        refused = client.get("/review/runs", headers=_auth(bad))
        assert refused.status_code == 401, bad
        assert refused.json()["reason"] == "unknown or revoked reviewer token"
    assert client.get("/review/runs", headers=_auth(token)).status_code == 200
    revoke_reviewer_token(held.work, token.split("_")[1])
    assert client.get("/review/runs", headers=_auth(token)).status_code == 401
    # Only the secret's hash is stored.
    assert token.split("_", 2)[2].encode() not in (held.work / "node.sqlite").read_bytes()


def test_the_api_lists_shows_decides_and_releases(held: Held) -> None:
    token = issue_reviewer_token(held.work, REVIEWER)
    client = TestClient(create_review_app(held.work))
    h = _auth(token)
    runs = client.get("/review/runs", headers=h).json()
    assert [(r["run_id"], r["held"], r["decided"]) for r in runs] == [(held.run_id, 2, 0)]
    shown = client.get(f"/review/runs/{held.run_id}", headers=h).json()
    first = shown["outputs"][0]
    assert (first["output"], first["verdict"], first["needs_decision"]) == ("0:0", "review", True)
    assert "children with the rare condition: 7" in first["content"]

    url = f"/review/runs/{held.run_id}/outputs/0:0/decision"
    missing = client.post(url, json={"decision": "approve"}, headers=h)
    assert missing.status_code == 422 and "comment is required" in missing.json()["reason"]
    bad = client.post(url, json={"decision": "publish", "comment": "x"}, headers=h)
    assert bad.status_code == 422 and "decision" in bad.json()["reason"]
    undecided = client.post(f"/review/runs/{held.run_id}/release", headers=h)
    assert undecided.status_code == 409 and "undecided output(s)" in undecided.json()["reason"]
    ident = client.post(
        f"/review/runs/{held.run_id}/outputs/4:0/decision",
        json={"decision": "approve", "comment": "sure"},
        headers=h,
    )
    assert ident.status_code == 403 and "identifier" in ident.json()["reason"]
    assert client.get("/review/runs/nope", headers=h).status_code == 404

    ok = client.post(url, json={"decision": "approve", "comment": "7 is fine"}, headers=h)
    assert ok.status_code == 200 and ok.json()["reviewer"] == REVIEWER
    client.post(
        f"/review/runs/{held.run_id}/outputs/2:0/decision",
        json={"decision": "redact", "comment": "raw figure"},
        headers=h,
    )
    released = client.post(
        f"/review/runs/{held.run_id}/release", json={"comment": "done"}, headers=h
    )
    assert released.status_code == 200, released.text
    assert released.json()["status"] == "reviewed"
    # The reviewer recorded is the token's principal.
    actors = {e.actor for e in AuditLog(held.work / "audit.sqlite").entries()}
    assert f"reviewer:{REVIEWER}" in actors
    again = client.post(f"/review/runs/{held.run_id}/release", headers=h)
    assert again.status_code == 409


def test_the_author_is_refused_with_403(held: Held) -> None:
    token = issue_reviewer_token(held.work, AUTHOR)
    client = TestClient(create_review_app(held.work))
    answer = client.post(
        f"/review/runs/{held.run_id}/outputs/0:0/decision",
        json={"decision": "reject", "comment": "my own"},
        headers=_auth(token),
    )
    assert answer.status_code == 403
    assert "authors cannot review their own study" in answer.json()["reason"]


def test_openapi_spec_names_every_endpoint(held: Held) -> None:
    spec = TestClient(create_review_app(held.work)).get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/review/runs",
        "/review/runs/{run_id}",
        "/review/runs/{run_id}/outputs/{output}/decision",
        "/review/runs/{run_id}/release",
    }
    decision = spec["paths"]["/review/runs/{run_id}/outputs/{output}/decision"]["post"]
    assert {"401", "403", "409", "422"} <= set(decision["responses"])


def test_cli_token_then_a_real_server_on_loopback(held: Held) -> None:
    made = CliRunner().invoke(cli, ["review", "token", REVIEWER, "--work", str(held.work)])
    assert made.exit_code == 0, made.output
    token = made.output.strip()
    assert token.startswith("phdsr_")
    server = ReviewServer(held.work, 0).start()
    try:
        assert server.server.config.host == LOOPBACK
        base = f"http://{LOOPBACK}:{server.port}"
        with httpx.Client(base_url=base, headers=_auth(token), timeout=10) as client:
            assert client.get("/review/runs").json()[0]["run_id"] == held.run_id
            for key in ("0:0", "2:0"):
                answer = client.post(
                    f"/review/runs/{held.run_id}/outputs/{key}/decision",
                    json={"decision": "reject", "comment": "not needed"},
                )
                assert answer.status_code == 200, answer.text
            assert client.post(f"/review/runs/{held.run_id}/release").status_code == 200
        assert httpx.get(f"{base}/review/runs").status_code == 401
    finally:
        server.stop()
    assert held.state.get(held.run_id).status == "reviewed"  # type: ignore[union-attr]
