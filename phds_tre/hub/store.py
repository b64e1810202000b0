"""The hub store: engine, Alembic migrations at start, sessions, and race-free run claiming.

SQLite (a file, the default) gets WAL, foreign keys and a busy timeout on every
connection. PostgreSQL works by URL: nothing here is SQLite-only SQL, the migration
runs under an advisory lock (several hub processes may start at once), and a run is
claimed with ``SELECT ... FOR UPDATE SKIP LOCKED``. On SQLite a claim is one atomic
``UPDATE ... WHERE status = 'queued'`` compare-and-set, so two hub processes on one
file never hand the same run to two nodes either.

Several hub processes on one PostgreSQL learn of each other's queued runs through
``LISTEN``/``NOTIFY`` (:meth:`Store.announce_queued`, :meth:`Store.watch_queued`), so
a node long-polling one process gets a run submitted through another at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, and_, create_engine, event, or_, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from phds_tre.hub.models import Run, RunEvent, utc_now

__all__ = [
    "MIGRATIONS",
    "QUEUED_CHANNEL",
    "SQLITE_BUSY_TIMEOUT_S",
    "Store",
    "default_db_url",
    "new_run_id",
]

_log = logging.getLogger(__name__)

#: The Alembic environment shipped with the package.
MIGRATIONS = Path(__file__).with_name("migrations")
#: Seconds an SQLite writer waits for another writer (another thread or hub process).
SQLITE_BUSY_TIMEOUT_S = 30.0
#: Arbitrary constant key of the PostgreSQL advisory lock held while migrating.
_PG_MIGRATION_LOCK = 0x70686473
#: PostgreSQL notification channel: payload ``"<origin> <site>"`` when a run is queued.
QUEUED_CHANNEL = "phds_run_queued"
#: Longest wait (seconds) before the queued-run listener reconnects after losing PostgreSQL.
_LISTEN_MAX_BACKOFF_S = 30.0


def default_db_url(data_dir: Path) -> str:
    """The default store: ``hub.sqlite`` in the hub's data folder."""
    return f"sqlite:///{(Path(data_dir) / 'hub.sqlite').resolve()}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers go on while one writer writes; foreign keys are off by default.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cursor.close()


#: Seconds after which a node may claim again a run it holds that is still queued. A
#: node that received a claim moves the run on (running, rejected, awaiting approval)
#: at once and only long-polls again when idle; a run still queued after this long had
#: its claim's answer lost on the way (a dropped connection). Handing it to the same
#: node again beats stranding it until the lease runs out.
RECLAIM_SILENCE_S = 30.0


