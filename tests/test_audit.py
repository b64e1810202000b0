"""The hash-chained audit log: appends, every kind of tampering, concurrency, ``phds audit``."""

from __future__ import annotations

import itertools
import json
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from phds_tre.audit import (
    ACTIONS,
    GENESIS_HASH,
    AuditAnchor,
    AuditLog,
    AuditLogError,
    canonical_json,
    entry_hash,
    parse_anchor,
)

PHDS = Path(sys.executable).with_name("phds")


def _log(path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(path)
    steps = ["submission", "approval", "run_started", "run_finished", "verdict", "release"]
    for i in range(n):
        log.append(f"user-{i % 2}", steps[i % len(steps)], f"study-{i}", {"i": i, "note": "ok"})
    return log


def _tamper(path: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    """What someone with write access to the file can do: drop the guards, then write."""
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        conn.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
        for statement in statements:
            conn.execute(statement, params if "?" in statement else ())


def _row(path: Path, seq: int) -> tuple[object, ...]:
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT seq, at, actor, action, subject, details, prev_hash, hash"
            " FROM audit_log WHERE seq = ?",
            (seq,),
        ).fetchone()
    assert row is not None
    return tuple(row)


# -- appending and reading ------------------------------------------------------------


def test_append_and_verify_round_trip(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db")
    assert log.verify().ok and log.verify().count == 0
    assert log.anchor() == (0, GENESIS_HASH)
    first = log.append("alice", "submission", "study-1", {"sha256": "ab" * 32, "sites": ["A", "B"]})
    second = log.append("site-A-admin", "approval", "study-1", {})
    third = log.append("bob", "download", "release-1")

    assert (first.seq, second.seq, third.seq) == (1, 2, 3)
    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.hash and third.prev_hash == second.hash
    assert first.hash == entry_hash(
        GENESIS_HASH, 1, first.at, "alice", "submission", "study-1", first.details
    )
    assert log.entries() == [first, second, third]
    assert log.entries(last=2) == [second, third]

    at = datetime.fromisoformat(first.at)
    assert at.utcoffset() is not None and not at.utcoffset()
    assert len(first.at.split(".")[1].split("+")[0]) == 6  # microseconds

    result = log.verify()
    assert result.ok and result.problems == []
    assert (result.count, result.head_hash) == (3, third.hash)
    assert log.anchor() == AuditAnchor(3, third.hash) == (third.seq, third.hash)
    assert log.verify(expected_head=log.anchor()).ok
    # A reopened log continues the same chain.
    fourth = AuditLog(tmp_path / "audit.db").append("bob", "download", "release-1")
    assert fourth.seq == 4 and fourth.prev_hash == third.hash


def test_details_are_stored_as_canonical_json(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db")
    entry = log.append("alice", "verdict", "run-1", {"b": (1, 2), "a": "é"})
    assert entry.details == {"a": "é", "b": [1, 2]}
    assert (
        _row(tmp_path / "audit.db", 1)[5] == canonical_json(entry.details) == '{"a":"é","b":[1,2]}'
    )


@pytest.mark.parametrize(
    ("actor", "action", "details", "message"),
    [
        ("alice", "deleted_everything", {}, "unknown audit action"),
        ("", "download", {}, "actor"),
        ("   ", "download", {}, "actor"),
        ("alice", "download", {"x": object()}, "JSON-serialisable"),
        ("alice", "download", {"x": float("nan")}, "JSON-serialisable"),
        ("alice", "download", ["not", "a", "mapping"], "mapping"),
    ],
)
def test_bad_entries_are_value_errors(
    tmp_path: Path, actor: str, action: str, details: object, message: str
) -> None:
    log = AuditLog(tmp_path / "audit.db")
    with pytest.raises(ValueError, match=message):
        log.append(actor, action, "study-1", details)  # type: ignore[arg-type]
    assert log.entries() == []


def test_vocabulary_covers_the_issue() -> None:
    for action in (
        "submission",
        "approval",
        "run_started",
        "run_finished",
        "verdict",
        "review_decision",
        "release",
        "download",
    ):
        assert action in ACTIONS


def test_table_is_append_only_for_ordinary_writers(tmp_path: Path) -> None:
    _log(tmp_path / "audit.db", 2)
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM audit_log WHERE seq = 2")


def test_opening_without_create(tmp_path: Path) -> None:
    with pytest.raises(AuditLogError, match="no such file"):
        AuditLog(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
    (tmp_path / "text.db").write_text("not a database at all, just some text\n" * 50)
    with pytest.raises(AuditLogError, match="not an audit log"):
        AuditLog(tmp_path / "text.db", create=False)
    with sqlite3.connect(tmp_path / "other.db") as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(AuditLogError, match="no audit_log table"):
        AuditLog(tmp_path / "other.db", create=False)


def test_parse_anchor() -> None:
    assert parse_anchor(f"12:{'AB' * 32}") == AuditAnchor(12, "ab" * 32)
    for bad in ("12", f"x:{'a' * 64}", "12:abc", f"-1:{'a' * 64}", f"3:{'g' * 64}"):
        with pytest.raises(ValueError, match="COUNT:HASH"):
            parse_anchor(bad)


# -- tampering: every kind is named by seq ----------------------------------------------


def test_edited_details_are_named(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    _log(db)
    _tamper(db, """UPDATE audit_log SET details = '{"i":99,"note":"ok"}' WHERE seq = 3""")
    result = AuditLog(db).verify()
    assert not result.ok
    assert result.problems == ["entry 3: contents do not match its hash (edited)"]


def test_edited_actor_is_named(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    _log(db)
    _tamper(db, "UPDATE audit_log SET actor = 'mallory' WHERE seq = 2")
    assert AuditLog(db).verify().problems == ["entry 2: contents do not match its hash (edited)"]


def test_malformed_fields_are_named_too(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    _log(db)
    _tamper(
        db,
        "UPDATE audit_log SET action = 'coffee', details = 'nope', at = 'yesterday' WHERE seq = 4",
    )
    problems = AuditLog(db).verify().problems
    assert problems[-1] == "entry 4: contents do not match its hash (edited)"
    assert "entry 4: unknown action 'coffee'" in problems
    assert "entry 4: details are not a JSON object" in problems
    assert "entry 4: time 'yesterday' is not UTC ISO-8601" in problems
    assert all(p.startswith("entry 4: ") for p in problems)
    # Reading a tampered log still works (show must be able to display it).
    assert AuditLog(db).entries()[3].details == {"<unparseable>": "nope"}


@pytest.mark.parametrize(("a", "b"), [(3, 4), (2, 5)])
def test_swapped_rows_are_named_as_reordered(tmp_path: Path, a: int, b: int) -> None:
    db = tmp_path / "audit.db"
    _log(db, 6)
    row_a, row_b = _row(db, a), _row(db, b)
    update = (
        "UPDATE audit_log SET at = ?, actor = ?, action = ?, subject = ?, details = ?,"
        " prev_hash = ?, hash = ? WHERE seq = ?"
    )
    _tamper(db, update, params=(*row_b[1:], a))
    _tamper(db, update, params=(*row_a[1:], b))
    result = AuditLog(db).verify()
    assert result.problems == [
        f"entry {a}: holds entry {b}’s contents (entries reordered)",
        f"entry {b}: holds entry {a}’s contents (entries reordered)",
    ]


def test_deleted_middle_entry_is_named(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    _log(db, 6)
    _tamper(db, "DELETE FROM audit_log WHERE seq = 3")
    result = AuditLog(db).verify()
    assert result.problems == ["entry 3: missing (deleted)"]
    assert result.count == 5
    _tamper(db, "DELETE FROM audit_log WHERE seq IN (1, 4)")
    assert AuditLog(db).verify().problems == [
        "entry 1: missing (deleted)",
        "entries 3-4: missing (deleted)",
    ]


def test_deleted_tail_needs_an_anchor(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    log = _log(db, 6)
    anchor = log.anchor()
    assert anchor.length == 6
    _tamper(db, "DELETE FROM audit_log WHERE seq >= 5")

    # Without an anchor a truncated chain is a valid shorter chain: the limitation.
    plain = log.verify()
    assert plain.ok and plain.count == 4

    anchored = log.verify(expected_head=anchor)
    assert not anchored.ok
    assert anchored.problems == [
        "entries 5-6: missing (deleted from the end; the anchor names entry 6, the log ends at 4)"
    ]


def test_anchor_accepts_later_appends_and_catches_a_rewritten_history(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    log = _log(db, 4)
    anchor = log.anchor()
    log.append("carol", "review_decision", "run-1", {"output": 3, "decision": "approve"})
    assert log.verify(expected_head=anchor).ok

    # Someone with write access rewrites the whole chain consistently: the chain alone
    # verifies, the anchor published elsewhere does not.
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER audit_log_no_update")
        prev = GENESIS_HASH
        for seq, at, actor, action, subject, details in conn.execute(
            "SELECT seq, at, actor, action, subject, details FROM audit_log ORDER BY seq"
        ).fetchall():
            if seq == 2:
                actor = "mallory"
            digest = entry_hash(prev, seq, at, actor, action, subject, json.loads(details))
            conn.execute(
                "UPDATE audit_log SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (actor, prev, digest, seq),
            )
            prev = digest
    assert log.verify().ok
    assert log.verify(expected_head=anchor).problems == [
        f"entry 4: hash differs from the anchor 4:{anchor.head_hash} (history rewritten)"
    ]


def test_forged_entries_with_recomputed_hashes_are_named(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    _log(db, 5)
    at = "2030-01-01T00:00:00.000000+00:00"
    details = {"i": 0}
    insert = "INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)"

    # Appended at the end with a correct own hash, but linked to the wrong predecessor.
    forged = entry_hash(GENESIS_HASH, 6, at, "mallory", "download", "release-9", details)
    _tamper(
        db,
        insert,
        params=(
            6,
            at,
            "mallory",
            "download",
            "release-9",
            canonical_json(details),
            GENESIS_HASH,
            forged,
        ),
    )
    assert AuditLog(db).verify().problems == [
        "entry 6: its prev_hash is not entry 5’s hash: a forged or inserted entry,"
        " or the entry before it was rewritten"
    ]

    # Replacing a middle entry and recomputing its hash breaks the next entry's link.
    db2 = tmp_path / "audit2.db"
    _log(db2, 5)
    _, at3, _, action3, subject3, details3, prev3, _ = _row(db2, 3)
    rehashed = entry_hash(
        str(prev3), 3, str(at3), "mallory", str(action3), str(subject3), {"i": 2, "note": "ok"}
    )
    _tamper(
        db2, "UPDATE audit_log SET actor = 'mallory', hash = ? WHERE seq = 3", params=(rehashed,)
    )
    assert details3 == '{"i":2,"note":"ok"}'
    assert AuditLog(db2).verify().problems == [
        "entry 4: its prev_hash is not entry 3’s hash: a forged or inserted entry,"
        " or the entry before it was rewritten"
    ]


# -- concurrency -----------------------------------------------------------------------

_WORKER = """
import pathlib, sys, time
from phds_tre.audit import AuditLog
log = AuditLog(sys.argv[1])
go = pathlib.Path(sys.argv[2])
while not go.exists():
    time.sleep(0.002)
for i in range(int(sys.argv[4])):
    log.append("worker-" + sys.argv[3], "download", "release-" + str(i), {"i": i})
    time.sleep(0.001)  # let the others in between, so appends interleave
"""


def test_concurrent_processes_extend_one_chain(tmp_path: Path) -> None:
    db, go = tmp_path / "audit.db", tmp_path / "go"
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(db), str(go), str(w), "50"])
        for w in range(4)
    ]
    time.sleep(0.5)  # let them all open the log (and race to create it)
    go.touch()
    for worker in workers:
        assert worker.wait(timeout=60) == 0

    log = AuditLog(db)
    result = log.verify()
    assert result.ok, result.problems
    assert result.count == 200
    entries = log.entries()
    assert [e.seq for e in entries] == list(range(1, 201))
    for w in range(4):
        mine = [e.details["i"] for e in entries if e.actor == f"worker-{w}"]
        assert mine == list(range(50))
    switches = sum(a.actor != b.actor for a, b in itertools.pairwise(entries))
    assert switches > 3  # the workers' appends really were interleaved
    assert [e.at for e in entries] == sorted(e.at for e in entries)


def test_concurrent_threads_extend_one_chain(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db")

    def work(w: int) -> None:
        for i in range(25):
            log.append(f"thread-{w}", "verdict", f"run-{i}", {"i": i})

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = log.verify()
    assert result.ok and result.count == 100


# -- phds audit ------------------------------------------------------------------------


def _phds(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PHDS), "audit", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_verify_and_show(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    log = _log(db, 4)
    anchor = log.anchor()

    ok = _phds("verify", str(db))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"audit log verified: 4 entries, head {anchor.head_hash}\n"
    assert _phds("verify", str(db), "--head", f"{anchor.length}:{anchor.head_hash}").returncode == 0

    shown = _phds("show", str(db), "--last", "2")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split()[:3] == ["seq", "at", "(UTC)"]
    assert [line.split()[0] for line in lines[1:]] == ["3", "4"]
    assert "run_finished" in lines[-1] and "study-3" in lines[-1]

    _tamper(db, "DELETE FROM audit_log WHERE seq = 4")
    assert _phds("verify", str(db)).returncode == 0  # a deleted tail needs the anchor
    tail = _phds("verify", str(db), "--head", f"{anchor.length}:{anchor.head_hash}")
    assert tail.returncode == 1
    assert tail.stdout.splitlines() == [
        "entry 4: missing (deleted from the end; the anchor names entry 4, the log ends at 3)"
    ]

    _tamper(db, "UPDATE audit_log SET subject = 'study-x' WHERE seq = 2")
    bad = _phds("verify", str(db))
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == ["entry 2: contents do not match its hash (edited)"]


@pytest.mark.parametrize("kind", ["missing", "text", "other-db", "bad-head"])
def test_cli_bad_input_is_exit_2(tmp_path: Path, kind: str) -> None:
    db = tmp_path / "audit.db"
    args = ["verify", str(db)]
    if kind == "text":
        db.write_text("hello\n" * 200)
    elif kind == "other-db":
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE t (x)")
    elif kind == "bad-head":
        _log(db, 2)
        args += ["--head", "2:nothex"]
    result = _phds(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("phds: error: ")
    if kind == "missing":
        assert not db.exists()
        assert _phds("show", str(db)).returncode == 2
