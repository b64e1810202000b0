"""Network benchmarks: dispatch latency, a 3-site study end to end, hub memory.

Run from the repository root::

    .venv/bin/python benchmarks/run_network.py            # full run (~3 min), records results
    .venv/bin/python benchmarks/run_network.py --quick    # smoke test (~1 min), not a measurement

Three measurements against a real ``phds hub serve`` process on loopback (SQLite file),
in one run (see ``benchmarks/README.md``):

1. **Dispatch latency.** 50 lightweight nodes (``net_harness.PollingNode``, one per site)
   long-poll the hub. One study at a time is submitted to one site (rotating); the
   latency is from just before ``POST /studies`` to the moment that site's node has the
   claim in hand (both clocks are this process's ``time.perf_counter``). The peer, timed
   alternately on the same server: a plain ``GET /health`` round trip, the floor of any
   request. Target: p99 < 100 ms.
2. **A 3-site study end to end.** ``notebooks/example.ipynb`` through the hub and three
   real :class:`phds_tre.node.NodeAgent` threads (kernel pools pre-started) on three
   synthetic hospitals; from submit to every site's release downloaded and verified by
   :meth:`phds_tre.client.Hub.results`, minus the slowest site's own run time (its
   ``run.json`` ``timings.total_s``: prepare, gate, execute, check, release). Target: < 1 s.
3. **Hub memory.** The hub's resident set size (RSS): started and idle, with the 50
   nodes connected, and after the latency samples.

Exit status: 0 when the harness ran and every run was claimed by the right node and
released; 1 when a run was lost, went to another site, was refused or did not verify,
or (with ``--check-targets``) a target was missed; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import net_harness as net  # beside this script (run as a script, its folder is on sys.path)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

NOTEBOOK = REPO_ROOT / "notebooks" / "example.ipynb"
RECORDED_JSON = BENCH_DIR / "results" / "network.json"
QUICK_DEFAULT_JSON = BENCH_DIR / ".data" / "network-quick.json"

TARGET_DISPATCH_P99_S = 0.100
TARGET_E2E_OVERHEAD_S = 1.0
NODES = 50
VERSIONED = ("fastapi", "starlette", "uvicorn", "httpx", "sqlalchemy", "papermill", "ipykernel")

Log = Callable[[str], None]


class WrongAnswer(Exception):
    """A run was lost, duplicated, refused or did not verify."""


# -- facts about the run ------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    return None


def machine_info() -> dict[str, Any]:
    """The machine, the versions and the code measured."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    dirty = _git("status", "--porcelain", "--", "phds_tre", "benchmarks")
    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": dirty.splitlines() if dirty else [],
    }


def _summary(values: list[float]) -> dict[str, Any]:
    """n, median, p90, p99 (nearest rank), min, max, in seconds."""
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p * len(ordered)) - 1))]

    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered), 6),
        "p90": round(rank(0.90), 6),
        "p99": round(rank(0.99), 6),
        "min": round(ordered[0], 6),
        "max": round(ordered[-1], 6),
    }


# -- 1 and 3: dispatch latency and hub memory ---------------------------------------------------


