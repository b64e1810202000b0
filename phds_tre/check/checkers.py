"""The registry of checkers and the dispatch of one output to them.

A checker takes one representation's value and a :class:`CheckContext` and
returns a :class:`~phds_tre.check.verdict.Verdict`. MIME types are registered
explicitly; a MIME type without a checker fails ("not understood by the
checker"), because DESIGN.md principle 1 withholds what the checker does not
understand. A checker that crashes on odd data fails its output for the same
reason, rather than stopping the whole check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from phds_tre.check.html import check_html, check_markdown
from phds_tre.check.image import check_base64_image, check_svg
from phds_tre.check.structured import (
    STRUCTURED_MIME,
    Rechecker,
    check_structured,
    structured_kind,
)
from phds_tre.check.text import check_free_text, check_latex
from phds_tre.check.verdict import Verdict, combine
from phds_tre.sdc.policy import Policy

__all__ = [
    "REGISTRY",
    "SHARE_MIME",
    "CheckContext",
    "CheckerRegistry",
    "MimeChecker",
    "OutputCheck",
    "check_error",
    "check_output",
    "check_output_metadata",
    "text_of",
]


@dataclass(frozen=True)
class CheckContext:
    """What every checker may use: the site policy and the structured re-check."""

    policy: Policy
    recheck: Rechecker | None = None


MimeChecker = Callable[[object, CheckContext], Verdict]


@dataclass(frozen=True)
class _Entry:
    checker: MimeChecker
    kind: str


class CheckerRegistry:
    """MIME type → checker, plus the kind of output it stands for (``text``, ``image`` …)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(self, *mimes: str, kind: str) -> Callable[[MimeChecker], MimeChecker]:
        """Register a checker for each of ``mimes`` (exact and case-sensitive, as Jupyter)."""

        def decorate(checker: MimeChecker) -> MimeChecker:
            for mime in mimes:
                self._entries[mime] = _Entry(checker, kind)
            return checker

        return decorate

    def __contains__(self, mime: object) -> bool:
        return mime in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def kind_of(self, mime: str) -> str:
        """The kind of output ``mime`` stands for; ``unknown`` when unregistered."""
        entry = self._entries.get(mime)
        return entry.kind if entry else "unknown"

    def check(self, mime: str, value: object, ctx: CheckContext) -> Verdict:
        """Verdict of one representation, reasons prefixed by its MIME type."""
        entry = self._entries.get(mime)
        if entry is None:
            return Verdict.fail(f"{mime}: MIME type not understood by the checker")
        return _guarded(entry.checker, value, ctx).prefixed(mime)


def _guarded(checker: MimeChecker, value: object, ctx: CheckContext) -> Verdict:
    try:
        return checker(value, ctx)
    except Exception as exc:  # odd data from an untrusted kernel: withhold, keep checking
        return Verdict.fail(f"the checker could not read this ({type(exc).__name__}: {exc})")


