"""The hub store: Alembic migrations, SQLite settings, UTC times, race-free claiming, CLI bootstrap."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import inspect, select, text

from phds_tre.cli import cli
from phds_tre.hub.auth import create_principal, hash_secret, issue_token
from phds_tre.hub.models import Principal, Run, RunEvent, Study, Token, utc_now
from phds_tre.hub.store import Store

TABLES = {"alembic_version", "principals", "tokens", "studies", "runs", "run_events", "releases"}


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hub.sqlite'}"


def test_migrations_create_exactly_the_tables(tmp_path: Path) -> None:
    store = Store(_url(tmp_path))
    assert set(inspect(store.engine).get_table_names()) == TABLES
    with store.engine.connect() as conn:
        assert (
            conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001_initial"
        )
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    store.dispose()
    # Opening again (another hub process, a restart) is a no-op upgrade.
    Store(_url(tmp_path)).dispose()


def _study(store: Store, runs: int, site: str = "site_a") -> list[str]:
    researcher = create_principal(store, "dr", "researcher", public_key="A" * 43 + "=")
    now = utc_now()
    ids = []
    with store.session() as session:
        session.add(
            Study(
                id="ab" * 32,
                researcher_id=researcher.id,
                title="t",
                bundle_sha256="cd" * 32,
                bundle_path="blobs/x.zip",
                manifest_json="{}",
                created=now,
            )
        )
        for i in range(runs):
            run_id = f"run-{i:03d}"
            ids.append(run_id)
            session.add(
                Run(
                    id=run_id,
                    study_id="ab" * 32,
                    site=site,
                    status="queued",
                    cells_done=0,
                    cells_total=0,
                    created=now + dt.timedelta(microseconds=i),
                    updated=now,
                    claims=0,
                )
            )
    return ids


def test_times_are_utc_aware(tmp_path: Path) -> None:
    store = Store(_url(tmp_path))
    _study(store, 1)
    with store.session() as session:
        run = session.scalars(select(Run)).one()
        assert run.created.tzinfo is not None and run.created.utcoffset() == dt.timedelta(0)
    store.dispose()


def test_concurrent_claimers_never_share_a_run(tmp_path: Path) -> None:
    first = Store(_url(tmp_path))
    runs = _study(first, 40)
    # Two engines on one file stand for two hub processes; each has several claimer threads.
    stores = [first, Store(_url(tmp_path))]
    node = create_principal(first, "node", "node", "site_a", public_key="A" * 43 + "=")
    claimed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def claimer(store: Store) -> None:
        start.wait()
        while (run_id := store.claim_next("site_a", node.id, "node:node")) is not None:
            with lock:
                claimed.append(run_id)

    threads = [threading.Thread(target=claimer, args=(stores[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(claimed) == runs  # every run once, none twice
    with first.session() as session:
        assert all(r.claims == 1 for r in session.scalars(select(Run)))
        claims = session.scalars(select(RunEvent).where(RunEvent.detail == "claimed")).all()
        assert len(claims) == len(runs)
    # Oldest first, and nothing for another site.
    assert first.claim_next("site_b", node.id, "node:node") is None
    for store in stores:
        store.dispose()


def test_expired_lease_can_be_reclaimed_and_status_is_compare_and_set(tmp_path: Path) -> None:
    store = Store(_url(tmp_path))
    (run_id,) = _study(store, 1)
    node = create_principal(store, "node", "node", "site_a", public_key="A" * 43 + "=")
    assert store.claim_next("site_a", node.id, "n", lease_s=-1) == run_id
    assert store.claim_next("site_a", node.id, "n") == run_id  # the first claim's lease ran out
    assert store.claim_next("site_a", node.id, "n") is None
    assert store.set_status(run_id, "queued", "running", "n")
    assert not store.set_status(run_id, "queued", "cancelled", "r")  # it moved on meanwhile
    store.dispose()


def test_tokens_hold_only_a_hash(tmp_path: Path) -> None:
    store = Store(_url(tmp_path))
    create_principal(store, "root", "admin")
    bearer, token = issue_token(store, "root", 60)
    secret = bearer.split("_", 2)[2]
    with store.session() as session:
        row = session.get_one(Token, token.id)
        assert row.secret_sha256 == hash_secret(secret) and secret not in repr(vars(row))
    store.dispose()


def test_cli_bootstraps_the_first_admin(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    runner = CliRunner()
    r = runner.invoke(
        cli, ["hub", "admin", "create-principal", "root", "--role", "admin", "--data", str(data)]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["hub", "admin", "create-token", "root", "--data", str(data)])
    assert r.exit_code == 0 and r.output.startswith("phds_")
    r = runner.invoke(cli, ["hub", "admin", "create-token", "nobody", "--data", str(data)])
    assert r.exit_code == 2 and "no principal" in r.output
    r = runner.invoke(
        cli, ["hub", "admin", "create-principal", "n", "--role", "node", "--data", str(data)]
    )
    assert r.exit_code == 2 and "needs a site" in r.output
    store = Store(f"sqlite:///{data / 'hub.sqlite'}")
    with store.session() as session:
        assert session.scalars(select(Principal.name)).all() == ["root"]
    store.dispose()
    assert (data / "audit.sqlite").exists()
