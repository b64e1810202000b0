"""``phds demo``: the main job — a federated network of three synthetic hospitals on localhost.

It starts a hub and one node per hospital (separate processes on loopback,
:class:`~phds_tre.demo.network.LocalNetwork`), makes the hospitals' synthetic
OMOP data on first use, submits the demo studies in ``notebooks/`` as a
researcher would, shows per-site progress, has a demo reviewer decide the
outputs each hospital held for review, downloads and verifies every release,
combines the shared results (:mod:`phds_tre.demo.report`) and writes a report
folder: ``summary.json``, ``report.md`` and ``figures/``. Everything it started
is stopped when it ends, also on Ctrl-C.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["DEMO_STUDIES", "DemoResult", "notebooks_dir", "run_demo"]

#: The demo studies: notebook file, title, what the coordinator does with the shares.
DEMO_STUDIES: tuple[tuple[str, str], ...] = (
    ("example.ipynb", "Sepsis in paediatric intensive care: a first checked study"),
    ("benchmarking.ipynb", "Benchmarking: PICU sepsis mortality per hospital"),
    ("haemophilia_feasibility.ipynb", "Rare disease feasibility: haemophilia cohorts"),
)
#: Seconds the demo waits for all runs of all studies before giving up.
DEMO_TIMEOUT_S = 600.0
_TERMINAL = {"released", "rejected", "failed", "cancelled"}


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its report and what it found."""

    out_dir: Path
    summary: dict[str, Any]

    @property
    def ok(self) -> bool:
        """Every run ended released and every release verified."""
        return bool(self.summary.get("ok"))


