"""The node's local record of the runs it has claimed (``work_dir/node.sqlite``).

Stdlib :mod:`sqlite3` rather than SQLAlchemy: one small table, one process writing
it (plus the occasional ``phds node approve``), and every change is a compare-and-set
in its own ``BEGIN IMMEDIATE`` transaction — the same approach as
:class:`phds_tre.audit.AuditLog`, with no ORM session or engine to manage. A crash at
any point leaves each run in exactly one status, from which :class:`NodeAgent
<phds_tre.node.agent.NodeAgent>` resumes.

Local statuses (the hub has its own lifecycle; these say what the *node* still owes):

``claimed``            claimed at the hub, not started yet
``running``            a :class:`~phds_tre.run.SiteRun` is (or was, before a crash) running
``awaiting_approval``  the code gate wants the site admin's approval
``approved``           the site admin approved it; the agent re-runs it with ``approved=True``
``releasing``          the signed release is built; uploading it is still owed
``awaiting_review``    release uploaded (held outputs as placeholders); outputs held locally
``uploaded``           release uploaded, nothing held
``failed``/``rejected`` finished without a release (``reported`` says whether the hub knows)
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["ACTIVE", "STATUSES", "TERMINAL", "LocalRun", "NodeState", "StateError"]

STATUSES: tuple[str, ...] = (
    "claimed",
    "running",
    "awaiting_approval",
    "approved",
    "releasing",
    "awaiting_review",
    "uploaded",
    "failed",
    "rejected",
)
#: Statuses of a run that was interrupted if found at start-up.
ACTIVE: frozenset[str] = frozenset({"claimed", "running"})
#: Statuses after which the node owes nothing more (once ``reported``).
TERMINAL: frozenset[str] = frozenset({"awaiting_review", "uploaded", "failed", "rejected"})

#: Which local moves are allowed (``running`` → ``running`` is a re-run after a crash).
TRANSITIONS: dict[str, frozenset[str]] = {
    "claimed": frozenset({"running", "failed", "rejected"}),
    "running": frozenset({"running", "awaiting_approval", "releasing", "failed", "rejected"}),
    "awaiting_approval": frozenset({"approved", "rejected", "failed"}),
    "approved": frozenset({"running", "failed"}),
    "releasing": frozenset({"uploaded", "awaiting_review", "failed"}),
    "awaiting_review": frozenset(),
    "uploaded": frozenset(),
    "failed": frozenset(),
    "rejected": frozenset(),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    study_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    out_dir TEXT NOT NULL,
    parameters TEXT NOT NULL DEFAULT '{}',
    detail TEXT NOT NULL DEFAULT '',
    reported INTEGER NOT NULL DEFAULT 0,
    release_sha256 TEXT,
    claimed_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    uploaded_at TEXT
)
"""


class StateError(ValueError):
    """A local status change that the lifecycle does not allow, or an unknown run."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class LocalRun:
    """One row of the node's run table."""

    run_id: str
    study_id: str
    status: str
    attempts: int
    out_dir: Path
    parameters: dict[str, Any]
    detail: str
    reported: bool
    release_sha256: str | None
    claimed_at: str
    updated_at: str
    uploaded_at: str | None


_COLUMNS = (
    "run_id, study_id, status, attempts, out_dir, parameters, detail, reported, "
    "release_sha256, claimed_at, updated_at, uploaded_at"
)


def _row(row: tuple[Any, ...]) -> LocalRun:
    return LocalRun(
        run_id=row[0],
        study_id=row[1],
        status=row[2],
        attempts=int(row[3]),
        out_dir=Path(row[4]),
        parameters=json.loads(row[5]),
        detail=row[6],
        reported=bool(row[7]),
        release_sha256=row[8],
        claimed_at=row[9],
        updated_at=row[10],
        uploaded_at=row[11],
    )


