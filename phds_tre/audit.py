"""Tamper-evident audit trail: a hash-chained, append-only log (hub and every node).

Every submission, approval, run, verdict, review decision, release and download
is appended as one :class:`AuditEntry` saying who (``actor``), when (``at``,
UTC ISO-8601 with microseconds), what (``action``, a fixed vocabulary) and to
what (``subject``, e.g. a study or run id), with free ``details`` (a JSON
object).

Each entry's ``hash`` is ``sha256(prev_hash || canonical JSON of (seq, at,
actor, action, subject, details))`` where ``prev_hash`` is the previous
entry's hash (64 zeros for the first). :meth:`AuditLog.verify` recomputes the
chain and names, by ``seq``, every entry that was edited, moved, deleted from
the middle or forged with a wrong link. A deleted *tail* leaves a valid shorter
chain; it is found only against an anchor (:meth:`AuditLog.anchor`, the head's
``(count, hash)``) that the node has published to the hub (or the hub to its
operators). Someone with write access can still rewrite the whole chain
consistently, or append a well-linked forged entry after the last anchor: the
anchor bounds what can be rewritten undetected, it does not authenticate
entries.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "ACTIONS",
    "GENESIS_HASH",
    "AuditAnchor",
    "AuditEntry",
    "AuditLog",
    "AuditLogError",
    "AuditVerification",
    "canonical_json",
    "entry_hash",
    "format_entries",
    "parse_anchor",
]

#: ``prev_hash`` of the first entry.
GENESIS_HASH = "0" * 64

#: The actions an audit entry may record; anything else is a ``ValueError``.
ACTIONS: tuple[str, ...] = (
    "submission",
    "approval",
    "rejection",
    "run_started",
    "run_finished",
    "run_failed",
    "verdict",
    "review_decision",
    "release",
    "download",
    "key_accepted",
    "key_revoked",
    "policy_changed",
)

_COLUMNS = ("seq", "at", "actor", "action", "subject", "details", "prev_hash", "hash")

# Storage: the standard library's sqlite3, not SQLAlchemy Core (the future hub/node
# store), because SQLAlchemy is not a dependency yet. The schema is plain SQL in one
# table so that the hub's Alembic migration can adopt it unchanged. The triggers make
# the table append-only for ordinary writers (an UPDATE or DELETE aborts); someone
# with write access to the file can drop them, which is what the hash chain is for.
_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS audit_log (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        details TEXT NOT NULL, -- canonical JSON object
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )
    """,
    """
    CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END
    """,
)

#: Seconds a writer waits for another process's append to finish.
_BUSY_TIMEOUT = 30.0

#: Above this many broken entries, verify() stops looking for where each came from.
_MOVED_SEARCH_LIMIT = 256


class AuditLogError(ValueError):
    """The file is missing, unreadable or not an audit log (one-line message)."""


class AuditAnchor(NamedTuple):
    """The head of a chain, to publish elsewhere: entry ``length`` has hash ``head_hash``.

    A plain ``(count, head_hash)`` tuple; the first field is called ``length``
    because ``tuple.count`` is taken.
    """

    length: int
    head_hash: str


@dataclass(frozen=True)
class AuditEntry:
    """One audit record, as stored."""

    seq: int
    at: str
    actor: str
    action: str
    subject: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class AuditVerification:
    """The outcome of :meth:`AuditLog.verify`: every problem, one sentence each."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    count: int = 0
    head_hash: str = GENESIS_HASH


def canonical_json(value: Any) -> str:
    """JSON with sorted keys, no spaces, UTF-8 text and no NaN: one text per value."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def entry_hash(
    prev_hash: str,
    seq: int,
    at: str,
    actor: str,
    action: str,
    subject: str,
    details: Mapping[str, Any],
) -> str:
    """The chain hash of one entry: sha256 of ``prev_hash`` then the canonical JSON of its fields."""
    payload = canonical_json(
        {
            "seq": seq,
            "at": at,
            "actor": actor,
            "action": action,
            "subject": subject,
            "details": details,
        }
    )
    return hashlib.sha256(prev_hash.encode("ascii") + payload.encode("utf-8")).hexdigest()