def notebooks_dir() -> Path:
    """The demo notebooks: shipped in the wheel, or beside the package in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_notebooks", here.parent / "notebooks"):
        if (candidate / DEMO_STUDIES[0][0]).is_file():
            return candidate
    raise FileNotFoundError("the demo notebooks (notebooks/*.ipynb) are not installed")


#: The demo hospitals' policy: the default rules, and later rounds of a study the site
#: already ran (same signed notebook, clean code gate) need no fresh approval.
DEMO_SITE_POLICY = """\
# phds demo: every hospital's site policy (the default disclosure rules).
[approval]
later_rounds = "auto"   # follow-up rounds of an approved notebook run without a new approval
"""


def _demo_site_policy(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site-policy.toml"
    path.write_text(DEMO_SITE_POLICY, encoding="utf-8")
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run_demo(
    out_dir: Path,
    policy_path: Path | None = None,
    echo: Callable[[str], None] = print,
    seed: int = 0,
    timeout_s: float = DEMO_TIMEOUT_S,
) -> DemoResult:
    """Run the whole network demo; write the report into ``out_dir``; stop everything."""
    from phds_tre.client import Hub
    from phds_tre.data.synth import generate
    from phds_tre.demo.network import LocalNetwork

    started = time.monotonic()
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_root = out_dir / "data"
    if not data_root.is_dir() or not any(data_root.iterdir()):
        t0 = time.monotonic()
        generate(data_root, sites=3, seed=seed)
        echo(f"== made three synthetic hospitals in {data_root} ({time.monotonic() - t0:.1f} s)")
    sites = sorted(p.name for p in data_root.iterdir() if p.is_dir())
    if policy_path is None:
        policy_path = _demo_site_policy(out_dir / "network")
    network = LocalNetwork(out_dir / "network", data_root, sites, policy_path=policy_path)
    echo(f"== starting a hub and {len(sites)} hospital nodes on localhost")
    with network:
        echo(f"   hub {network.hub_url}; logs in {network.root / 'logs'}")
        with Hub(network.hub_url, network.researcher_token) as hub:
            studies = _submit_studies(hub, network, sites, out_dir, echo)
            glm = FederatedStudy(network, out_dir / "results" / "sepsis_logistic")
            glm.start()
            echo("   started the federated logistic regression (sepsis_logistic.ipynb, rounds)")
            runs = _watch(hub, network, studies, echo, started + timeout_s, glm)
            glm.join()
            if glm.error is not None:
                raise glm.error
            results = _collect(hub, network, studies, out_dir, echo)
    report = _report(out_dir, studies, runs, results, echo)
    report["studies"]["sepsis_logistic.ipynb"] = glm.report(out_dir / "figures", data_root)
    report["ok"] = report["ok"] and glm.report_ok
    report["figures"] = sorted(p.name for p in (out_dir / "figures").iterdir())
    _write_markdown(out_dir / "report.md", report)
    report["seconds"] = round(time.monotonic() - started, 1)
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    echo(f"== wrote {summary_path} and {out_dir / 'report.md'} ({report['seconds']} s)")
    return DemoResult(out_dir, report)


#: The federated study: notebook, model formula, family and the levels the coordinator fixes.
GLM_STUDY = (
    "sepsis_logistic.ipynb",
    "died ~ lactate + age + C(sex)",
    "binomial",
    {"sex": ["F", "M"]},
)


class FederatedStudy(threading.Thread):
    """``federate.run_glm`` in the background while the demo watches and reviews every run."""

    def __init__(self, network: Any, work_dir: Path) -> None:
        super().__init__(name="federated-glm", daemon=True)
        self.network, self.work_dir = network, work_dir
        self.fit: Any = None
        self.error: BaseException | None = None
        self.report_ok = False

    def run(self) -> None:
        """Fit the model through the hub's follow-up rounds (its own client session)."""
        from phds_tre.client import Hub
        from phds_tre.federate.network import run_glm

        notebook, formula, family, levels = GLM_STUDY
        keys = self.network.site_public_keys()
        try:
            with Hub(self.network.hub_url, self.network.researcher_token) as hub:
                self.fit = run_glm(
                    hub,
                    notebooks_dir() / notebook,
                    list(self.network.sites),
                    formula,
                    family,
                    levels=levels,
                    title="Research: sepsis mortality and lactate (federated logistic regression)",
                    key=self.network.researcher_key,
                    researcher=self.network.researcher,
                    site_keys=keys,
                    work_dir=self.work_dir,
                    round_timeout_s=DEMO_TIMEOUT_S,
                    progress=False,
                )
        except BaseException as exc:  # handed to the main thread, which raises it
            self.error = exc

    @property
    def study_id(self) -> str | None:
        """The study's id once the fit has finished."""
        return None if self.fit is None else str(self.fit.study_id)

    def report(self, figures: Path, data_root: Path) -> dict[str, Any]:
        """The fit, its rounds, the forest plot and the demo-only check against the pooled rows."""
        from phds_tre.demo import report as combine

        entry = combine.combine_federated_glm(self.fit, self.work_dir, figures, data_root)
        self.report_ok = bool(entry.get("equal_to_pooled"))
        return entry


