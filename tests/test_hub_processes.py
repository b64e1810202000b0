"""Two real `phds hub serve --db postgresql+psycopg://...` processes on one PostgreSQL database."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from test_hub_api import _b64, _notebook
from test_hub_serve import _free_port

from phds_tre.bundle import build_bundle
from phds_tre.hub.auth import create_principal, issue_token
from phds_tre.hub.models import Run, RunEvent
from phds_tre.hub.store import Store

PHDS = Path(sys.executable).with_name("phds")
NODES = 6
STUDIES = 12


def _serve(db_url: str, data: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PHDS, "hub", "serve", "--db", db_url, "--data", str(data), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_healthy(proc: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            health = httpx.get(f"{url}/health", timeout=2)
            assert health.json() == {"status": "ok", "database": "postgresql"}
            return
        except httpx.TransportError:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"hub process exited with {proc.returncode}:\n{out}")
            assert time.monotonic() < deadline, "the hub did not start within 60 s"
            time.sleep(0.2)


@pytest.fixture
def two_hubs(pg_db_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two hub processes started at once on an empty database (both migrate at start)."""
    data = tmp_path / "hub"  # shared: bundles, releases and the audit log
    ports = [_free_port(), _free_port()]
    procs = [_serve(pg_db_url, data, port) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for proc, url in zip(procs, urls, strict=True):
            _wait_healthy(proc, url)
        yield urls[0], urls[1]
    finally:
        for proc in procs:
            proc.terminate()
        logs = [proc.communicate(timeout=15)[0].decode() for proc in procs]
    # Started, served and stopped cleanly (the NOTIFY listener included).
    for log in logs:
        assert "Traceback" not in log and "ERROR" not in log, log


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.slow
def test_two_hub_processes_share_one_postgresql(
    two_hubs: tuple[str, str], pg_db_url: str, tmp_path: Path
) -> None:
    hub_a, hub_b = two_hubs
    store = Store(pg_db_url, migrate=False)
    create_principal(store, "root", "admin")
    admin, _ = issue_token(store, "root", 3600)
    researcher_key = Ed25519PrivateKey.generate()
    with httpx.Client(headers=_auth(admin), timeout=30) as client:
        # Admin calls alternate between the processes: each sees what the other stored.
        r = client.post(
            f"{hub_a}/admin/principals",
            json={"name": "dr_a", "role": "researcher", "public_key": _b64(researcher_key)},
        )
        assert r.status_code == 201, r.text
        for i in range(NODES):
            body = {"name": f"node_{i}", "role": "node", "site": "site_a"}
            body["public_key"] = _b64(Ed25519PrivateKey.generate())
            assert client.post(f"{(hub_a, hub_b)[i % 2]}/admin/principals", json=body).is_success
        tokens = {
            name: client.post(
                f"{(hub_b, hub_a)[i % 2]}/admin/tokens", json={"principal": name}
            ).json()["token"]
            for i, name in enumerate(["dr_a", *(f"node_{i}" for i in range(NODES))])
        }

    def submit(title: str, hub: str) -> dict[str, Any]:
        fields = {
            "title": title,
            "researcher": "dr_a",
            "sites": ["site_a"],
            "parameters": {},
            "created": "2026-05-04T10:00:00Z",
        }
        bundle = build_bundle(_notebook(tmp_path / "study.ipynb"), fields, researcher_key)
        r = httpx.post(
            f"{hub}/studies",
            content=bundle.to_bytes(),
            headers={**_auth(tokens["dr_a"]), "Content-Type": "application/zip"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        return dict(r.json())

    # 1. A node long-polling process A gets a run submitted through process B.
    polled: dict[str, httpx.Response] = {}

    def long_poll() -> None:
        polled["r"] = httpx.post(
            f"{hub_a}/nodes/next?wait=30", headers=_auth(tokens["node_0"]), timeout=40
        )

    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(0.5)  # the poll is waiting (it would also find a run queued before it)
    first = submit("first", hub_b)
    poller.join(40)
    assert polled["r"].status_code == 200, polled["r"].text
    assert polled["r"].json()["study_id"] == first["id"]

    # 2. Many nodes claim concurrently through both processes: no run goes to two nodes.
    studies = [submit(f"study {i}", (hub_a, hub_b)[i % 2])["id"] for i in range(STUDIES)]
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(NODES)

    def claimer(i: int) -> None:
        hub = (hub_a, hub_b)[i % 2]
        with httpx.Client(headers=_auth(tokens[f"node_{i}"]), timeout=30) as client:
            start.wait()
            while (r := client.post(f"{hub}/nodes/next?wait=0")).status_code == 200:
                with lock:
                    claimed.append((r.json()["study_id"], f"node_{i}"))
            assert r.status_code == 204, r.text

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(NODES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(s for s, _ in claimed) == sorted(studies)  # every run once, none twice
    with store.session() as session:
        runs = session.scalars(select(Run)).all()
        assert len(runs) == STUDIES + 1 and all(r.claims == 1 for r in runs)
        assert all(r.claimed_by is not None for r in runs)
        claims_per_run = session.execute(
            select(RunEvent.run_id, func.count())
            .where(RunEvent.detail == "claimed")
            .group_by(RunEvent.run_id)
        ).all()
        assert sorted(n for _, n in claims_per_run) == [1] * (STUDIES + 1)
    store.dispose()