def text_of(value: object) -> str:
    """A text representation as one string (nbformat may store it as a list of lines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "".join(value)
    raise TypeError(f"expected text, got {type(value).__name__}")


REGISTRY = CheckerRegistry()


@REGISTRY.register("text/plain", kind="text")
def _plain(value: object, ctx: CheckContext) -> Verdict:
    return check_free_text(text_of(value), ctx.policy)


@REGISTRY.register("text/markdown", kind="markdown")
def _markdown(value: object, ctx: CheckContext) -> Verdict:
    return check_markdown(text_of(value), ctx.policy)


@REGISTRY.register("text/latex", kind="latex")
def _latex(value: object, ctx: CheckContext) -> Verdict:
    return check_latex(text_of(value), ctx.policy)


@REGISTRY.register("application/json", kind="json")
def _json(value: object, ctx: CheckContext) -> Verdict:
    # A JSON value is free text once serialised; compact, so it is one line, not a "table".
    text = (
        value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    )
    return check_free_text(text, ctx.policy)


@REGISTRY.register("text/html", kind="html")
def _html(value: object, ctx: CheckContext) -> Verdict:
    return check_html(text_of(value), ctx.policy)


def _bitmap(mime: str) -> MimeChecker:
    # Bitmaps need their MIME type to check the file signature.
    def check(value: object, ctx: CheckContext) -> Verdict:
        return check_base64_image(mime, text_of(value))

    return check


for _mime in ("image/png", "image/jpeg", "image/gif"):
    REGISTRY.register(_mime, kind="image")(_bitmap(_mime))


@REGISTRY.register("image/svg+xml", kind="image")
def _svg(value: object, ctx: CheckContext) -> Verdict:
    return check_svg(text_of(value))


@REGISTRY.register("application/javascript", "text/javascript", kind="javascript")
def _javascript(value: object, ctx: CheckContext) -> Verdict:
    return Verdict.fail("JavaScript runs in the reader's browser and cannot be checked")


@REGISTRY.register(
    "application/vnd.jupyter.widget-view+json",
    "application/vnd.jupyter.widget-state+json",
    kind="widget",
)
def _widget(value: object, ctx: CheckContext) -> Verdict:
    return Verdict.fail("interactive widget: its state lives in the kernel and cannot be checked")


#: A named result shared for combining across sites (``phds_tre.share``).
SHARE_MIME = "application/vnd.phds.share+json"
_SHARE_KEYS = frozenset({"schema", "version", "name", "payload"})
_SHARE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


@REGISTRY.register(SHARE_MIME, kind="share")
def _share(value: object, ctx: CheckContext) -> Verdict:
    """A shared result: a valid envelope, its inner payload re-checked like any structured output.

    The name is free text the kernel chose, so numbers in it go to review.
    """
    if not isinstance(value, dict) or set(value) != _SHARE_KEYS:
        return Verdict.fail("not a phds.share envelope (schema, version, name, payload)")
    version = value["version"]
    if value["schema"] != "phds.share" or type(version) is not int or version != 1:
        return Verdict.fail("unknown shared-result schema or version (expected phds.share 1)")
    name = value["name"]
    if not isinstance(name, str) or not _SHARE_NAME.fullmatch(name):
        return Verdict.fail("the shared result's name is not a plain name of at most 64 characters")
    verdicts = [check_structured({STRUCTURED_MIME: value["payload"]}, ctx.policy, ctx.recheck)]
    named = check_free_text(name, ctx.policy)
    if named.status != "pass":
        verdicts.append(Verdict.review(*(f"the name: {r}" for r in named.reasons)))
    return combine(verdicts)


# ---------------------------------------------------------------------------
# Whole outputs


@dataclass(frozen=True)
class OutputCheck:
    """The verdict of one output and the kind of output it is."""

    kind: str
    verdict: Verdict


#: Precedence of kinds when an output has several representations (richest first).
_KIND_ORDER = (
    "javascript",
    "widget",
    "unknown",
    "share",
    "html",
    "image",
    "markdown",
    "latex",
    "json",
    "text",
)
_ENAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_ENAME = 100
#: Display hints Jupyter itself writes into output metadata; their numbers are layout.
_LAYOUT_KEYS = frozenset({"width", "height"})


def check_output(
    output: Mapping[str, Any], ctx: CheckContext, registry: CheckerRegistry = REGISTRY
) -> OutputCheck:
    """Check one nbformat v4 output (stream, error, display_data or execute_result)."""
    output_type = output.get("output_type")
    if output_type == "stream":
        text = _guarded(lambda v, c: check_free_text(text_of(v), c.policy), output.get("text"), ctx)
        return OutputCheck("stream", text)
    if output_type == "error":
        return OutputCheck("error", check_error(output))
    if output_type not in ("display_data", "execute_result"):
        return OutputCheck(
            "unknown", Verdict.fail(f"output type {output_type!r} not understood by the checker")
        )

    data = output.get("data") or {}
    if not isinstance(data, Mapping):
        return OutputCheck("unknown", Verdict.fail("output data is not a MIME bundle"))
    if not data:
        verdict, kind = Verdict.passed("empty output"), "empty"
    elif STRUCTURED_MIME in data:
        verdict = check_structured(data, ctx.policy, ctx.recheck)
        kind = structured_kind(data.get(STRUCTURED_MIME))
    else:
        verdict = combine(registry.check(mime, value, ctx) for mime, value in data.items())
        kinds = {registry.kind_of(mime) for mime in data}
        kind = "+".join(k for k in _KIND_ORDER if k in kinds)
    metadata = check_output_metadata(output.get("metadata"), ctx.policy)
    if metadata is not None:
        verdict = _with_note(verdict, metadata)
    return OutputCheck(kind, verdict)


def _with_note(verdict: Verdict, extra: Verdict) -> Verdict:
    """``verdict`` worsened by ``extra``, keeping both sets of reasons."""
    combined = combine([verdict, extra])
    return Verdict(
        combined.status, tuple(dict.fromkeys(verdict.reasons + extra.reasons)), verdict.redact
    )


def check_error(output: Mapping[str, Any]) -> Verdict:
    """An error output releases its name only (``pass``); message and traceback are redacted.

    The name must be a plain ASCII Python identifier of reasonable length;
    anything else could carry data and fails. A name with digits goes to review.
    """
    ename = output.get("ename")
    if not isinstance(ename, str) or not _ENAME.fullmatch(ename) or len(ename) > _MAX_ENAME:
        shown = repr(ename)[:60]
        return Verdict.fail(f"error name {shown} is not a plain Python identifier")
    redact = ("evalue", "traceback")
    note = (
        f"only the error name {ename} is released; the message and traceback are "
        "withheld unless a reviewer approves more"
    )
    if any(c.isdigit() for c in ename):
        return Verdict("review", (f"error name {ename} contains digits", note), redact)
    return Verdict("pass", (note,), redact)


def _leaves(value: object, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield (*path, str(key)), str(key)  # keys are text too
            yield from _leaves(item, (*path, str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, (*path, str(i)))
    else:
        yield path, value


def check_output_metadata(metadata: object, policy: Policy) -> Verdict | None:
    """Scan output metadata (never released) so data hidden there is flagged for review.

    Strings go through the free-text rule; numbers other than Jupyter's
    width/height hints are flagged. The checker's own ``phds.verdict`` is skipped
    (it is rewritten by ``--write``). None when there is no metadata.
    """
    if not isinstance(metadata, Mapping):
        return None
    scanned = dict(metadata)
    own = scanned.get("phds")
    if isinstance(own, Mapping) and "verdict" in own:
        rest = {k: v for k, v in own.items() if k != "verdict"}
        if rest:
            scanned["phds"] = rest
        else:
            del scanned["phds"]
    if not scanned:
        return None
    texts: list[str] = []
    numbers: list[str] = []
    for path, leaf in _leaves(scanned):
        if isinstance(leaf, str):
            texts.append(leaf)
        elif (
            isinstance(leaf, (int, float))
            and not isinstance(leaf, bool)
            and path[-1] not in _LAYOUT_KEYS
        ):
            numbers.append(f"{'.'.join(path)}={leaf}")
    reasons: list[str] = []
    text = check_free_text("\n".join(texts), policy)
    if text.status != "pass":
        reasons.extend(text.reasons)
    if numbers:
        reasons.append(f"numbers: {', '.join(numbers[:5])}")
    if reasons:
        # Review, not fail: metadata is never released, but a person should know it is there.
        return Verdict.review(*(f"output metadata (not released): {r}" for r in reasons))
    return Verdict.passed("output metadata is not released; it was scanned and holds no numbers")
