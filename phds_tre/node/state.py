"""The node's local record of the runs it has claimed (``work_dir/node.sqlite``).

Stdlib :mod:`sqlite3` rather than SQLAlchemy: a few small tables, one agent writing
them (plus ``phds site …`` / ``phds review …`` and the local review API), and every
change is a compare-and-set in its own ``BEGIN IMMEDIATE`` transaction — the same
approach as :class:`phds_tre.audit.AuditLog`, with no ORM session or engine to
manage. A crash at any point leaves each run in exactly one status, from which
:class:`NodeAgent <phds_tre.node.agent.NodeAgent>` resumes.

Tables: ``runs`` (one row per claimed run), ``reviews`` (a run held for review: the
study's author, who released it), ``decisions`` (the current reviewer decision per
output, ``cell:output``; every change is also in the audit log) and
``reviewer_tokens`` (the local review API's bearer tokens, sha256 only). The schema
version is SQLite's ``user_version``; older files are migrated forward when opened.

Local statuses (the hub has its own lifecycle; these say what the *node* still owes):

``claimed``            claimed at the hub, not started yet
``running``            a :class:`~phds_tre.run.SiteRun` is (or was, before a crash) running
``awaiting_approval``  the code gate wants the site admin's approval
``approved``           the site admin approved it; the agent re-runs it with ``approved=True``
``awaiting_review``    outputs are held for the site's reviewer; nothing was uploaded
``reviewed``           a reviewer released it; building and signing the release is owed
``releasing``          the signed release is built; uploading it is still owed
``uploaded``           release uploaded
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

__all__ = [
    "ACTIVE",
    "STATUSES",
    "TERMINAL",
    "LocalRun",
    "NodeState",
    "ReviewRecord",
    "StateError",
    "StoredDecision",
]

STATUSES: tuple[str, ...] = (
    "claimed",
    "running",
    "awaiting_approval",
    "approved",
    "awaiting_review",
    "reviewed",
    "releasing",
    "uploaded",
    "failed",
    "rejected",
)
#: Statuses of a run that was interrupted if found at start-up.
ACTIVE: frozenset[str] = frozenset({"claimed", "running"})
#: Statuses after which the node owes nothing more (once ``reported``).
TERMINAL: frozenset[str] = frozenset({"uploaded", "failed", "rejected"})

#: Which local moves are allowed (``running`` → ``running`` is a re-run after a crash).
TRANSITIONS: dict[str, frozenset[str]] = {
    "claimed": frozenset({"running", "failed", "rejected"}),
    "running": frozenset(
        {"running", "awaiting_approval", "awaiting_review", "releasing", "failed", "rejected"}
    ),
    "awaiting_approval": frozenset({"approved", "rejected", "failed"}),
    "approved": frozenset({"running", "failed"}),
    "awaiting_review": frozenset({"reviewed", "failed"}),
    "reviewed": frozenset({"releasing", "failed"}),
    # → awaiting_review: a run built before the review queue existed, found unuploaded.
    "releasing": frozenset({"uploaded", "awaiting_review", "failed"}),
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

#: The schema version this code writes (SQLite ``user_version``); 0 is the original file.
SCHEMA_VERSION = 1

_REVIEW_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS reviews (
        run_id TEXT PRIMARY KEY REFERENCES runs (run_id),
        researcher TEXT NOT NULL,
        opened_at TEXT NOT NULL,
        released_by TEXT,
        released_at TEXT,
        release_comment TEXT NOT NULL DEFAULT ''
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS decisions (
        run_id TEXT NOT NULL REFERENCES reviews (run_id),
        output TEXT NOT NULL,
        decision TEXT NOT NULL,
        comment TEXT NOT NULL,
        reviewer TEXT NOT NULL,
        decided_at TEXT NOT NULL,
        PRIMARY KEY (run_id, output)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS reviewer_tokens (
        token_id TEXT PRIMARY KEY,
        reviewer TEXT NOT NULL,
        secret_sha256 TEXT NOT NULL,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    )
    """,
)

#: What version 0 → 1 says about a run that uploaded placeholders before the review queue.
_LEGACY_DETAIL = (
    "release uploaded before the review queue existed: held outputs were sent as "
    "placeholders and stay at the site"
)


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


