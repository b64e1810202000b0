"""Retention: the node deletes executed notebooks of finished runs after the site's period.

An executed notebook (``executed.ipynb``, ``checked.ipynb``), the kernel's scratch
folder (``work/``) and the images written for a reviewer (``review/``) can hold
row-level data; once a run is finished they are kept only ``[retention]
executed_days`` (site policy, default 30). What stays: ``run.json``, the bundle, the
release(s) and the audit trail. Runs that still wait for a person (approval, review)
or owe an upload are never purged. Age is the newest modification time among the
files to delete (lstat: a symlink the kernel left in its scratch is not followed).
Each purge is one audit entry (action ``run_finished``, ``event: executed_purged``:
the audit vocabulary is fixed, and the end of a run's life at the site is the
nearest action).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from phds_tre.audit import AuditLog
from phds_tre.node.state import LocalRun, NodeState

__all__ = ["FINISHED", "PurgedRun", "purge_executed"]

log = logging.getLogger("phds_tre.node")

#: Local statuses after which the node owes nothing that needs the executed notebook.
FINISHED: frozenset[str] = frozenset({"uploaded", "failed", "rejected"})
_FILES = ("executed.ipynb", "checked.ipynb")
_FOLDERS = ("work", "review")
_DAY_S = 86_400.0


@dataclass(frozen=True)
class PurgedRun:
    """What was deleted for one run (paths relative to the run's folder)."""

    run_id: str
    deleted: list[str]


def _targets(run: LocalRun) -> list[Path]:
    """The purgeable paths of a run: its ``out/`` and every earlier attempt's folder."""
    run_dir = run.out_dir.parent
    outs = [run.out_dir, *sorted(run_dir.glob(f"{run.out_dir.name}.attempt-*"))]
    found = []
    for out in outs:
        for name in (*_FILES, *_FOLDERS):
            path = out / name
            if path.is_symlink() or path.exists():
                found.append(path)
    return found


def _mtimes(path: Path) -> Iterator[float]:
    yield path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                yield os.lstat(os.path.join(root, name)).st_mtime


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def purge_executed(
    state: NodeState,
    audit: AuditLog,
    executed_days: int,
    *,
    actor: str,
    now: float | None = None,
) -> list[PurgedRun]:
    """Delete the executed notebooks of finished runs older than ``executed_days``.

    ``now`` is the current time (seconds since the epoch; default: the clock).
    Returns what was deleted, one entry per run; each is also an audit entry.
    """
    cutoff = (time.time() if now is None else now) - executed_days * _DAY_S
    purged = []
    for run in state.runs(FINISHED):
        targets = _targets(run)
        if not targets:
            continue
        try:
            newest = max(t for path in targets for t in _mtimes(path))
        except OSError:  # changed while we looked: next time
            continue
        if newest > cutoff:
            continue
        deleted, failed = [], []
        run_dir = run.out_dir.parent
        for path in targets:
            try:
                _delete(path)
                deleted.append(path.relative_to(run_dir).as_posix())
            except OSError as exc:
                failed.append(f"{path.relative_to(run_dir).as_posix()}: {exc.strerror or exc}")
        if not deleted and not failed:
            continue
        details: dict[str, object] = {
            "event": "executed_purged",
            "retention_days": executed_days,
            "deleted": deleted,
        }
        if failed:
            details["not_deleted"] = failed
            log.warning("run %s: retention could not delete %s", run.run_id, "; ".join(failed))
        audit.append(actor, "run_finished", run.run_id, details)
        purged.append(PurgedRun(run.run_id, deleted))
    return purged
