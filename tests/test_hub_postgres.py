"""The hub on a real PostgreSQL: concurrent migrations, LISTEN/NOTIFY between hub processes."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import psycopg
import pytest
import test_hub_api
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from test_hub_api import Net, _auth, _bundle, _submit

from phds_tre.hub.app import create_app
from phds_tre.hub.models import Run
from phds_tre.hub.store import QUEUED_CHANNEL, Store

#: The hub with an admin, a researcher and two site nodes (one per store) from test_hub_api.
net = test_hub_api.net


def test_concurrent_starts_migrate_once(pg_db_url: str) -> None:
    # Six hub processes starting at once on an empty database: the advisory lock lets one
    # migrate; the others wait for it and find the schema at head.
    start = threading.Barrier(6)
    errors: list[BaseException] = []
    stores: list[Store] = []

    def open_store() -> None:
        start.wait()
        try:
            stores.append(Store(pg_db_url))
        except BaseException as exc:  # reported below, with the thread's own exception
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with stores[0].engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    for store in stores:
        store.dispose()


def _listen(store: Store, count: int, announce: Any) -> list[tuple[str, str]]:
    """Run ``watch_queued`` until ``count`` announcements arrived; ``announce()`` sends them."""
    heard: list[tuple[str, str]] = []

    async def main() -> None:
        done = asyncio.Event()

        def on_queued(origin: str, site: str) -> None:
            heard.append((origin, site))
            if len(heard) >= count:
                done.set()

        watcher = asyncio.create_task(store.watch_queued(on_queued))
        try:
            # Announce until heard: the listener may still be connecting (or reconnecting).
            while not done.is_set():
                await asyncio.to_thread(announce)
                await asyncio.sleep(0.2)
        finally:
            watcher.cancel()

    asyncio.run(asyncio.wait_for(main(), 30))
    return heard


def test_announced_queued_runs_reach_another_store(pg_db_url: str) -> None:
    sender, listener = Store(pg_db_url), Store(pg_db_url)
    heard = _listen(listener, 2, lambda: sender.announce_queued(["site_a", "site_b"], "proc-1"))
    assert heard[:2] == [("proc-1", "site_a"), ("proc-1", "site_b")]
    sender.dispose()
    listener.dispose()


def test_listener_reconnects_after_losing_its_connection(pg_db_url: str) -> None:
    sender, listener = Store(pg_db_url), Store(pg_db_url)
    admin = make_url(pg_db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    killed = threading.Event()

    def announce() -> None:
        if not killed.is_set():
            # The listening session dies (a PostgreSQL restart, a dropped connection).
            with psycopg.connect(admin, autocommit=True) as conn:
                gone = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE query = %s AND pid <> pg_backend_pid()",
                    (f"LISTEN {QUEUED_CHANNEL}",),
                ).fetchall()
            if gone:
                killed.set()
            return
        sender.announce_queued(["site_a"], "proc-2")

    heard = _listen(listener, 1, announce)
    assert killed.is_set() and heard[0] == ("proc-2", "site_a")
    sender.dispose()
    listener.dispose()


def _listeners(db_url: str) -> int:
    """How many sessions are listening for queued runs on this database."""
    url = make_url(db_url)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query = %s",
            (url.database, f"LISTEN {QUEUED_CHANNEL}"),
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize("hub_db_url", ["postgresql"], indirect=True)
def test_long_poll_on_one_hub_wakes_for_a_run_submitted_through_another(
    hub_db_url: str, net: Net
) -> None:
    # A second hub application on the same database and data folder: another process in
    # all but address space (its own store, engine, notifier and listener). Its periodic
    # re-check is a minute, so only the NOTIFY can wake it before the poll's end.
    other = create_app(net.db_url, net.data, poll_interval_s=60)
    results: dict[str, Any] = {}
    with TestClient(other) as second:
        # Both applications' listeners are connected before anything is submitted.
        for _ in range(150):
            if _listeners(net.db_url) >= 2:
                break
            time.sleep(0.1)
        assert _listeners(net.db_url) == 2

        def poll() -> None:
            results["r"] = second.post("/nodes/next?wait=50", headers=_auth(net.nodes["site_b"]))

        thread = threading.Thread(target=poll)
        thread.start()
        study = _submit(net, _bundle(net, ["site_b"]))
        assert study.status_code == 201, study.text
        thread.join(30)
        assert not thread.is_alive(), "the long-poll was not woken by the other hub's NOTIFY"
    other.state.hub.store.dispose()
    claimed = results["r"]
    assert claimed.status_code == 200 and claimed.json()["study_id"] == study.json()["id"]
    with Store(net.db_url, migrate=False).session() as session:
        run = session.scalars(select(Run).where(Run.site == "site_b")).one()
        assert run.claims == 1