def _get(db: sqlite3.Connection, run_id: str) -> LocalRun:
    row = db.execute(f"SELECT {_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None:
        raise StateError(f"no local run {run_id}")
    return _row(row)


def _move(
    db: sqlite3.Connection,
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
    """:meth:`NodeState.move` inside a transaction the caller holds."""
    if to not in STATUSES:
        raise StateError(f"unknown local status {to!r}")
    current = _get(db, run_id)
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
    return _get(db, run_id)


@dataclass(frozen=True)
class ReviewRecord:
    """A run held for review: the study's author and, once released, who released it."""

    run_id: str
    researcher: str
    opened_at: str
    released_by: str | None
    released_at: str | None
    release_comment: str


@dataclass(frozen=True)
class StoredDecision:
    """A reviewer's current decision on one output (``output`` is ``cell:output``)."""

    output: str
    decision: str
    comment: str
    reviewer: str
    decided_at: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready (API answers, the release manifest)."""
        return {
            "output": self.output,
            "decision": self.decision,
            "comment": self.comment,
            "reviewer": self.reviewer,
            "decided_at": self.decided_at,
        }


class NodeState:
    """The node's SQLite run table; every change is one transaction."""

    def __init__(self, path: str | Path) -> None:
        """Open (creating if needed) the state database at ``path``."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._tx() as db:
            db.execute(_SCHEMA)
            self._migrate(db)

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring an older file forward (inside the opening transaction; nothing is dropped)."""
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StateError(
                f"node state schema {version} is newer than this phds_tre ({SCHEMA_VERSION})"
            )
        for statement in _REVIEW_SCHEMA:
            db.execute(statement)
        if version < 1:
            # Version 0 uploaded a release with placeholders and parked the run in
            # ``awaiting_review`` for good; the hub has that release, so it is done here.
            db.execute(
                "UPDATE runs SET status = 'uploaded', detail = ? "
                "WHERE status = 'awaiting_review' AND uploaded_at IS NOT NULL",
                (_LEGACY_DETAIL,),
            )
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
        with self._tx() as db:
            return _move(
                db,
                run_id,
                to,
                expect=expect,
                detail=detail,
                attempt=attempt,
                reset_attempts=reset_attempts,
                reported=reported,
                release_sha256=release_sha256,
                uploaded=uploaded,
            )

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
        """Runs whose status the hub still has to be told (rejected, failed, awaiting a person)."""
        waiting = ("failed", "rejected", "awaiting_approval", "awaiting_review")
        return [r for r in self.runs(waiting) if not r.reported]

    # -- the review queue ------------------------------------------------------------
    def hold_for_review(self, run_id: str, researcher: str, detail: str) -> LocalRun:
        """``running`` → ``awaiting_review`` and open its review (one transaction)."""
        with self._tx() as db:
            run = _move(db, run_id, "awaiting_review", detail=detail, reported=False)
            db.execute(
                "INSERT OR IGNORE INTO reviews (run_id, researcher, opened_at) VALUES (?, ?, ?)",
                (run_id, researcher, _now()),
            )
        return run

    def review(self, run_id: str) -> ReviewRecord | None:
        """The review of ``run_id``, or None when it was never held for review."""
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT run_id, researcher, opened_at, released_by, released_at, "
                "release_comment FROM reviews WHERE run_id = ?",
                (run_id,),
            ).fetchone()
        return ReviewRecord(*row) if row else None

    def decisions(self, run_id: str) -> dict[str, StoredDecision]:
        """The current decision per output key of ``run_id``."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT output, decision, comment, reviewer, decided_at FROM decisions "
                "WHERE run_id = ? ORDER BY decided_at",
                (run_id,),
            ).fetchall()
        return {row[0]: StoredDecision(*row) for row in rows}

    def decide(
        self, run_id: str, output: str, decision: str, comment: str, reviewer: str
    ) -> StoredDecision:
        """Record (or change) the decision on one output while the run awaits review."""
        with self._tx() as db:
            run = _get(db, run_id)
            if run.status != "awaiting_review":
                raise StateError(f"run {run_id} is {run.status}: decisions are closed")
            stored = StoredDecision(output, decision, comment, reviewer, _now())
            db.execute(
                "INSERT OR REPLACE INTO decisions (run_id, output, decision, comment, reviewer, "
                "decided_at) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, output, decision, comment, reviewer, stored.decided_at),
            )
        return stored

    def release_review(
        self, run_id: str, reviewer: str, comment: str, required: Iterable[str]
    ) -> LocalRun:
        """``awaiting_review`` → ``reviewed`` once every ``required`` output is decided."""
        with self._tx() as db:
            decided = {
                row[0]
                for row in db.execute("SELECT output FROM decisions WHERE run_id = ?", (run_id,))
            }
            missing = [key for key in required if key not in decided]
            if missing:
                raise StateError(f"undecided output(s): {', '.join(missing)}")
            run = _move(
                db, run_id, "reviewed", expect={"awaiting_review"}, detail=f"released by {reviewer}"
            )
            db.execute(
                "UPDATE reviews SET released_by = ?, released_at = ?, release_comment = ? "
                "WHERE run_id = ?",
                (reviewer, _now(), comment, run_id),
            )
        return run

    # -- reviewer tokens (the local review API) --------------------------------------
    def add_reviewer_token(self, token_id: str, reviewer: str, secret_sha256: str) -> None:
        """Store a new reviewer token (its secret's sha256 only)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO reviewer_tokens (token_id, reviewer, secret_sha256, created_at) "
                "VALUES (?, ?, ?, ?)",
                (token_id, reviewer, secret_sha256, _now()),
            )

    def reviewer_token(self, token_id: str) -> tuple[str, str] | None:
        """(reviewer, secret sha256) of a live token, or None (unknown or revoked)."""
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT reviewer, secret_sha256 FROM reviewer_tokens "
                "WHERE token_id = ? AND revoked_at IS NULL",
                (token_id,),
            ).fetchone()
        return (str(row[0]), str(row[1])) if row else None

    def revoke_reviewer_token(self, token_id: str) -> bool:
        """Revoke a token; False when there is no live token with that id."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE reviewer_tokens SET revoked_at = ? "
                "WHERE token_id = ? AND revoked_at IS NULL",
                (_now(), token_id),
            )
        return cursor.rowcount == 1