def measure_dispatch(scratch: Path, samples: int, log: Log) -> dict[str, Any]:
    """Submit → node has the claim, with 50 idle long-polling nodes; /health beside it; RSS."""
    sites = [f"site_{i:02d}" for i in range(NODES)]
    network = net.bootstrap(scratch / "hub50", sites)
    notebook = net.tiny_notebook(scratch / "tiny.ipynb")
    bundles = [
        net.study_bundle(notebook, f"dispatch {i}", [sites[i % NODES]], network)
        for i in range(samples + 5)
    ]
    template = net.ReleaseTemplate()
    hub = net.HubProcess(network.data_dir)
    hub.start()
    nodes: list[net.PollingNode] = []
    try:
        researcher = httpx.Client(
            base_url=hub.url,
            headers={"Authorization": f"Bearer {network.researcher_token}"},
            timeout=30,
        )
        for _ in range(20):  # warm the hub's code paths a little before the idle reading
            researcher.get("/health")
        time.sleep(1.0)
        rss_idle = hub.rss_bytes()
        nodes, claims, lock = net.start_nodes(network, hub.url, template, wait=25)
        time.sleep(3.0)  # every node's first long-poll is waiting at the hub
        rss_connected = hub.rss_bytes()
        log(f"  hub RSS idle {rss_idle / 2**20:.1f} MiB, 50 nodes {rss_connected / 2**20:.1f} MiB")
        dispatch: list[float] = []
        submit_rtt: list[float] = []
        health: list[float] = []
        for i, bundle in enumerate(bundles):
            t0 = time.perf_counter()
            researcher.get("/health").raise_for_status()
            health_s = time.perf_counter() - t0
            with lock:
                seen = len(claims)
            t0 = time.perf_counter()
            study = net.submit(researcher, bundle)
            submitted = time.perf_counter() - t0
            deadline = time.monotonic() + 30
            while True:
                with lock:
                    fresh = claims[seen:]
                if fresh and (fresh[0].released or fresh[0].problem):
                    break
                if time.monotonic() > deadline:
                    raise WrongAnswer(f"study {study['id']} was not claimed within 30 s")
                time.sleep(0.002)
            claim = fresh[0]
            if claim.problem or claim.study_id != study["id"] or len(fresh) != 1:
                raise WrongAnswer(f"sample {i}: {claim} for study {study['id']}")
            if claim.site != study["runs"][0]["site"]:
                raise WrongAnswer(f"sample {i}: claimed by {claim.site}")
            if i >= 5:  # the first five warm up the path
                dispatch.append(claim.received - t0)
                submit_rtt.append(submitted)
                health.append(health_s)
        rss_after = hub.rss_bytes()
        with lock:
            all_claims = list(claims)
    finally:
        net.stop_nodes(nodes)
        hub.stop()
    if len({c.run_id for c in all_claims}) != len(all_claims):
        raise WrongAnswer("a run was claimed twice")
    d, h = _summary(dispatch), _summary(health)
    log(
        f"  dispatch median {d['median'] * 1000:.1f} ms, p99 {d['p99'] * 1000:.1f} ms; "
        f"/health median {h['median'] * 1000:.1f} ms"
    )
    return {
        "nodes": NODES,
        "samples": len(dispatch),
        "warmup_samples": 5,
        "dispatch_s": d,
        "dispatch_samples_s": [round(x, 6) for x in dispatch],
        "submit_round_trip_s": _summary(submit_rtt),
        # What the long-poll adds after the submission's own round trip (negative when the
        # node had the claim before the researcher had the answer).
        "dispatch_minus_submit_s": _summary(
            [a - b for a, b in zip(dispatch, submit_rtt, strict=True)]
        ),
        "health_round_trip_s": h,
        "ratio_median_dispatch_to_health": round(d["median"] / h["median"], 2),
        "ratio_p99_dispatch_to_health": round(d["p99"] / h["p99"], 2),
        "memory": {
            "hub_rss_idle_mib": round(rss_idle / 2**20, 1),
            "hub_rss_50_nodes_connected_mib": round(rss_connected / 2**20, 1),
            "hub_rss_after_samples_mib": round(rss_after / 2**20, 1),
            "delta_connected_mib": round((rss_connected - rss_idle) / 2**20, 1),
            "per_node_kib": round((rss_connected - rss_idle) / NODES / 1024, 1),
        },
    }


# -- 2: a 3-site study end to end ---------------------------------------------------------------


@dataclass
class Agents:
    """Three NodeAgents serving in threads."""

    agents: list[Any]
    threads: list[threading.Thread]

    def wait_ready(self) -> None:
        """Until every agent's pool holds a ready kernel."""
        for agent in self.agents:
            if not agent.pool.wait_ready(timeout=180):
                raise WrongAnswer(f"the kernel pool of {agent.site} did not start")

    def stop(self) -> None:
        """Stop serving and close the pools."""
        for agent in self.agents:
            agent.stop()
        for thread in self.threads:
            thread.join(60)
        for agent in self.agents:
            agent.close()


