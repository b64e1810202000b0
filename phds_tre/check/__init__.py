"""The notebook output checker: a verdict (pass, review, fail) with reasons for every output.

Runs outside the kernel, on an executed notebook (DESIGN.md: step 3 of a
run). One concern per module:

* :mod:`~phds_tre.check.verdict` — statuses, verdicts, worst-of;
* :mod:`~phds_tre.check.text` — free text: ANSI stripping, numbers, raw tables;
* :mod:`~phds_tre.check.html` — HTML and markdown: active and hidden content;
* :mod:`~phds_tre.check.image` — raw images and SVG;
* :mod:`~phds_tre.check.structured` — phds structured outputs, re-checked;
* :mod:`~phds_tre.check.checkers` — the MIME-type registry and one output's check;
* :mod:`~phds_tre.check.notebook` — reading, checking and annotating notebooks;
* :mod:`~phds_tre.check.report` — text and JSON reports;
* :mod:`~phds_tre.check.command` — ``phds check``.
"""

from __future__ import annotations

from phds_tre.check.checkers import REGISTRY, CheckContext, CheckerRegistry, check_output
from phds_tre.check.notebook import (
    NotebookError,
    NotebookReport,
    OutputReport,
    check_notebook,
    parse_notebook,
    read_notebook,
    save_notebook,
    stored_verdict,
    write_verdicts,
)
from phds_tre.check.structured import STRUCTURED_MIME
from phds_tre.check.verdict import Status, Verdict, worst

__all__ = [
    "REGISTRY",
    "STRUCTURED_MIME",
    "CheckContext",
    "CheckerRegistry",
    "NotebookError",
    "NotebookReport",
    "OutputReport",
    "Status",
    "Verdict",
    "check_notebook",
    "check_output",
    "parse_notebook",
    "read_notebook",
    "save_notebook",
    "stored_verdict",
    "worst",
    "write_verdicts",
]
