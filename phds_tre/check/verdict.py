"""Verdicts: ``pass``, ``review`` or ``fail``, with the reasons a person can read.

The order matters and is fixed by DESIGN.md: any ``fail`` makes the whole
output (and notebook) ``fail``; else any ``review`` makes it ``review``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["STATUSES", "Status", "Verdict", "as_status", "combine", "worst"]

Status = Literal["pass", "review", "fail"]

#: Statuses from best to worst; the index is the severity.
STATUSES: tuple[Status, ...] = ("pass", "review", "fail")
_RANK: dict[str, int] = {s: i for i, s in enumerate(STATUSES)}


def as_status(value: object) -> Status | None:
    """``value`` as a :data:`Status` if it is one of the three, else None."""
    for status in STATUSES:
        if value == status:
            return status
    return None


def worst(statuses: Iterable[Status]) -> Status:
    """The most severe status in ``statuses``; ``pass`` when there are none."""
    result: Status = "pass"
    for status in statuses:
        if _RANK[status] > _RANK[result]:
            result = status
    return result


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one representation, one output or one notebook.

    ``redact`` names fields of the output that are withheld even when the
    verdict is ``pass`` (an error output releases its name only).
    """

    status: Status
    reasons: tuple[str, ...] = ()
    redact: tuple[str, ...] = field(default=())

    @classmethod
    def passed(cls, *reasons: str) -> Verdict:
        """A ``pass`` verdict, optionally with notes."""
        return cls("pass", reasons)

    @classmethod
    def review(cls, *reasons: str) -> Verdict:
        """A ``review`` verdict: a site reviewer decides."""
        return cls("review", reasons)

    @classmethod
    def fail(cls, *reasons: str) -> Verdict:
        """A ``fail`` verdict: the output is withheld."""
        return cls("fail", reasons)

    def prefixed(self, prefix: str) -> Verdict:
        """The same verdict with every reason prefixed (e.g. by the MIME type it is about)."""
        return Verdict(self.status, tuple(f"{prefix}: {r}" for r in self.reasons), self.redact)


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """Worst status of ``verdicts``, with reasons and redactions concatenated without duplicates.

    When the result is not ``pass``, the notes of passing parts ("text without
    numbers") are dropped: the reader needs to see why it is held, not what was fine.
    """
    items = list(verdicts)
    status = worst(v.status for v in items)
    relevant = [v for v in items if status == "pass" or v.status != "pass"]
    reasons = tuple(dict.fromkeys(r for v in relevant for r in v.reasons))
    redact = tuple(dict.fromkeys(f for v in items for f in v.redact))
    return Verdict(status, reasons, redact)