def _submit_studies(
    hub: Any, network: Any, sites: list[str], out_dir: Path, echo: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Sign and submit each demo study to every hospital; study id per notebook."""
    from phds_tre.bundle import build_bundle, write_bundle
    from phds_tre.release.signing import load_private_key

    key = load_private_key(network.researcher_key)
    bundles = out_dir / "network" / "bundles"
    bundles.mkdir(parents=True, exist_ok=True)
    studies: dict[str, dict[str, Any]] = {}
    for notebook, title in DEMO_STUDIES:
        fields = {
            "title": title,
            "purpose": "phds demo: a federated study on synthetic hospitals",
            "researcher": network.researcher,
            "sites": sites,
            "parameters": {},
            "site_parameters": {},
        }
        bundle = build_bundle(notebooks_dir() / notebook, fields, key)
        study = hub.submit(write_bundle(bundle, bundles / f"{Path(notebook).stem}.zip"))
        studies[notebook] = {"id": study["id"], "title": title}
        echo(f"   submitted {notebook:<32} study {study['id'][:12]}")
    return studies


def _watch(
    hub: Any,
    network: Any,
    studies: dict[str, dict[str, Any]],
    echo: Callable[[str], None],
    deadline: float,
    glm: threading.Thread | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Show per-site progress until every run has finished; review what is held.

    Every study of the researcher is followed (the federated study's rounds too,
    until ``glm`` has finished).

    On a terminal: one progress bar per hospital (cells done over all its runs).
    Otherwise (a log, CI): one line each time a run changes status.
    """
    import sys

    from tqdm import tqdm

    echo("== running at the hospitals (per-site progress: cells done over all studies)")
    bars = (
        {
            site: tqdm(total=0, desc=f"{site:<22}", unit="cell", position=i, leave=True)
            for i, site in enumerate(network.sites)
        }
        if sys.stderr.isatty()
        else {}
    )
    names = {s["id"]: nb for nb, s in studies.items()}
    seen: dict[str, str] = {}
    reviewed: set[str] = set()
    decisions: list[dict[str, Any]] = []
    try:
        while True:
            network.check_alive()
            runs = {nb: hub.study(s["id"])["runs"] for nb, s in studies.items()}
            every = [r for rs in runs.values() for r in rs]
            for other in hub.studies():  # the federated study, whose id run_glm makes
                if other["id"] not in names:
                    every += hub.study(other["id"])["runs"]
            for site, bar in bars.items():
                mine = [r for r in every if r["site"] == site]
                bar.total = sum(r["cells_total"] or 0 for r in mine)
                bar.n = sum(r["cells_done"] or 0 for r in mine)
                bar.set_postfix_str(",".join(sorted({r["status"] for r in mine})), refresh=False)
                bar.refresh()
            if not bars:
                for run in every:
                    if seen.get(run["id"]) != run["status"]:
                        seen[run["id"]] = run["status"]
                        cells = f"{run['cells_done']}/{run['cells_total'] or '?'} cells"
                        echo(
                            f"   {run['site']:<22} "
                            f"{names.get(run.get('study_id'), GLM_LABEL) + _round(run):<32} "
                            f"{run['status']:<16} {cells}"
                        )
            pending = [r for r in every if r["status"] not in _TERMINAL]
            for run in pending:
                if run["status"] == "awaiting_review" and run["id"] not in reviewed:
                    reviewed.add(run["id"])
                    decisions += _review(network, run)
            if not pending and not (glm is not None and glm.is_alive()):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    "the demo's runs did not finish in time: "
                    + ", ".join(f"{r['site']} {r['status']}" for r in pending)
                )
            time.sleep(0.2)
    finally:
        for bar in bars.values():
            bar.close()
    for nb in studies:
        studies[nb]["decisions"] = [d for d in decisions if d["study"] == studies[nb]["id"]]
    return runs


GLM_LABEL = "sepsis_logistic.ipynb"


def _round(run: dict[str, Any]) -> str:
    number = int(run.get("round") or 1)
    return f" round {number}" if run.get("study_id") and number > 1 else ""


def _review(network: Any, run: dict[str, Any]) -> list[dict[str, Any]]:
    """The demo reviewer at the run's hospital decides every held output, then releases.

    Through the node's review API (what the JupyterLab extension uses). A reviewer
    confirms a table whose small cells were suppressed (the policy asks a person to
    look at suppression) and rejects free text carrying numbers: that is what the
    demo notebooks are written to show.
    """
    node = network.nodes[run["site"]]
    made: list[dict[str, Any]] = []
    with httpx.Client(
        base_url=node.review_url,
        headers={"Authorization": f"Bearer {node.reviewer_token}"},
        timeout=60.0,
    ) as api:
        held = api.get(f"/review/runs/{run['id']}")
        held.raise_for_status()
        for item in held.json()["outputs"]:
            if not item["needs_decision"]:
                continue
            structured = str(item["kind"]).startswith(("structured", "share"))
            decision = "approve" if structured and item["verdict"] == "review" else "reject"
            comment = (
                "suppressed table checked: no suppressed cell can be recomputed"
                if decision == "approve"
                else "free text with numbers: publish it through the sdc API instead"
            )
            api.post(
                f"/review/runs/{run['id']}/outputs/{item['output']}/decision",
                json={"decision": decision, "comment": comment},
            ).raise_for_status()
            made.append(
                {
                    "study": run.get("study_id"),
                    "site": run["site"],
                    "output": item["output"],
                    "decision": decision,
                    "comment": comment,
                    "reviewer": network.reviewer,
                }
            )
        api.post(f"/review/runs/{run['id']}/release", json={}).raise_for_status()
    return made


