"""The hub store on SQLite and PostgreSQL: migrations, UTC times, race-free claiming, CLI bootstrap."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from phds_tre.cli import cli
from phds_tre.hub.auth import create_principal, hash_secret, issue_token
from phds_tre.hub.models import Principal, Run, RunEvent, Study, Token, utc_now
from phds_tre.hub.store import MIGRATIONS, Store

TABLES = {
    "alembic_version",
    "principals",
    "tokens",
    "studies",
    "runs",
    "run_events",
    "releases",
    "rounds",
}


def _head() -> str:
    """The newest migration shipped with the package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def test_migrations_create_exactly_the_tables(hub_db_url: str) -> None:
    store = Store(hub_db_url)
    assert set(inspect(store.engine).get_table_names()) == TABLES
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == _head()
        if store.dialect == "sqlite":
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        else:
            # Timestamps are real zone-aware columns on PostgreSQL.
            kinds = conn.execute(
                text(
                    "SELECT DISTINCT data_type FROM information_schema.columns"
                    " WHERE table_name = 'runs' AND column_name IN ('created', 'lease_until')"
                )
            ).scalars()
            assert set(kinds) == {"timestamp with time zone"}
    store.dispose()
    # Opening again (another hub process, a restart) is a no-op upgrade.
    Store(hub_db_url).dispose()


def test_foreign_keys_are_enforced(hub_db_url: str) -> None:
    store = Store(hub_db_url)
    now = utc_now()
    with pytest.raises(IntegrityError), store.session() as session:
        session.add(
            Run(id="orphan", study_id="no-such-study", site="s", status="queued", created=now)
        )
    store.dispose()


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


def test_times_are_utc_aware(hub_db_url: str) -> None:
    store = Store(hub_db_url)
    _study(store, 1)
    # A time given in another zone comes back as the same instant, in UTC.
    madrid = dt.datetime(2026, 5, 4, 12, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with store.session() as session:
        session.get_one(Run, "run-000").lease_until = madrid
    with store.session() as session:
        run = session.scalars(select(Run)).one()
        assert run.created.tzinfo is not None and run.created.utcoffset() == dt.timedelta(0)
        assert run.lease_until == madrid and run.lease_until.utcoffset() == dt.timedelta(0)
    store.dispose()


def test_concurrent_claimers_never_share_a_run(hub_db_url: str) -> None:
    first = Store(hub_db_url)
    runs = _study(first, 40)
    # Two engines on one database stand for two hub processes; each has several claimers.
    stores = [first, Store(hub_db_url)]
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


def test_expired_lease_can_be_reclaimed_and_status_is_compare_and_set(hub_db_url: str) -> None:
    store = Store(hub_db_url)
    (run_id,) = _study(store, 1)
    node = create_principal(store, "node", "node", "site_a", public_key="A" * 43 + "=")
    assert store.claim_next("site_a", node.id, "n", lease_s=-1) == run_id
    assert store.claim_next("site_a", node.id, "n") == run_id  # the first claim's lease ran out
    assert store.claim_next("site_a", node.id, "n") is None
    assert store.set_status(run_id, "queued", "running", "n")
    assert not store.set_status(run_id, "queued", "cancelled", "r")  # it moved on meanwhile
    store.dispose()


def test_tokens_hold_only_a_hash(hub_db_url: str) -> None:
    store = Store(hub_db_url)
    create_principal(store, "root", "admin")
    bearer, token = issue_token(store, "root", 60)
    secret = bearer.split("_", 2)[2]
    with store.session() as session:
        row = session.get_one(Token, token.id)
        assert row.secret_sha256 == hash_secret(secret) and secret not in repr(vars(row))
    store.dispose()


def test_cli_bootstraps_the_first_admin(hub_db_url: str, tmp_path: Path) -> None:
    data = tmp_path / "hub"
    where = ["--data", str(data), "--db", hub_db_url]
    runner = CliRunner()
    r = runner.invoke(cli, ["hub", "admin", "create-principal", "root", "--role", "admin", *where])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["hub", "admin", "create-token", "root", *where])
    assert r.exit_code == 0 and r.output.startswith("phds_")
    r = runner.invoke(cli, ["hub", "admin", "create-token", "nobody", *where])
    assert r.exit_code == 2 and "no principal" in r.output
    r = runner.invoke(cli, ["hub", "admin", "create-principal", "n", "--role", "node", *where])
    assert r.exit_code == 2 and "needs a site" in r.output
    store = Store(hub_db_url)
    with store.session() as session:
        assert session.scalars(select(Principal.name)).all() == ["root"]
    store.dispose()
    assert (data / "audit.sqlite").exists()


def test_a_claim_lost_on_the_way_is_handed_to_its_node_again(hub_db_url: str) -> None:
    """The answer to a claim never arrived: the run stays queued under that node's lease."""
    from phds_tre.hub.store import RECLAIM_SILENCE_S

    store = Store(hub_db_url)
    (run_id,) = _study(store, 1)
    node_a = create_principal(store, "node-a", "node", "site_a", public_key="A" * 43 + "=")
    node_b = create_principal(store, "node-b", "node", "site_a", public_key="B" * 43 + "=")
    assert store.claim_next("site_a", node_a.id, "node:node-a") == run_id
    # At once: neither the holder (it may still be starting it) nor another node gets it.
    assert store.claim_next("site_a", node_a.id, "node:node-a") is None
    assert store.claim_next("site_a", node_b.id, "node:node-b") is None
    # Later, still queued (the holder never moved it on): the holder gets it again; the
    # lease still keeps every other node away.
    with store.session() as session:
        run = session.get_one(Run, run_id)
        assert run.lease_until is not None
        run.lease_until -= dt.timedelta(seconds=RECLAIM_SILENCE_S + 1)
    assert store.claim_next("site_a", node_b.id, "node:node-b") is None
    assert store.claim_next("site_a", node_a.id, "node:node-a") == run_id
    with store.session() as session:
        assert session.get_one(Run, run_id).claims == 2
    store.dispose()
