"""Structured phds outputs: re-checked from their data, never trusted.

An output made through the safe API (``phds_tre.sdc``) carries a JSON payload
under :data:`STRUCTURED_MIME` with the published table and the evidence the
rules need. The kernel is untrusted (DESIGN.md, principle 3): the status it
wrote into the payload is ignored and :func:`phds_tre.sdc.recheck` re-runs the
rules with the site's policy. The ``text/plain`` and ``text/html`` companions
are not released as they are — the node regenerates them from the re-checked
output — and any other representation beside a structured one fails, because
it would leave unchecked.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from phds_tre.check.verdict import Verdict, as_status, worst
from phds_tre.sdc.policy import Policy

__all__ = [
    "REGENERATED_COMPANIONS",
    "STRUCTURED_MIME",
    "RecheckResult",
    "Rechecker",
    "check_structured",
    "load_recheck",
    "structured_kind",
]

#: The MIME type of a structured phds output (same string as ``phds_tre.sdc.MIME_TYPE``).
STRUCTURED_MIME = "application/vnd.phds.output+json"
#: Companions the node rebuilds from the re-checked output at release.
REGENERATED_COMPANIONS = frozenset({"text/plain", "text/html"})

_KIND = re.compile(r"[A-Za-z_][\w.\-]{0,39}")


class RecheckResult(Protocol):
    """What :func:`phds_tre.sdc.recheck` returns: a status and the reasons for it."""

    @property
    def status(self) -> str:
        """``pass``, ``review`` or ``fail``."""
        ...

    @property
    def reasons(self) -> Sequence[str]:
        """One sentence per reason."""
        ...


#: ``recheck(payload, policy)``: re-run the disclosure rules on a payload.
Rechecker = Callable[[dict[str, Any], Policy], RecheckResult]


def load_recheck() -> Rechecker | None:
    """``phds_tre.sdc.recheck`` if it is importable, else None.

    Imported lazily (and looked up by name) so that the checker works, and
    withholds structured outputs, even where the rules module cannot load.
    """
    try:
        module = importlib.import_module("phds_tre.sdc")
    except ImportError:
        return None
    recheck = getattr(module, "recheck", None)
    return recheck if callable(recheck) else None


def structured_kind(payload: object) -> str:
    """``structured/<kind>`` for a payload naming a plausible kind, else ``structured``."""
    kind = payload.get("kind") if isinstance(payload, dict) else None
    if isinstance(kind, str) and _KIND.fullmatch(kind):
        return f"structured/{kind}"
    return "structured"


def check_structured(
    data: Mapping[str, object], policy: Policy, recheck: Rechecker | None
) -> Verdict:
    """Verdict of a MIME bundle holding a structured output: the re-check, plus its companions."""
    payload = data.get(STRUCTURED_MIME)
    verdicts = [_recheck(payload, policy, recheck)]
    for mime in data:
        if mime == STRUCTURED_MIME:
            continue
        if mime in REGENERATED_COMPANIONS:
            verdicts.append(
                Verdict.passed(
                    f"{mime}: not released as-is; regenerated from the re-checked output"
                )
            )
        else:
            verdicts.append(
                Verdict.fail(
                    f"{mime}: not allowed beside a structured output (it would leave unchecked)"
                )
            )
    # Keep every note: the companion notes tell the reviewer what will be released.
    return Verdict(worst(v.status for v in verdicts), tuple(r for v in verdicts for r in v.reasons))


def _recheck(payload: object, policy: Policy, recheck: Rechecker | None) -> Verdict:
    if not isinstance(payload, dict):
        return Verdict.fail("structured output is not a JSON object")
    if recheck is None:
        return Verdict.fail(
            "structured output cannot be re-checked here (phds_tre.sdc.recheck is not available)"
        )
    try:
        result = recheck(payload, policy)
        rechecked = result.status
        reasons = [str(r) for r in result.reasons]
    except Exception as exc:  # the payload is untrusted: any crash means "not understood"
        return Verdict.fail(
            f"structured output could not be re-checked ({type(exc).__name__}: {exc})"
        )
    status = as_status(rechecked)
    if status is None:
        return Verdict.fail(f"re-check returned an unknown status {rechecked!r}")
    notes = getattr(result, "notes", None)
    if isinstance(notes, list):
        reasons.extend(str(n) for n in notes)
    else:
        claimed = payload.get("status")
        if claimed != status:
            reasons.append(
                f"the kernel claimed {claimed!r}; re-checked with the site policy: {status!r}"
            )
    if payload.get("policy_hash") == policy.hash:
        problem = _published_table_problem(payload, result)
        if problem is not None:
            return Verdict.fail(problem, *reasons)
    else:
        # Under another policy the kernel's table legitimately differs; the
        # release is rebuilt from the evidence with the site's policy either way.
        reasons.append("the kernel used another policy; the table is rebuilt with the site's")
    if not reasons:
        reasons.append(f"re-checked with the site policy: {status}")
    return Verdict(status, tuple(reasons))


def _published_table_problem(payload: dict[str, Any], result: object) -> str | None:
    """Compare the table the payload publishes with the one re-derived from its evidence.

    The rules run on the evidence; a kernel that edits the published ``table``
    (un-suppressing a cell, changing a count) would otherwise show one table
    and have another checked. Skipped when the re-check does not expose the
    re-derived output (a fake, or an older ``phds_tre.sdc``).
    """
    table = getattr(getattr(result, "output", None), "table", None)
    if table is None:
        return None
    try:
        to_json = importlib.import_module("phds_tre.sdc.output").table_to_json
    except (ImportError, AttributeError):
        return None
    try:
        expected = json.loads(json.dumps(to_json(table), allow_nan=False))
    except Exception as exc:  # a re-derived table that cannot be published is not understood
        return f"the re-derived table cannot be compared ({type(exc).__name__}: {exc})"
    if not _same_table(payload.get("table"), expected):
        return "the published table differs from the table re-derived from the evidence"
    return None


def _same_table(claimed: object, expected: object) -> bool:
    """Equal JSON; numbers within a relative tolerance (re-derived means may differ by ulps)."""
    if isinstance(expected, dict):
        return (
            isinstance(claimed, dict)
            and claimed.keys() == expected.keys()
            and all(_same_table(claimed[k], expected[k]) for k in expected)
        )
    if isinstance(expected, list):
        return (
            isinstance(claimed, list)
            and len(claimed) == len(expected)
            and all(_same_table(c, e) for c, e in zip(claimed, expected, strict=True))
        )
    numbers = (int, float)
    if isinstance(expected, numbers) and not isinstance(expected, bool):
        return (
            isinstance(claimed, numbers)
            and not isinstance(claimed, bool)
            and math.isclose(claimed, expected, rel_tol=1e-9, abs_tol=1e-12)
        )
    return type(claimed) is type(expected) and claimed == expected