class Store:
    """One database: migrated to the latest schema when opened; hands out sessions."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        """Open the database at ``url`` and (by default) run ``alembic upgrade head``."""
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.upgrade()

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql`` (or whatever the URL names)."""
        return self.engine.dialect.name

    def upgrade(self) -> None:
        """``alembic upgrade head`` with a Config built in code (no alembic.ini)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                # Transaction-scoped: released at commit, so only one process migrates.
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success, rolled back on any exception."""
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    # -- queued-run notifications between hub processes (PostgreSQL) -----------------------

    def announce_queued(self, sites: Iterable[str], origin: str) -> None:
        """Tell every hub process listening on this PostgreSQL that ``sites`` got a queued run.

        A no-op on SQLite (one file, normally one process: the long-poll's periodic
        re-check covers a second one). A failure is logged, not raised: the run is
        stored already and the re-check finds it within the poll interval.
        """
        if self.dialect != "postgresql":
            return
        try:
            with self.engine.begin() as conn:
                for site in sites:
                    conn.execute(
                        text("SELECT pg_notify(:channel, :payload)"),
                        {"channel": QUEUED_CHANNEL, "payload": f"{origin} {site}"},
                    )
        except SQLAlchemyError as exc:
            _log.warning("could not announce queued runs to other hub processes: %s", exc)

    async def watch_queued(self, on_queued: Callable[[str, str], None]) -> None:
        """Call ``on_queued(origin, site)`` for every announced queued run, until cancelled.

        PostgreSQL only (returns at once otherwise). ``LISTEN`` needs one dedicated
        connection outside SQLAlchemy's pool, so this uses psycopg's asyncio connection
        directly; a lost connection is re-opened with exponential back-off (runs announced
        meanwhile are found by the long-poll's periodic re-check).
        """
        if self.dialect != "postgresql":
            return
        import psycopg  # only a PostgreSQL hub needs the driver

        conninfo = self.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        backoff = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {QUEUED_CHANNEL}")
                    backoff = 0.5
                    async for note in conn.notifies():
                        origin, _, site = note.payload.partition(" ")
                        on_queued(origin, site)
            except (psycopg.Error, OSError) as exc:
                _log.warning("queued-run listener lost PostgreSQL (%s); retrying", exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _LISTEN_MAX_BACKOFF_S)

    # -- runs --------------------------------------------------------------------

    def claim_next(self, site: str, node_id: int, actor: str, lease_s: float = 300.0) -> str | None:
        """Claim the oldest claimable queued run of ``site`` for node ``node_id``; its id or None.

        A queued run is claimable when nobody holds it or the holder's lease ran out (a
        node that died) — and by its holder again once it has stayed queued for
        :data:`RECLAIM_SILENCE_S` (the node never received the claim). The claim leaves the status ``queued`` (the node moves it on)
        and records the claim in the run's history.
        """
        now = utc_now()
        lease = now + dt.timedelta(seconds=lease_s)
        claimable = and_(
            Run.site == site,
            Run.status == "queued",
            or_(
                Run.lease_until.is_(None),
                Run.lease_until < now,
                # The holder claims it again: the answer to its claim was lost on the way.
                and_(
                    Run.claimed_by == node_id,
                    Run.lease_until < lease - dt.timedelta(seconds=RECLAIM_SILENCE_S),
                ),
            ),
        )
        with self.session() as session:
            run_id: str | None
            if self.dialect == "postgresql":
                # Row locks: concurrent claimers skip a row another transaction holds.
                run_id = session.scalars(
                    select(Run.id)
                    .where(claimable)
                    .order_by(Run.created, Run.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).first()
                if run_id is None:
                    return None
                session.execute(
                    update(Run)
                    .where(Run.id == run_id)
                    .values(
                        claimed_by=node_id, lease_until=lease, claims=Run.claims + 1, updated=now
                    )
                )
            else:
                # One statement = one atomic write on SQLite: the WHERE re-checks the
                # status and lease under the write lock, so a run is claimed at most once.
                oldest = (
                    select(Run.id)
                    .where(claimable)
                    .order_by(Run.created, Run.id)
                    .limit(1)
                    .scalar_subquery()
                )
                run_id = session.execute(
                    update(Run)
                    .where(Run.id == oldest, claimable)
                    .values(
                        claimed_by=node_id, lease_until=lease, claims=Run.claims + 1, updated=now
                    )
                    .returning(Run.id)
                ).scalar_one_or_none()
                if run_id is None:
                    return None
            session.add(
                RunEvent(run_id=run_id, at=now, status="queued", actor=actor, detail="claimed")
            )
        return run_id

    def set_status(
        self,
        run_id: str,
        expected: str,
        status: str,
        actor: str,
        detail: str = "",
        *,
        cells_done: int | None = None,
        cells_total: int | None = None,
    ) -> bool:
        """Move a run from ``expected`` to ``status`` (compare-and-set); False if it moved meanwhile.

        Also used for a progress update (``status == expected``); a history entry is
        written only when the status changes.
        """
        now = utc_now()
        values: dict[str, Any] = {"status": status, "updated": now}
        if cells_done is not None:
            values["cells_done"] = cells_done
        if cells_total is not None:
            values["cells_total"] = cells_total
        if status != "queued":
            values["lease_until"] = None
        with self.session() as session:
            result = session.execute(
                update(Run).where(Run.id == run_id, Run.status == expected).values(**values)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                session.rollback()
                return False
            if status != expected:
                session.add(
                    RunEvent(run_id=run_id, at=now, status=status, actor=actor, detail=detail)
                )
        return True


def new_run_id() -> str:
    """A fresh run id (uuid4, text)."""
    return str(uuid.uuid4())
