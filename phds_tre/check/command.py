"""The work behind ``phds check``: read, check, report, optionally write; return the exit status.

Kept apart from :mod:`phds_tre.cli` so the command line stays a thin layer and
this can be called (and tested) without click.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from phds_tre.check.notebook import (
    NotebookError,
    check_notebook,
    read_notebook,
    save_notebook,
    write_verdicts,
)
from phds_tre.check.report import format_text, to_json
from phds_tre.check.structured import Rechecker
from phds_tre.sdc.policy import DEFAULT_POLICY, Policy, PolicyError
from phds_tre.site_policy import load_site_policy

__all__ = ["EXIT_BAD_INPUT", "EXIT_CODES", "CheckInputError", "run_check"]

#: Exit status per notebook verdict.
EXIT_CODES = {"pass": 0, "review": 3, "fail": 4}
#: Exit status for input that cannot be checked (file, notebook or policy).
EXIT_BAD_INPUT = 2


class CheckInputError(Exception):
    """Input that cannot be checked; the message is one line for ``phds: error: ...``."""


def run_check(
    notebook: str | Path,
    *,
    policy_path: str | Path | None = None,
    fmt: str = "text",
    write_path: str | Path | None = None,
    echo: Callable[[str], None] = print,
    recheck: Rechecker | None = None,
    site_dir: str | Path | None = None,
) -> int:
    """Check ``notebook``, print the report with ``echo`` and return the exit status.

    With ``site_dir`` (the site's OMOP Parquet folder) outputs are also scanned
    for the site's identifiers (the policy's ``[scan]`` columns).
    Raises :class:`CheckInputError` for an unreadable or invalid notebook, a
    bad policy, unreadable site data or an unwritable ``write_path``; the
    caller prints it and exits 2.
    """
    from phds_tre.release.scan import IdentifierIndexError
    from phds_tre.run import site_identifier_index

    try:
        # A site's whole policy file is accepted; its disclosure rules are what checks outputs.
        site_policy = load_site_policy(policy_path)
        policy: Policy = site_policy.disclosure if policy_path is not None else DEFAULT_POLICY
        nb = read_notebook(notebook)
        scanner = None
        if site_dir is not None:
            folder = Path(site_dir)
            if not folder.is_dir():
                raise CheckInputError(f"{folder}: no such site data folder")
            scanner = site_identifier_index(folder, site_policy.scan.identifier_columns)
    except (PolicyError, NotebookError, IdentifierIndexError) as exc:
        raise CheckInputError(str(exc)) from None
    report = check_notebook(nb, policy, recheck=recheck, scanner=scanner)
    if write_path is not None:
        try:
            save_notebook(write_verdicts(nb, report), write_path)
        except NotebookError as exc:
            raise CheckInputError(str(exc)) from None
    if fmt == "json":
        echo(json.dumps(to_json(report, str(notebook)), indent=2, ensure_ascii=False))
    else:
        echo(format_text(report, str(notebook)))
    return EXIT_CODES[report.status]