def _collect(
    hub: Any,
    network: Any,
    studies: dict[str, dict[str, Any]],
    out_dir: Path,
    echo: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Download and verify every study's releases against the sites' own keys."""
    keys = network.site_public_keys()
    collected: dict[str, dict[str, Any]] = {}
    for notebook, study in studies.items():
        target = out_dir / "results" / _slug(Path(notebook).stem)
        collected[notebook] = hub.results(study["id"], target, keys)
        collected[notebook]["path"] = str(target)
        verified = sum(1 for e in collected[notebook]["sites"].values() if e["verified"])
        echo(f"   {notebook:<32} {verified} release(s) downloaded and verified")
    return collected


def _report(
    out_dir: Path,
    studies: dict[str, dict[str, Any]],
    runs: dict[str, list[dict[str, Any]]],
    results: dict[str, dict[str, Any]],
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Combine the shares, draw the figures, write report.md; the summary as a dict."""
    from phds_tre.demo import report as combine

    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    combined = {
        "example.ipynb": combine.combine_mortality_models,
        "benchmarking.ipynb": combine.combine_benchmarking,
        "haemophilia_feasibility.ipynb": combine.combine_feasibility,
    }
    summary: dict[str, Any] = {"studies": {}, "figures": []}
    for notebook, study in studies.items():
        res = results[notebook]
        entry = {
            "study_id": study["id"],
            "title": study["title"],
            "runs": {r["site"]: r["status"] for r in runs[notebook]},
            "verified": res["ok"],
            "complete": res["complete"],
            "decisions": study.get("decisions", []),
            "combined": combined[notebook](Path(res["path"]), figures),
        }
        summary["studies"][notebook] = entry
    summary["figures"] = sorted(p.name for p in figures.iterdir())
    summary["ok"] = all(s["verified"] and s["complete"] for s in summary["studies"].values())
    _write_markdown(out_dir / "report.md", summary)
    for notebook, entry in summary["studies"].items():
        states = ", ".join(f"{k} {v}" for k, v in sorted(entry["runs"].items()))
        echo(f"   {notebook:<32} {states}")
    return summary


def _write_markdown(path: Path, summary: dict[str, Any]) -> None:
    lines = ["# phds demo: what the hospitals released", ""]
    for notebook, entry in summary["studies"].items():
        lines += [f"## {entry['title']}", "", f"Study `{entry['study_id'][:16]}` ({notebook})", ""]
        lines += [f"* {site}: {status}" for site, status in sorted(entry["runs"].items())]
        for d in entry["decisions"]:
            lines.append(
                f"* reviewer at {d['site']}: {d['decision']} output {d['output']} — {d['comment']}"
            )
        combined = entry["combined"]
        for site, why in (combined.get("withheld") or {}).items():
            lines.append(f"* {site} dropped out of the combined result: {why}")
        if combined.get("figure"):
            lines += ["", f"![{entry['title']}](figures/{combined['figure']})"]
        check = combined.get("pooled_check")
        if check:
            rounds = combined["rounds"]
            overhead = sorted(r["overhead_s"] for r in rounds)[len(rounds) // 2]
            lines += [
                "",
                f"Federated logistic regression over {', '.join(entry['hospitals'])}: "
                f"{combined['iterations']} IRLS iterations in {len(rounds)} rounds "
                f"(median overhead per round beyond the sites' own work {overhead:.2f} s). "
                f"Lactate: {combined['params']['lactate']:.4f} (SE {combined['bse']['lactate']:.4f}) "
                "log odds of death per mmol/L.",
                "",
                "Demo-only check (the demo holds the synthetic data; a coordinator never does): "
                f"statsmodels on the pooled rows differs by at most "
                f"{check['max_relative_difference']:.1e} (relative), in "
                f"{check['statsmodels_iterations']} iterations.",
            ]
        pooled = combined.get("pooled")
        if pooled:
            lines += ["", "| | " + " | ".join(map(str, pooled["columns"])) + " |"]
            lines.append("|---" * (len(pooled["columns"]) + 1) + "|")
            for label, values in zip(pooled["index"], pooled["data"], strict=True):
                lines.append(f"| {label} | " + " | ".join(map(str, values)) + " |")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
