"""``phds demo``: the local demo — run a study notebook and check every output.

Today the demo is one site without a network: papermill executes the example
study in a fresh kernel (per-cell progress bar), then the output checker gives
every output a verdict, exactly as a hospital's checker would. Later issues
grow this into a hub with three synthetic hospitals.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phds_tre.sdc.policy import DEFAULT_POLICY, Policy

__all__ = ["DemoResult", "default_notebook", "run_demo"]


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its files and the notebook's overall verdict."""

    out_dir: Path
    status: str
    counts: dict[str, int]


def default_notebook() -> Path:
    """The example study: shipped in the wheel, or found beside the package in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (
        here / "_notebooks" / "example.ipynb",
        here.parent / "notebooks" / "example.ipynb",
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("the example notebook (notebooks/example.ipynb) is not installed")


def run_demo(
    out_dir: Path,
    notebook: Path | None = None,
    policy: Policy = DEFAULT_POLICY,
    parameters: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> DemoResult:
    """Execute ``notebook`` with papermill into ``out_dir`` and check every output."""
    import nbformat
    import papermill

    from phds_tre.check.notebook import check_notebook, save_notebook, write_verdicts
    from phds_tre.check.report import format_text, to_json

    source = notebook or default_notebook()
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / "executed.ipynb"
    echo(f"== executing {source.name} with papermill (fresh kernel)")
    papermill.execute_notebook(
        str(source),
        str(executed),
        parameters=parameters or {},
        kernel_name="python3",
        progress_bar=progress,
        cwd=str(out_dir),
    )
    echo("== checking every output with the disclosure rules")
    nb = nbformat.read(executed, as_version=4)
    report = check_notebook(nb, policy)
    save_notebook(write_verdicts(nb, report), out_dir / "checked.ipynb")
    summary = to_json(report, str(executed))
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    echo(format_text(report, str(executed)))
    counts = {
        s: sum(1 for o in report.outputs if o.status == s) for s in ("pass", "review", "fail")
    }
    echo(
        f"== wrote {out_dir}/executed.ipynb, checked.ipynb (verdicts in metadata.phds.verdict) "
        f"and report.json"
    )
    return DemoResult(out_dir, report.status, counts)