def start_agents(network: net.Network, hub_url: str, data: Path, scratch: Path) -> Agents:
    """A NodeAgent per site, auto-releasing review verdicts (no person in the timed loop)."""
    from phds_tre.node import NodeAgent
    from phds_tre.site_policy import ReleasePolicy, SitePolicy

    policy = SitePolicy(release=ReleasePolicy(auto_release=("pass", "review")))
    agents = [
        NodeAgent(
            hub_url,
            network.node_tokens[site],
            site,
            data / site,
            policy,
            scratch / "nodes" / site,
            network.node_key_paths[site],
            [network.researcher_key.public_key()],
        )
        for site in network.sites
    ]
    threads = [threading.Thread(target=a.run_forever, daemon=True) for a in agents]
    for thread in threads:
        thread.start()
    return Agents(agents, threads)


def measure_study(
    scratch: Path, repeats: int, persons: int | None, warmup: bool, log: Log
) -> dict[str, Any]:
    """notebooks/example.ipynb at 3 sites: submit → all downloaded, minus the slowest site."""
    from phds_tre.client import Hub
    from phds_tre.data.synth import generate

    data = scratch / "sites"
    generate(data, sites=3, persons=persons, seed=7)
    sites = sorted(p.name for p in data.iterdir() if p.is_dir())
    network = net.bootstrap(scratch / "hub3", sites, researcher="dr_e2e")
    hub = net.HubProcess(network.data_dir)
    hub.start()
    agents = start_agents(network, hub.url, data, scratch)
    rounds: list[dict[str, Any]] = []
    try:
        with Hub(hub.url, network.researcher_token) as client:
            first = 0 if warmup else 1
            for i in range(first, repeats + 1):  # study 0 is an untimed warm-up
                agents.wait_ready()
                time.sleep(0.5)
                bundle = scratch / f"study-{i}.zip"
                bundle.write_bytes(
                    net.study_bundle(NOTEBOOK, f"example at three sites {i}", sites, network)
                )
                t0 = time.perf_counter()
                study = client.submit(bundle)
                while True:
                    runs = client.study(study["id"])["runs"]
                    if all(r["status"] in ("released", "failed", "rejected") for r in runs):
                        break
                    time.sleep(0.02)
                summary = client.results(study["id"], scratch / f"results-{i}")
                wall = time.perf_counter() - t0
                if not (summary["ok"] and summary["complete"]):
                    raise WrongAnswer(f"study {i}: {json.dumps(summary)[:2000]}")
                timings = {}
                for run in runs:
                    record = json.loads(
                        (
                            scratch
                            / "nodes"
                            / run["site"]
                            / "runs"
                            / run["id"]
                            / "out"
                            / "run.json"
                        ).read_text(encoding="utf-8")
                    )
                    timings[run["site"]] = record["timings"]
                slowest = max(t["total_s"] for t in timings.values())
                entry = {
                    "wall_s": round(wall, 4),
                    "slowest_site_total_s": slowest,
                    "slowest_site_execute_s": max(
                        t.get("execute_s", 0.0) for t in timings.values()
                    ),
                    "overhead_s": round(wall - slowest, 4),
                    "sites": timings,
                }
                log(
                    f"  study {i}{' (warm-up)' if i == 0 else ''}: wall {wall:.2f} s, slowest site "
                    f"{slowest:.2f} s, overhead {wall - slowest:.2f} s"
                )
                if i:
                    rounds.append(entry)
    finally:
        agents.stop()
        hub.stop()
    return {
        "notebook": NOTEBOOK.relative_to(REPO_ROOT).as_posix(),
        "sites": sites,
        "persons": persons,
        "repeats": len(rounds),
        "warmup": warmup,
        "site_policy": "defaults, except auto_release = ['pass', 'review']",
        "overhead_s": _summary([r["overhead_s"] for r in rounds]),
        "wall_s": _summary([r["wall_s"] for r in rounds]),
        "slowest_site_total_s": _summary([r["slowest_site_total_s"] for r in rounds]),
        "studies": rounds,
    }


# -- the whole run ------------------------------------------------------------------------------