class NodeState:
    """The node's SQLite run table; every change is one transaction."""

    def __init__(self, path: str | Path) -> None:
        """Open (creating if needed) the state database at ``path``."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._tx() as db:
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- reading ---------------------------------------------------------------------
    def get(self, run_id: str) -> LocalRun | None:
        """The run ``run_id``, or None when this node never claimed it."""
        with closing(self._connect()) as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _row(row) if row else None

    def runs(self, statuses: Iterable[str] | None = None) -> list[LocalRun]:
        """Every run (or those in ``statuses``), oldest claim first."""
        with closing(self._connect()) as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM runs ORDER BY claimed_at, run_id").fetchall()
        wanted = set(statuses) if statuses is not None else None
        return [r for r in map(_row, rows) if wanted is None or r.status in wanted]

    # -- changing --------------------------------------------------------------------
    def claim(
        self, run_id: str, study_id: str, out_dir: Path, parameters: Mapping[str, Any]
    ) -> tuple[LocalRun, bool]:
        """Record a run claimed at the hub; (the run, whether it is new).

        A run the node already knows (the hub handed it out again) is returned unchanged.
        """
        now = _now()
        with self._tx() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row:
                return _row(row), False
            db.execute(
                "INSERT INTO runs (run_id, study_id, status, attempts, out_dir, parameters, "
                "claimed_at, updated_at) VALUES (?, ?, 'claimed', 0, ?, ?, ?, ?)",
                (run_id, study_id, str(out_dir), json.dumps(dict(parameters)), now, now),
            )
            created = db.execute(
                f"SELECT {_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        return _row(created), True

    def move(
        self,
        run_id: str,
        to: str,
        *,
        expect: Iterable[str] | None = None,
        detail: str | None = None,
        attempt: bool = False,
        reset_attempts: bool = False,
        reported: bool | None = None,
        release_sha256: str | None = None,
        uploaded: bool = False,
    ) -> LocalRun:
        """Move ``run_id`` to ``to`` (compare-and-set in one transaction); the updated run.

        ``expect`` narrows the statuses the run may be in; ``attempt`` counts a new
        execution attempt. Raises :class:`StateError` for an unknown run or a move the
        lifecycle (or ``expect``) does not allow.
        """
        if to not in STATUSES:
            raise StateError(f"unknown local status {to!r}")
        with self._tx() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise StateError(f"no local run {run_id}")
            current = _row(row)
            allowed = TRANSITIONS[current.status]
            if to not in allowed or (expect is not None and current.status not in set(expect)):
                raise StateError(f"run {run_id} is {current.status}, it cannot become {to}")
            now = _now()
            sets = ["status = ?", "updated_at = ?"]
            values: list[Any] = [to, now]
            if detail is not None:
                sets.append("detail = ?")
                values.append(detail[:2000])
            if attempt:
                sets.append("attempts = attempts + 1")
            if reset_attempts:
                sets.append("attempts = 0")
            if reported is not None:
                sets.append("reported = ?")
                values.append(int(reported))
            if release_sha256 is not None:
                sets.append("release_sha256 = ?")
                values.append(release_sha256)
            if uploaded:
                sets.append("uploaded_at = ?")
                values.append(now)
            db.execute(
                f"UPDATE runs SET {', '.join(sets)} WHERE run_id = ? AND status = ?",
                (*values, run_id, current.status),
            )
            updated = db.execute(
                f"SELECT {_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        return _row(updated)

    def mark_reported(self, run_id: str, detail: str | None = None) -> None:
        """The hub knows this run's current status."""
        with self._tx() as db:
            if detail is None:
                db.execute("UPDATE runs SET reported = 1 WHERE run_id = ?", (run_id,))
            else:
                db.execute(
                    "UPDATE runs SET reported = 1, detail = ? WHERE run_id = ?", (detail, run_id)
                )

    def unreported(self) -> list[LocalRun]:
        """Runs whose status the hub still has to be told (rejected, failed, awaiting approval)."""
        return [r for r in self.runs(("failed", "rejected", "awaiting_approval")) if not r.reported]