def _is_hash(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def parse_anchor(text: str) -> AuditAnchor:
    """Parse ``COUNT:HASH`` (as printed by ``phds audit verify``); ``ValueError`` if malformed."""
    count_text, sep, hash_text = text.strip().partition(":")
    if not sep or not count_text.isdigit() or not _is_hash(hash_text.lower()):
        raise ValueError(f"bad anchor {text!r}: expected COUNT:HASH (a number, then 64 hex digits)")
    return AuditAnchor(int(count_text), hash_text.lower())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _valid_time(value: str) -> bool:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    offset = parsed.utcoffset()
    return offset is not None and not offset


class AuditLog:
    """An append-only, hash-chained audit log in one SQLite file.

    ``AuditLog(path)`` creates the file and table if needed; with
    ``create=False`` a missing file or one that is not an audit log raises
    :class:`AuditLogError`. Each operation opens its own connection, so one
    object can be shared by threads, and any number of processes may append
    to the same file: appends are serialised by ``BEGIN IMMEDIATE``.
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        """Open (and with ``create``, make) the audit log at ``path``."""
        self.path = Path(path)
        if create:
            try:
                with self._write() as conn:
                    for statement in _SCHEMA:
                        conn.execute(statement)
            except sqlite3.Error as exc:
                raise AuditLogError(f"{self.path}: cannot open audit log ({exc})") from None
        elif not self.path.is_file():
            raise AuditLogError(f"{self.path}: no such file")
        self._check_schema()

    # -- connections -------------------------------------------------------------

    def _connect(self, mode: str) -> sqlite3.Connection:
        uri = f"{self.path.resolve().as_uri()}?mode={mode}"
        return sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT, isolation_level=None)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before anything is read (no forked chain)."""
        with closing(self._connect("rwc")) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction (a consistent snapshot), never creating or writing."""
        with closing(self._connect("ro")) as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("ROLLBACK")

    def _check_schema(self) -> None:
        try:
            with self._read() as conn:
                columns = [row[1] for row in conn.execute("PRAGMA table_info(audit_log)")]
        except sqlite3.Error as exc:
            raise AuditLogError(f"{self.path}: not an audit log ({exc})") from None
        if not columns:
            raise AuditLogError(f"{self.path}: not an audit log (no audit_log table)")
        if tuple(columns) != _COLUMNS:
            raise AuditLogError(
                f"{self.path}: not an audit log (audit_log has columns {', '.join(columns)})"
            )

    # -- writing -----------------------------------------------------------------

    def append(
        self, actor: str, action: str, subject: str, details: Mapping[str, Any] | None = None
    ) -> AuditEntry:
        """Append one entry and return it as stored (its ``seq`` and ``hash`` included).

        ``actor`` is a non-empty user or token name, ``action`` one of
        :data:`ACTIONS`, ``subject`` what it is about (a study, run or release
        id), ``details`` a JSON-serialisable mapping. Raises ``ValueError`` for
        anything else. The head is read inside the write transaction, so
        concurrent appends (threads or processes) extend one chain.
        """
        if not isinstance(actor, str) or not actor.strip():
            raise ValueError("actor must be a non-empty string")
        if action not in ACTIONS:
            raise ValueError(
                f"unknown audit action {action!r}; expected one of {', '.join(ACTIONS)}"
            )
        if not isinstance(subject, str):
            raise ValueError("subject must be a string")
        if details is None:
            details = {}
        if not isinstance(details, Mapping):
            raise ValueError("details must be a mapping (a JSON object)")
        try:
            details_json = canonical_json(dict(details))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"details must be JSON-serialisable: {exc}") from None
        stored_details: dict[str, Any] = json.loads(details_json)
        with self._write() as conn:
            head = conn.execute(
                "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            seq, prev_hash = (1, GENESIS_HASH) if head is None else (head[0] + 1, str(head[1]))
            at = _now()
            digest = entry_hash(prev_hash, seq, at, actor, action, subject, stored_details)
            conn.execute(
                "INSERT INTO audit_log (seq, at, actor, action, subject, details, prev_hash, hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, at, actor, action, subject, details_json, prev_hash, digest),
            )
        return AuditEntry(seq, at, actor, action, subject, stored_details, prev_hash, digest)

    # -- reading -----------------------------------------------------------------

    def entries(self, *, last: int | None = None) -> list[AuditEntry]:
        """All entries in ``seq`` order, or only the ``last`` ones.

        Reading does not verify: an entry whose stored details are not a JSON
        object comes back with ``details == {"<unparseable>": <stored text>}``
        (:meth:`verify` names it).
        """
        query = "SELECT seq, at, actor, action, subject, details, prev_hash, hash FROM audit_log"
        with self._read() as conn:
            if last is None:
                rows = conn.execute(f"{query} ORDER BY seq").fetchall()
            else:
                rows = conn.execute(
                    f"{query} ORDER BY seq DESC LIMIT ?", (max(last, 0),)
                ).fetchall()
                rows.reverse()
        return [_entry_from_row(row) for row in rows]

    def anchor(self) -> AuditAnchor:
        """The current head ``(count, head_hash)``, for a node to publish to the hub.

        Does not verify the chain (call :meth:`verify` for that). After an
        append, ``AuditAnchor(entry.seq, entry.hash)`` is the same thing.
        """
        with self._read() as conn:
            head = conn.execute(
                "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        return AuditAnchor(0, GENESIS_HASH) if head is None else AuditAnchor(head[0], str(head[1]))

    def verify(self, expected_head: tuple[int, str] | None = None) -> AuditVerification:
        """Recompute the chain and name every problem by ``seq``.

        Finds edited entries (contents no longer match their hash), moved
        entries (reordered: an entry's contents hash correctly at another
        ``seq``), entries deleted from the start or middle (a ``seq`` gap),
        forged or re-hashed entries (their ``prev_hash`` is not the previous
        entry's hash), malformed fields, and, given ``expected_head`` (an
        earlier :meth:`anchor`), a deleted tail or a history rewritten up to
        the anchor. Entries appended after the anchor are accepted.
        """
        problems: list[tuple[int, str]] = []
        broken: dict[int, tuple[Any, ...]] = {}  # seq -> row whose own hash is wrong
        count = 0
        head_hash = GENESIS_HASH
        head_seq = 0
        anchor_seen = False
        prev_seq = 0
        prev_hash: Any = GENESIS_HASH
        prev_broken = False
        with self._read() as conn:
            rows = conn.execute(
                "SELECT seq, at, actor, action, subject, details, prev_hash, hash"
                " FROM audit_log ORDER BY seq"
            )
            for row in rows:
                seq = row[0]
                count += 1
                if seq != prev_seq + 1:  # rows come in seq order (the primary key)
                    first, last = prev_seq + 1, seq - 1
                    where = f"entry {first}" if first == last else f"entries {first}-{last}"
                    problems.append((first, f"{where}: missing (deleted)"))
                own_ok, malformed = _check_row(row)
                for message in malformed:
                    problems.append((seq, f"entry {seq}: {message}"))
                if not own_ok:
                    broken[seq] = tuple(row)
                elif seq == prev_seq + 1 and not prev_broken and row[6] != prev_hash:
                    # After a gap or a broken entry the link is already accounted for.
                    before = "the genesis hash" if seq == 1 else f"entry {prev_seq}’s hash"
                    problems.append(
                        (
                            seq,
                            f"entry {seq}: its prev_hash is not {before}: a forged or "
                            "inserted entry, or the entry before it was rewritten",
                        )
                    )
                if expected_head is not None and seq == expected_head[0]:
                    anchor_seen = True
                    if row[7] != expected_head[1]:
                        problems.append(
                            (
                                seq,
                                f"entry {seq}: hash differs from the anchor "
                                f"{expected_head[0]}:{expected_head[1]} (history rewritten)",
                            )
                        )
                prev_seq, prev_hash, prev_broken = seq, row[7], not own_ok
                head_seq, head_hash = seq, str(row[7])
            if broken:
                problems.extend(self._explain_broken(conn, broken))
        if expected_head is not None and not anchor_seen:
            want_count, want_hash = expected_head
            if want_count == 0:
                if want_hash != GENESIS_HASH:
                    problems.append((0, "the anchor for 0 entries must be the genesis hash"))
            elif head_seq < want_count:
                first = head_seq + 1
                where = f"entry {first}" if first == want_count else f"entries {first}-{want_count}"
                problems.append(
                    (
                        first,
                        f"{where}: missing (deleted from the end; the anchor names entry "
                        f"{want_count}, the log ends at {head_seq})",
                    )
                )
            # else: the anchored seq falls in a gap, which is already named.
        problems.sort(key=lambda item: item[0])
        messages = [message for _, message in problems]
        return AuditVerification(
            ok=not messages, problems=messages, count=count, head_hash=head_hash
        )

    def _explain_broken(
        self, conn: sqlite3.Connection, broken: dict[int, tuple[Any, ...]]
    ) -> list[tuple[int, str]]:
        """Name each entry whose hash is wrong: moved from another ``seq``, or edited."""
        wanted = {row[6] for row in broken.values() if isinstance(row[6], str)}
        seq_of: dict[str, int] = {}
        for seq, digest in conn.execute("SELECT seq, hash FROM audit_log"):
            if digest in wanted:
                seq_of.setdefault(digest, seq)
        problems: list[tuple[int, str]] = []
        for seq, row in broken.items():
            candidates: list[int] = []
            if row[6] in seq_of:
                candidates.append(seq_of[row[6]] + 1)
            if len(broken) <= _MOVED_SEARCH_LIMIT:
                candidates.extend(other for other in broken if other not in candidates)
            origin = next((c for c in candidates if c != seq and _hash_ok(row, as_seq=c)), None)
            if origin is not None:
                problems.append(
                    (seq, f"entry {seq}: holds entry {origin}’s contents (entries reordered)")
                )
            else:
                problems.append((seq, f"entry {seq}: contents do not match its hash (edited)"))
        return problems


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _parse_details(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _hash_ok(row: tuple[Any, ...], *, as_seq: int) -> bool:
    """Whether the row's stored hash matches its contents placed at ``as_seq``."""
    _, at, actor, action, subject, details_text, prev_hash, digest = row
    details = _parse_details(details_text)
    if details is None or not all(
        isinstance(v, str) for v in (at, actor, action, subject, prev_hash)
    ):
        return False
    try:
        return entry_hash(prev_hash, as_seq, at, actor, action, subject, details) == digest
    except (UnicodeEncodeError, ValueError):
        return False


def _check_row(row: tuple[Any, ...]) -> tuple[bool, list[str]]:
    """Whether the row's own hash is right, and what is malformed in it."""
    seq, at, actor, action, _subject, details_text, prev_hash, digest = row
    malformed: list[str] = []
    for name, value in zip(_COLUMNS[1:], row[1:], strict=True):
        if not isinstance(value, str):
            malformed.append(f"{name} is not text")
    if isinstance(actor, str) and not actor.strip():
        malformed.append("actor is empty")
    if isinstance(action, str) and action not in ACTIONS:
        malformed.append(f"unknown action {action!r}")
    if isinstance(at, str) and not _valid_time(at):
        malformed.append(f"time {at!r} is not UTC ISO-8601")
    if isinstance(details_text, str):
        details = _parse_details(details_text)
        if details is None:
            malformed.append("details are not a JSON object")
        elif canonical_json(details) != details_text:
            malformed.append("details are not canonical JSON")
    for name, value in (("prev_hash", prev_hash), ("hash", digest)):
        if isinstance(value, str) and not _is_hash(value):
            malformed.append(f"{name} is not a sha256 hex digest")
    return _hash_ok(row, as_seq=seq), malformed


def _entry_from_row(row: tuple[Any, ...]) -> AuditEntry:
    seq, at, actor, action, subject, details_text, prev_hash, digest = row
    details = _parse_details(details_text)
    if details is None:
        details = {"<unparseable>": str(details_text)}
    return AuditEntry(
        seq=int(seq),
        at=str(at),
        actor=str(actor),
        action=str(action),
        subject=str(subject),
        details=details,
        prev_hash=str(prev_hash),
        hash=str(digest),
    )


def _shown(text: str, width: int) -> str:
    # Fields come from the file (anyone with write access could put anything there).
    clean = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return clean if len(clean) <= width else clean[: width - 1] + "…"


def format_entries(entries: list[AuditEntry], *, details_width: int = 60) -> str:
    """The entries as a plain-text table (seq, time, actor, action, subject, details, hash)."""
    header = ("seq", "at (UTC)", "actor", "action", "subject", "details", "hash")
    rows = [
        (
            str(e.seq),
            _shown(e.at, 32),
            _shown(e.actor, 32),
            _shown(e.action, 20),
            _shown(e.subject, 40),
            _shown(canonical_json(e.details), details_width),
            e.hash[:12],
        )
        for e in entries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)