@dataclass
class Settings:
    """What a run does."""

    quick: bool
    samples: int
    repeats: int
    persons: int | None


def targets(doc: Mapping[str, Any], quick: bool) -> dict[str, Any]:
    """Each target with its value and whether it was met (None in quick mode)."""
    p99 = doc["dispatch"]["dispatch_s"]["p99"]
    overhead = doc["study_3_sites"]["overhead_s"]["median"]
    return {
        "dispatch_p99": {
            "description": "submit -> node has the claim, 50 idle nodes, p99 < 100 ms",
            "value": p99,
            "threshold": TARGET_DISPATCH_P99_S,
            "met": None if quick else p99 < TARGET_DISPATCH_P99_S,
        },
        "study_3_sites_overhead": {
            "description": "3-site example study: wall - slowest site's own run, median < 1 s",
            "value": overhead,
            "threshold": TARGET_E2E_OVERHEAD_S,
            "met": None if quick else overhead < TARGET_E2E_OVERHEAD_S,
        },
    }


def run(settings: Settings, log: Log) -> dict[str, Any]:
    """Every measurement; the results document."""
    started = time.perf_counter()
    doc: dict[str, Any] = {
        "benchmark": "network",
        "mode": "quick" if settings.quick else "full",
        "machine": machine_info(),
    }
    with tempfile.TemporaryDirectory(prefix="phds-bench-network-") as tmp:
        scratch = Path(tmp)
        log(f"1+3. dispatch latency and hub memory ({settings.samples} samples, {NODES} nodes)")
        doc["dispatch"] = measure_dispatch(scratch, settings.samples, log)
        doc["memory"] = doc["dispatch"].pop("memory")
        log(f"2. a 3-site study of {NOTEBOOK.name} ({settings.repeats} timed)")
        doc["study_3_sites"] = measure_study(
            scratch, settings.repeats, settings.persons, not settings.quick, log
        )
    doc["targets"] = targets(doc, settings.quick)
    doc["machine"]["load_average_at_end"] = list(os.getloadavg())
    doc["duration_seconds"] = round(time.perf_counter() - started, 1)
    return doc


def _ms(value: float) -> str:
    return f"{value * 1000:.1f} ms"


def _met(value: bool | None) -> str:
    return "not assessed (quick)" if value is None else ("**met**" if value else "**missed**")


