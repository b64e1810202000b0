"""The researcher's client (``phds_tre.client``) and ``phds submit/status/watch/results/cancel``.

A real hub (uvicorn on loopback, in a thread) with an admin-made researcher and two
site nodes; a fake node of plain httpx calls claims runs, reports progress and uploads
signed releases.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
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
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nbformat.v4 import new_code_cell, new_notebook, new_output

from phds_tre.bundle import build_bundle, write_bundle
from phds_tre.check import check_notebook
from phds_tre.cli import cli
from phds_tre.client import ClientConfig, ConfigError, Hub, HubError, read_token_file
from phds_tre.hub.app import create_app
from phds_tre.hub.auth import create_principal, issue_token
from phds_tre.release import build_release, write_release
from phds_tre.release.signing import generate_key
from phds_tre.site_policy import SitePolicy

POLICY = SitePolicy()
PHDS = Path(sys.executable).with_name("phds")
SITES = ("site_a", "site_b")


def _b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Net:
    """A served hub, a researcher (token file, key, env) and two nodes."""

    url: str
    tmp: Path
    researcher_token: str
    token_file: Path
    key_path: Path
    node_tokens: dict[str, str]
    node_keys: dict[str, Ed25519PrivateKey]
    env: dict[str, str]

    def hub(self) -> Hub:
        return Hub(self.url, self.researcher_token)

    def node(self, site: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.node_tokens[site]}"},
            timeout=10,
        )


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    app = create_app(f"sqlite:///{tmp_path / 'hub.sqlite'}", tmp_path / "hub", poll_interval_s=0.1)
    store = app.state.hub.store
    create_principal(store, "root", "admin")
    admin, _ = issue_token(store, "root", 3600)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the hub did not start"
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}) as a:
            key_path = tmp_path / "researcher.pem"
            rkey = generate_key(key_path)
            r = a.post(
                "/admin/principals",
                json={"name": "dr_a", "role": "researcher", "public_key": _b64(rkey)},
            )
            assert r.status_code == 201, r.text
            node_keys = {}
            for site in SITES:
                node_keys[site] = generate_key(tmp_path / f"{site}.pem")
                body = {"name": f"node_{site}", "role": "node", "site": site}
                body["public_key"] = _b64(node_keys[site])
                assert a.post("/admin/principals", json=body).status_code == 201
            tokens = {}
            for name in ("dr_a", "node_site_a", "node_site_b"):
                r = a.post("/admin/tokens", json={"principal": name})
                assert r.status_code == 201, r.text
                tokens[name] = r.json()["token"]
        token_file = tmp_path / "token"
        token_file.write_text(tokens["dr_a"] + "\n")
        token_file.chmod(0o600)
        home = tmp_path / "phds_home"
        home.mkdir()
        env = {
            "PHDS_HOME": str(home),
            "PHDS_HUB_URL": url,
            "PHDS_TOKEN_FILE": str(token_file),
            "PHDS_KEY": str(key_path),
            "PHDS_RESEARCHER": "dr_a",
        }
        yield Net(
            url,
            tmp_path,
            tokens["dr_a"],
            token_file,
            key_path,
            {s: tokens[f"node_{s}"] for s in SITES},
            node_keys,
            env,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        store.dispose()
    assert not thread.is_alive()


def _notebook(path: Path) -> Path:
    nb = new_notebook(
        cells=[
            new_code_cell("min_age: int = 0", metadata={"tags": ["parameters"]}),
            new_code_cell("print('done')"),
        ]
    )
    nbformat.write(nb, path)
    return path


def _bundle_path(net: Net, title: str = "T") -> Path:
    nb = _notebook(net.tmp / "study.ipynb")
    fields = {
        "title": title,
        "researcher": "dr_a",
        "sites": list(SITES),
        "parameters": {"min_age": "2"},
    }
    from phds_tre.release.signing import load_private_key

    bundle = build_bundle(nb, fields, load_private_key(net.key_path))
    return write_bundle(bundle, net.tmp / f"{title}.zip")


def _release_archive(
    net: Net, site: str, study_id: str, key: Ed25519PrivateKey | None = None
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
    release = build_release(nb, check_notebook(nb, POLICY.disclosure), POLICY)
    out = net.tmp / f"rel-{site}-{time.monotonic_ns()}"
    fields = {"study_id": study_id, "site": site, "parameters": {}, "policy_hash": POLICY.hash}
    folder = write_release(out, release, fields, {}, key or net.node_keys[site])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname="release")
    return buffer.getvalue()


def _claim(net: Net, site: str) -> str:
    with net.node(site) as node:
        r = node.post("/nodes/next?wait=2")
        assert r.status_code == 200, r.text
        return str(r.json()["run"]["id"])


def _status(net: Net, site: str, run_id: str, **body: Any) -> None:
    with net.node(site) as node:
        r = node.post(f"/runs/{run_id}/status", json=body)
        assert r.status_code == 200, r.text


def _release(net: Net, site: str, run_id: str, study_id: str, **kw: Any) -> None:
    data = _release_archive(net, site, study_id, **kw)
    with net.node(site) as node:
        r = node.post(
            f"/runs/{run_id}/release",
            content=data,
            headers={"Content-Type": "application/gzip"},
        )
        assert r.status_code == 201, r.text


def _drive(net: Net, site: str, study_id: str, final: str = "released", **kw: Any) -> str:
    """A fake node: claim, run two cells, check, then release (or reject/fail)."""
    run_id = _claim(net, site)
    _status(net, site, run_id, status="running", cells_done=0, cells_total=2)
    _status(net, site, run_id, status="running", cells_done=2)
    _status(net, site, run_id, status="checking")
    if final == "released":
        _release(net, site, run_id, study_id, **kw)
    elif final != "checking":
        _status(net, site, run_id, status=final, detail="by the fake node")
    return run_id


def _run(net: Net, *args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(
        cli, list(args), env={**net.env, **(env or {})}, catch_exceptions=False
    )


# -- configuration -------------------------------------------------------------------------


def test_config_from_toml_file_with_relative_paths(net: Net, tmp_path: Path) -> None:
    home = tmp_path / "cfg"
    home.mkdir()
    (home / "tok").write_text(net.researcher_token)
    (home / "tok").chmod(0o600)
    (home / "client.toml").write_text(
        f'hub_url = "{net.url}/"\ntoken_file = "tok"\nkey = "k.pem"\nresearcher = "dr_a"\n'
    )
    config = ClientConfig.load({"PHDS_HOME": str(home)})
    assert config.hub_url == net.url
    assert config.token == net.researcher_token
    assert config.key_path == home / "k.pem"
    assert config.researcher == "dr_a"
    assert net.researcher_token not in repr(config)
    # the environment overrides the file; PHDS_TOKEN (CI) needs no file
    other = ClientConfig.load(
        {"PHDS_HOME": str(home), "PHDS_TOKEN": "phds_ci_token", "PHDS_RESEARCHER": "ci"}
    )
    assert (other.token, other.researcher) == ("phds_ci_token", "ci")


def test_config_refusals(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("phds_x_y")
    token.chmod(0o644)
    with pytest.raises(ConfigError, match=r"accessible to others \(mode 0644\).*chmod 600"):
        read_token_file(token)
    env = {"PHDS_HOME": str(tmp_path), "PHDS_HUB_URL": "https://hub.example"}
    with pytest.raises(ConfigError, match="accessible to others"):
        ClientConfig.load({**env, "PHDS_TOKEN_FILE": str(token)})
    with pytest.raises(ConfigError, match="no token"):
        ClientConfig.load(env)
    with pytest.raises(ConfigError, match="no hub URL"):
        ClientConfig.load({"PHDS_HOME": str(tmp_path), "PHDS_TOKEN": "phds_x_y"})
    with pytest.raises(ConfigError, match="plain http"):
        ClientConfig.load({**env, "PHDS_HUB_URL": "http://hub.example", "PHDS_TOKEN": "phds_x"})
    with pytest.raises(ConfigError, match="not a hub token"):
        ClientConfig.load({**env, "PHDS_TOKEN": "secret"})
    (tmp_path / "client.toml").write_text('token = "phds_x_y"\n')
    with pytest.raises(ConfigError, match="holds a token"):
        ClientConfig.load(env)


def test_no_token_option_and_world_readable_token_file_refused(net: Net) -> None:
    for command in ("submit", "status", "watch", "results", "cancel"):
        params = {p.name for p in cli.commands[command].params}
        opts = {o for p in cli.commands[command].params for o in p.opts}
        assert not any("token" in n for n in params | opts), command
    r = _run(net, "status", "x", "--token", net.researcher_token)
    assert r.exit_code == 2 and "No such option '--token'" in r.output
    net.token_file.chmod(0o644)
    r = _run(net, "status", "some-study")
    assert r.exit_code == 2
    assert r.stderr.startswith("phds: error: token file") and "chmod 600" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# -- the Python client ----------------------------------------------------------------------


def test_client_submit_status_cancel(net: Net) -> None:
    with net.hub() as hub:
        bundle = _bundle_path(net)
        study = hub.submit(bundle)
        assert {r["site"]: r["status"] for r in study["runs"]} == dict.fromkeys(SITES, "queued")
        assert hub.submit(bundle)["id"] == study["id"]  # resubmitting: the same study
        assert [s["id"] for s in hub.studies()] == [study["id"]]
        _drive(net, "site_a", study["id"], final="checking")
        got = hub.study(study["id"])
        assert {r["site"]: (r["status"], r["cells_done"]) for r in got["runs"]} == {
            "site_a": ("checking", 2),
            "site_b": ("queued", 0),
        }
        after = hub.cancel(study["id"])
        assert {r["status"] for r in after["runs"]} == {"cancelled"}
        with pytest.raises(HubError) as caught:
            hub.study("no-such-study")
        assert caught.value.status == 404 and "no study" in caught.value.reason
        assert "\n" not in str(caught.value)
    with Hub(net.url, "phds_0000000000000000_wrong") as bad, pytest.raises(HubError) as caught:
        bad.studies()
    assert caught.value.status == 401
    with Hub("http://127.0.0.1:1", net.researcher_token) as gone, pytest.raises(HubError) as c2:
        gone.studies()
    assert c2.value.status == 0 and "cannot reach the hub" in str(c2.value)


def test_client_results_download_and_verify(net: Net) -> None:
    with net.hub() as hub:
        study = hub.submit(_bundle_path(net))
        sid = study["id"]
        run_a = _drive(net, "site_a", sid)
        _drive(net, "site_b", sid, final="checking")
        archive = hub.download_release(run_a, net.tmp)
        assert archive.name == f"release-{run_a}.tar.gz" and archive.stat().st_size > 0
        out = net.tmp / "results"
        summary = hub.results(sid, out)
    assert summary["ok"] is True and summary["complete"] is False
    a, b = summary["sites"]["site_a"], summary["sites"]["site_b"]
    assert a["verified"] is True and a["trusted"] is None and a["path"] == "site_a/release"
    assert (out / "site_a" / "release" / "manifest.json").is_file()
    assert b == {**b, "released": False, "status": "checking", "verified": None}
    assert json.loads((out / "results.json").read_text())["sites"]["site_a"]["run_id"] == run_a
    # with the sites' public keys: trusted; fetching again replaces the earlier copy
    with net.hub() as hub:
        public = {s: [k.public_key()] for s, k in net.node_keys.items()}
        again = hub.results(sid, out, trusted_site_keys=public)
    assert again["sites"]["site_a"]["trusted"] is True and again["ok"] is True


def test_results_flags_a_release_signed_by_an_untrusted_key(net: Net) -> None:
    with net.hub() as hub:
        sid = hub.submit(_bundle_path(net))["id"]
        _drive(net, "site_a", sid)
        _drive(net, "site_b", sid)
        rogue = Ed25519PrivateKey.generate()
        trusted = {"site_a": [net.node_keys["site_a"].public_key()], "site_b": [rogue.public_key()]}
        summary = hub.results(sid, net.tmp / "out", trusted_site_keys=trusted)
    assert summary["ok"] is False and summary["complete"] is True
    assert summary["sites"]["site_a"]["verified"] is True
    b = summary["sites"]["site_b"]
    assert b["verified"] is False and b["trusted"] is False
    assert any("not a trusted key" in p for p in b["problems"])


# -- the command line -----------------------------------------------------------------------


def test_phds_submit_subprocess_then_status(net: Net) -> None:
    nb = _notebook(net.tmp / "cli.ipynb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHDS_")} | net.env
    proc = subprocess.run(
        [
            *(str(PHDS), "submit", str(nb), "--sites", "site_a,site_b", "--title", "CLI study"),
            *("-p", "min_age", "3", "--site-param", "site_b", "min_age", "4"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.strip()
    assert net.researcher_token not in proc.stdout + proc.stderr
    with net.hub() as hub:
        study = hub.study(sid)
    assert study["title"] == "CLI study" and sorted(study["sites"]) == list(SITES)
    with net.node("site_b") as node:
        claimed = node.post("/nodes/next?wait=2").json()
    assert claimed["parameters"] == {"min_age": 4}
    _status(net, "site_b", claimed["run"]["id"], status="running", cells_done=1, cells_total=2)
    r = _run(net, "status", sid)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == f"study {sid}: CLI study"
    assert lines[1].split()[:3] == ["SITE", "STATUS", "CELLS"]
    rows = {line.split()[0]: line.split()[1:3] for line in lines[2:]}
    assert rows == {"site_a": ["queued", "-"], "site_b": ["running", "1/2"]}


def test_submit_refusals_exit_2_with_the_reason(net: Net) -> None:
    nb = _notebook(net.tmp / "x.ipynb")
    r = _run(net, "submit", str(nb), "--sites", "site_a,site_zz")
    assert r.exit_code == 2
    assert r.stderr.strip() == (
        "phds: error: hub refused the request (422): unknown sites (no registered node): "
        "site_zz: unknown site 'site_zz'"
    )
    r = _run(net, "submit", str(nb), "--sites", "site_a", "-p", "nope", "1")
    assert r.exit_code == 2 and r.stderr.startswith("phds: error:") and "nope" in r.stderr
    r = _run(net, "submit", str(nb), "--sites", "site_a", env={"PHDS_KEY": ""})
    assert r.exit_code == 2 and "no signing key" in r.stderr
    # a key the hub does not know for this researcher
    other = net.tmp / "other.pem"
    generate_key(other)
    r = _run(net, "submit", str(nb), "--sites", "site_a", env={"PHDS_KEY": str(other)})
    assert (
        r.exit_code == 2 and "(403): the bundle is not signed with your registered key" in r.stderr
    )
    r = _run(net, "status", "no-such-study")
    assert r.exit_code == 2 and r.stderr.strip() == (
        "phds: error: hub refused the request (404): no study no-such-study"
    )


def test_watch_exit_codes_and_progress_bars(net: Net) -> None:
    with net.hub() as hub:
        sid = hub.submit(_bundle_path(net))["id"]
    _drive(net, "site_a", sid)
    run_b = _drive(net, "site_b", sid, final="checking")
    _status(net, "site_b", run_b, status="awaiting_review")
    r = _run(net, "watch", sid, "--interval", "0.1", "--timeout", "0.3")
    assert r.exit_code == 3, r.output
    assert "site_a released" in r.stderr and "site_b awaiting_review" in r.stderr
    assert "2/2" in r.stderr
    assert "awaiting output review at site_b" in r.stderr
    assert "site_a: released (2/2 cells)" in r.stdout

    # live: the node releases site_b while watch polls
    def later() -> None:
        time.sleep(0.4)
        _release(net, "site_b", run_b, sid)

    thread = threading.Thread(target=later)
    thread.start()
    r = _run(net, "watch", sid, "--interval", "0.1", "--timeout", "20")
    thread.join()
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == ["site_a: released (2/2 cells)", "site_b: released (2/2 cells)"]


def test_watch_failed_run_exits_4_and_cancel(net: Net) -> None:
    with net.hub() as hub:
        sid = hub.submit(_bundle_path(net))["id"]
    _drive(net, "site_a", sid, final="rejected")
    r = _run(net, "cancel", sid)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == ["site_a: rejected", "site_b: cancelled"]
    r = _run(net, "watch", sid, "--interval", "0.1")
    assert r.exit_code == 4
    assert "site_b: cancelled" in r.stdout


def test_results_command(net: Net) -> None:
    with net.hub() as hub:
        sid = hub.submit(_bundle_path(net))["id"]
    _drive(net, "site_a", sid)
    _drive(net, "site_b", sid)
    out = net.tmp / "res"
    pubs = {s: net.tmp / f"{s}.pem.pub" for s in SITES}
    r = _run(net, "results", sid, "--out", str(out), "--site-key", "site_a", str(pubs["site_a"]))
    assert r.exit_code == 1, r.output  # site_b has no trusted key given
    assert r.stdout.splitlines()[0].startswith("site_a: verified, ")
    assert r.stdout.splitlines()[1].startswith("site_b: NOT VERIFIED: ")
    args = [
        "--site-key",
        "site_a",
        str(pubs["site_a"]),
        "--site-key",
        "site_b",
        str(pubs["site_b"]),
    ]
    r = _run(net, "results", sid, "--out", str(out), *args)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "results.json").read_text())
    assert summary["ok"] and summary["complete"]
    assert all(s["trusted"] for s in summary["sites"].values())
    r = _run(net, "results", sid, "--out", str(out), "--site-key", "site_a", str(net.tmp / "nokey"))
    assert r.exit_code == 2 and r.stderr.startswith("phds: error:")