def render_markdown(doc: Mapping[str, Any]) -> str:
    """The results as Markdown (regenerated by this script; not edited by hand)."""
    m, d, mem, s = doc["machine"], doc["dispatch"], doc["memory"], doc["study_3_sites"]
    ds, hs, ss = d["dispatch_s"], d["health_round_trip_s"], d["submit_round_trip_s"]
    lines = [
        "# Network benchmarks",
        "",
        f"Recorded by `benchmarks/run_network.py` ({doc['mode']} mode) on {m['date_utc']}: "
        f"{m['cpu_count']} CPUs, load {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}"
        f" at start, {', '.join(f'{x:.2f}' for x in m['load_average_at_end'])} at end; Python "
        f"{m['python']}, git {str(m['git_commit'])[:12]}"
        + (" with uncommitted changes" if m["uncommitted_changes"] else "")
        + f"; {doc['duration_seconds']} s. Do not edit by hand.",
        "",
        "## Targets",
        "",
        "| target | value | threshold | met |",
        "| --- | --- | --- | --- |",
    ]
    for t in doc["targets"].values():
        lines.append(
            f"| {t['description']} | {t['value'] * 1000:.1f} ms | "
            f"{t['threshold'] * 1000:.0f} ms | {_met(t['met'])} |"
        )
    lines += [
        "",
        f"## 1. Dispatch latency ({d['nodes']} idle long-polling nodes, {d['samples']} samples)",
        "",
        "| measure | median | p90 | p99 | max |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, v in (
        ("submit → the node has the claim", ds),
        ("`POST /studies` round trip (inside the above)", ss),
        ("the above minus the `POST /studies` round trip", d["dispatch_minus_submit_s"]),
        ("peer: `GET /health` round trip", hs),
    ):
        lines.append(
            f"| {name} | {_ms(v['median'])} | {_ms(v['p90'])} | {_ms(v['p99'])} | {_ms(v['max'])} |"
        )
    lines += [
        "",
        f"Dispatch / health: {d['ratio_median_dispatch_to_health']}× at the median, "
        f"{d['ratio_p99_dispatch_to_health']}× at p99 (same run, same server).",
        "",
        f"## 2. A 3-site study of `{s['notebook']}` ({s['repeats']} timed"
        + (" after an untimed warm-up)" if s["warmup"] else ", no warm-up)"),
        "",
        "| study | wall (submit → all downloaded and verified) | slowest site's own run "
        "(`total_s`) | its execution (`execute_s`) | overhead |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(s["studies"], start=1):
        lines.append(
            f"| {i} | {r['wall_s']:.2f} s | {r['slowest_site_total_s']:.2f} s | "
            f"{r['slowest_site_execute_s']:.2f} s | {r['overhead_s']:.2f} s |"
        )
    lines += [
        "",
        f"Median overhead {s['overhead_s']['median']:.2f} s (max {s['overhead_s']['max']:.2f} s); "
        f"sites {', '.join(s['sites'])}; site policy: {s['site_policy']}.",
        "",
        "## 3. Hub memory (RSS of the `phds hub serve` process)",
        "",
        "| moment | RSS |",
        "| --- | --- |",
        f"| started, idle | {mem['hub_rss_idle_mib']} MiB |",
        f"| 50 nodes long-polling | {mem['hub_rss_50_nodes_connected_mib']} MiB |",
        f"| after the latency samples | {mem['hub_rss_after_samples_mib']} MiB |",
        "",
        f"50 connected nodes cost {mem['delta_connected_mib']} MiB "
        f"({mem['per_node_kib']} KiB per node).",
        "",
    ]
    return "\n".join(lines)


def write_results(doc: Mapping[str, Any], out: Path) -> Path:
    """Write ``out`` (JSON) and the Markdown beside it; the Markdown's path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    md = out.with_suffix(".md")
    md.write_text(render_markdown(doc), encoding="utf-8")
    return md


def parse_args(argv: list[str] | None) -> tuple[Settings, Path, argparse.Namespace]:
    """Command-line options -> settings, output path, the raw options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few samples, targets not judged")
    parser.add_argument(
        "--samples", type=int, default=None, help="dispatch samples (300; quick 20)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed 3-site studies (5; quick 1)"
    )
    parser.add_argument("--persons", type=int, default=None, help="largest site (synth default)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (.md beside it)")
    parser.add_argument("--check-targets", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON", help="only the .md")
    args = parser.parse_args(argv)
    samples = args.samples if args.samples is not None else (20 if args.quick else 300)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    if samples < 1 or repeats < 1:
        parser.error("--samples and --repeats must be at least 1")
    if not args.quick and samples < 200:
        print("note: fewer than 200 samples: the p99 rests on few samples")
    persons = args.persons if args.persons is not None else (800 if args.quick else None)
    out = args.out or (QUICK_DEFAULT_JSON if args.quick else RECORDED_JSON)
    return Settings(args.quick, samples, repeats, persons), out, args


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring for the exit status."""
    settings, out, args = parse_args(argv)
    if args.render is not None:
        md = args.render.with_suffix(".md")
        md.write_text(render_markdown(json.loads(args.render.read_text("utf-8"))), "utf-8")
        print(f"wrote {md}")
        return 0
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)

    def log(message: str) -> None:
        print(message, flush=True)

    log(f"network benchmarks ({'quick' if settings.quick else 'full'} mode) -> {out}")
    try:
        doc = run(settings, log)
    except WrongAnswer as exc:
        log(f"FAILED: {exc}")
        return 1
    md = write_results(doc, out)
    log(f"wrote {out} and {md} in {doc['duration_seconds']} s")
    for name, t in doc["targets"].items():
        log(f"target {name}: value {t['value']}, met {t['met']}")
    missed = [name for name, t in doc["targets"].items() if t["met"] is False]
    return 1 if args.check_targets and missed else 0


if __name__ == "__main__":
    sys.exit(main())
