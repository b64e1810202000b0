"""Faults on loopback with real processes: a node killed mid-run, the hub killed mid-study,
connections cut mid-request. Every study, run and release survives; nothing is released twice.

The hub is ``phds hub serve`` (SQLite file), each hospital ``phds node serve`` on a
synthetic hospital (the ``synth_sites`` fixture); the researcher uses
:class:`phds_tre.client.Hub`. Processes are killed with ``SIGKILL``: no clean-up code of
theirs runs. A node's kernels run in their own sessions, so the test kills them too (as
an operator restarting a crashed node would find them orphaned).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from phds_tre.audit import AuditLog
from phds_tre.client import Hub
from phds_tre.node.state import NodeState
from phds_tre.release.signing import public_key_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import net_harness as net  # benchmarks/ is not a package

#: Seconds the study's middle cell sleeps: the window in which a process is killed.
SLEEP_S = 8

STUDY_CELLS = (
    "from phds_tre import data, sdc\n"
    "person = data.connect().table('person')\n"
    "person = person[2024 - person.year_of_birth >= min_age]\n"
    "person['sex'] = person.gender_concept_id.map({8507: 'M', 8532: 'F'})\n"
    "person['band'] = (person.year_of_birth >= 2015).map({True: 'new', False: 'old'})",
    "sdc.crosstab(person.sex, person.band)",
    f"import time\ntime.sleep({SLEEP_S})",
    "sdc.crosstab(person.band, person.sex)",
)


def _notebook(path: Path) -> Path:
    nb = new_notebook(
        cells=[new_code_cell("min_age = 0", metadata={"tags": ["parameters"]})]
        + [new_code_cell(source) for source in STUDY_CELLS],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    nbformat.write(nb, path)
    return path


@dataclass
class NodeProcess:
    """``phds node serve`` for one synthetic hospital, killable with SIGKILL and restartable."""

    site: str
    site_dir: Path
    work: Path
    hub_url: str
    token: str
    key_path: Path
    researcher_pub: Path
    home: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        """The node's log (every start appends)."""
        return self.work.parent / f"{self.site}.log"

    def start(self) -> None:
        """Start serving (the kernel pool starts in the background)."""
        self.work.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PHDS_NODE_TOKEN": self.token, "PHDS_HOME": str(self.home)}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(net.PHDS),
                    "node",
                    "serve",
                    "--hub",
                    self.hub_url,
                    "--site",
                    self.site,
                    "--data",
                    str(self.site_dir),
                    "--work",
                    str(self.work),
                    "--key",
                    str(self.key_path),
                    "--researcher-key",
                    str(self.researcher_pub),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    def _descendants(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        with contextlib.suppress(psutil.NoSuchProcess):
            return list(psutil.Process(self.proc.pid).children(recursive=True))
        return []

    def kill(self) -> None:
        """``kill -9`` the node, then its orphaned kernels."""
        if self.proc is None:
            return
        kernels = self._descendants()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        for child in kernels:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(kernels, timeout=10)

    def stop(self) -> None:
        """Ctrl-C (the agent closes its pool), then make sure nothing is left."""
        if self.proc is None or self.proc.poll() is not None:
            return
        kernels = self._descendants()
        self.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)
        self.kill()
        for child in kernels:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    def log(self) -> str:
        """The node's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Loopback:
    """A small network on loopback: the hub process, node processes, the researcher."""

    tmp: Path
    network: net.Network
    hub: net.HubProcess
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    notebook: Path | None = None

    def researcher(self) -> Hub:
        """The researcher's client (straight to the hub)."""
        return Hub(self.hub.url, self.network.researcher_token, timeout=30)

    def node(self, site: str, site_dir: Path, hub_url: str | None = None) -> NodeProcess:
        """A node process for ``site`` (not started)."""
        proc = NodeProcess(
            site,
            site_dir,
            self.tmp / "nodes" / site,
            hub_url or self.hub.url,
            self.network.node_tokens[site],
            self.network.node_key_paths[site],
            public_key_path(self.network.researcher_key_path),
            self.tmp / "home",
        )
        self.nodes[site] = proc
        return proc

    def submit(self, sites: list[str], title: str) -> str:
        """Submit the sleeping study to ``sites``; its id."""
        assert self.notebook is not None
        bundle = self.tmp / f"{title.replace(' ', '_')}.zip"
        bundle.write_bytes(net.study_bundle(self.notebook, title, sites, self.network))
        with self.researcher() as client:
            return str(client.submit(bundle)["id"])

    def wait(
        self, study_id: str, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 120
    ) -> list[dict[str, Any]]:
        """Poll the study (as the researcher) until ``done(runs)``; the runs."""
        deadline = time.monotonic() + timeout
        runs: list[dict[str, Any]] = []
        with self.researcher() as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):  # the hub may be down for a moment
                    runs = list(client.study(study_id)["runs"])
                    if done(runs):
                        return runs
                time.sleep(0.2)
        logs = "\n".join(f"--- {n.site}\n{n.log()[-3000:]}" for n in self.nodes.values())
        raise AssertionError(f"timed out; runs: {runs}\nhub: {self.hub.log_tail()}\n{logs}")

    def db(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of a query on the hub's SQLite file."""
        with sqlite3.connect(self.network.data_dir / "hub.sqlite") as conn:
            return list(conn.execute(sql, args).fetchall())

    def close(self) -> None:
        """Stop every node, then the hub."""
        for proc in self.nodes.values():
            proc.stop()
        self.hub.stop()


@pytest.fixture
def site_net(tmp_path: Path, synth_sites: Path) -> Iterator[Loopback]:
    """A hub process with a node principal for each synthetic hospital (no node started)."""
    sites = sorted(p.name for p in synth_sites.iterdir() if p.is_dir())
    network = net.bootstrap(tmp_path / "hub", sites)
    hub = net.HubProcess(network.data_dir)
    hub.start()
    site = Loopback(tmp_path, network, hub, notebook=_notebook(tmp_path / "study.ipynb"))
    try:
        yield site
    finally:
        site.close()


def _local_status(node: NodeProcess, run_id: str, want: str, timeout: float = 60) -> None:
    """Wait until the node's own state has ``run_id`` in status ``want``."""
    deadline = time.monotonic() + timeout
    local = None
    while time.monotonic() < deadline:
        local = NodeState(node.work / "node.sqlite").get(run_id)
        if local is not None and local.status == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} at the node: {local}")


def _all(status: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda runs: bool(runs) and all(r["status"] == status for r in runs)


def _history(run: dict[str, Any]) -> list[str]:
    return [str(e["status"]) for e in run["history"]]


def _released_once(site: Loopback, run_ids: list[str]) -> None:
    """Exactly one stored release and one ``released`` history entry per run."""
    releases = Counter(r for (r,) in site.db("SELECT run_id FROM releases"))
    assert {r: releases[r] for r in run_ids} == dict.fromkeys(run_ids, 1)
    for run_id in run_ids:
        events = site.db(
            "SELECT count(*) FROM run_events WHERE run_id = ? AND status = 'released'", run_id
        )
        assert events == [(1,)], run_id


@pytest.mark.slow
def test_node_killed_mid_run_reruns_once_then_fails_after_a_second_kill(
    site_net: Loopback, synth_sites: Path
) -> None:
    name = site_net.network.sites[0]
    node = site_net.node(name, synth_sites / name)
    node.start()

    # Killed once while executing: re-run after the restart, released exactly once.
    study = site_net.submit([name], "killed once")
    site_net.wait(study, _all("running"))
    time.sleep(2)  # inside the sleeping cell
    node.kill()
    node.start()
    (run,) = site_net.wait(study, _all("released"))
    _local_status(node, run["id"], "uploaded")
    _released_once(site_net, [run["id"]])
    assert "re-run after an interruption (attempt 2 of 2)" in [
        e["detail"] for e in run["history"]
    ], run["history"]
    local = NodeState(node.work / "node.sqlite").get(run["id"])
    assert local is not None and local.status == "uploaded" and local.attempts == 2
    assert (node.work / "runs" / run["id"] / "out.attempt-1").is_dir()  # kept at the site

    # Killed during the first run and during the re-run: marked failed, never a third run.
    study = site_net.submit([name], "killed twice")
    site_net.wait(study, _all("running"))
    time.sleep(2)
    node.kill()
    node.start()
    site_net.wait(
        study, lambda runs: any("attempt 2 of 2" in e["detail"] for e in runs[0]["history"])
    )
    time.sleep(2)
    node.kill()
    node.start()
    (run,) = site_net.wait(study, _all("failed"))
    assert "interrupted during 2 attempts" in run["history"][-1]["detail"], run["history"]
    assert site_net.db("SELECT count(*) FROM releases WHERE run_id = ?", run["id"]) == [(0,)]
    local = NodeState(node.work / "node.sqlite").get(run["id"])
    assert local is not None and local.status == "failed" and local.attempts == 2
    node.stop()
    assert AuditLog(node.work / "audit.sqlite").verify().ok


@pytest.mark.slow
def test_hub_killed_mid_study_every_run_still_released_once(
    site_net: Loopback, synth_sites: Path
) -> None:
    sites = site_net.network.sites
    for name in sites:
        site_net.node(name, synth_sites / name).start()
    study = site_net.submit(sites, "hub killed")
    site_net.wait(study, _all("running"))
    before = site_net.db("SELECT id, site, study_id, created FROM runs ORDER BY id")
    site_net.hub.kill()
    # Longer than any node's execution from here (a node may only be starting its first
    # cells), so that every node finishes executing meanwhile and finds the hub gone.
    time.sleep(SLEEP_S + 5)
    site_net.hub.start()
    runs = site_net.wait(study, _all("released"))
    _released_once(site_net, [r["id"] for r in runs])

    # Rows intact: the same study and runs, each claimed once, each with one history.
    assert site_net.db("SELECT id, site, study_id, created FROM runs ORDER BY id") == before
    assert site_net.db("SELECT id FROM studies") == [(study,)]
    assert {c for (c,) in site_net.db("SELECT claims FROM runs")} == {1}
    for run in runs:
        history = _history(run)
        assert history[:2] == ["submitted", "queued"] and history[-1] == "released", history
        assert history.count("released") == 1
    assert AuditLog(site_net.network.data_dir / "audit.sqlite").verify().ok
    for node in site_net.nodes.values():
        assert "unavailable" in node.log(), node.log()[-2000:]  # it backed off and retried
    site_net.close()
    for node in site_net.nodes.values():
        assert AuditLog(node.work / "audit.sqlite").verify().ok


# -- a proxy that cuts connections -------------------------------------------------------------


@dataclass
class Cuts:
    """How many requests of each kind the proxy still cuts, and how many it did.

    Not cut: the answer of a long-poll that has just claimed a run. The hub then holds
    the run for that node until its lease (300 s) runs out and only then offers it again
    (a known limit, see docs/network.md).
    """

    polls: int = 2  # a long-poll cut while it waits
    bundles: int = 1  # the bundle download cut mid-response
    uploads: int = 1  # the release upload cut mid-body
    answers: int = 1  # a complete release upload whose answer never arrives
    done: Counter[str] = field(default_factory=Counter)


class CuttingProxy:
    """A TCP proxy (asyncio, in a thread) from a loopback port to the hub that cuts requests.

    It looks at the start of each request the node sends (HTTP/1.1 on loopback, in the
    clear) and, while :class:`Cuts` allows, closes both sides at the worst moments. A
    hand-written relay: mitmproxy or toxiproxy would do it but are large external
    programs for 80 lines of asyncio.
    """

    def __init__(self, target_port: int, cuts: Cuts) -> None:
        """Relay ``127.0.0.1:<port>`` → ``127.0.0.1:target_port`` (not started)."""
        self.port = net.free_port()
        self.target_port = target_port
        self.cuts = cuts
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None

    def start(self) -> None:
        """Listen, in the proxy's own thread."""
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port), self.loop
        ).result(10)

    def close(self) -> None:
        """Stop listening and stop the loop."""

        async def shut() -> None:
            if self.server is not None:
                self.server.close()
            current = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not current]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _take(self, kind: str) -> bool:
        left = getattr(self.cuts, kind)
        if left <= 0:
            return False
        setattr(self.cuts, kind, left - 1)
        self.cuts.done[kind] += 1
        return True

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            hub_r, hub_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        drop_answer = asyncio.Event()
        cut = asyncio.Event()

        async def upstream() -> None:
            while not cut.is_set():
                chunk = await client_r.read(65536)
                if not chunk:
                    break
                if chunk.startswith(b"POST /nodes/next") and self._take("polls"):
                    hub_w.write(chunk)
                    await asyncio.sleep(0.3)  # the hub is now waiting for a run
                    break
                if b"/release HTTP/1.1" in chunk.split(b"\r\n", 1)[0]:
                    if self._take("uploads"):
                        hub_w.write(chunk[: len(chunk) // 2])
                        await hub_w.drain()
                        break
                    if self._take("answers"):
                        drop_answer.set()
                if chunk.startswith(b"GET /nodes/bundles/") and self._take("bundles"):
                    drop_answer.set()
                hub_w.write(chunk)
                await hub_w.drain()
            cut.set()

        async def downstream() -> None:
            while not cut.is_set():
                chunk = await hub_r.read(65536)
                if not chunk:
                    break
                if drop_answer.is_set():
                    # A bundle download: part of it; a release answer: nothing.
                    if chunk.startswith(b"HTTP/1.1 200"):
                        client_w.write(chunk[: len(chunk) // 2])
                    break
                client_w.write(chunk)
                await client_w.drain()
            cut.set()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        with contextlib.suppress(Exception):
            await cut.wait()
        for task in tasks:
            task.cancel()
        for writer in (client_w, hub_w):
            with contextlib.suppress(Exception):
                writer.transport.abort()  # a reset, not a polite close


@pytest.mark.slow
def test_connections_cut_mid_request_run_still_completes_once(
    site_net: Loopback, synth_sites: Path
) -> None:
    name = site_net.network.sites[0]
    cuts = Cuts()
    proxy = CuttingProxy(site_net.hub.port, cuts)
    proxy.start()
    try:
        node = site_net.node(name, synth_sites / name, hub_url=f"http://127.0.0.1:{proxy.port}")
        node.start()
        deadline = time.monotonic() + 30
        while cuts.polls and time.monotonic() < deadline:  # idle long-polls cut first
            time.sleep(0.1)
        # The hub still holds the last cut long-poll (its node is gone) for up to 25 s.
        # Regression: it used to claim the study submitted now, and the run then sat
        # leased to the node for 300 s; now a poll whose client left claims nothing.
        time.sleep(1.0)
        study = site_net.submit([name], "cut connections")
        (run,) = site_net.wait(study, _all("released"))
        _local_status(node, run["id"], "uploaded")  # after the retry that met the 409
        node.stop()
    finally:
        proxy.close()
    assert dict(cuts.done) == {"polls": 2, "bundles": 1, "uploads": 1, "answers": 1}
    _released_once(site_net, [run["id"]])
    assert _history(run).count("running") == 1 and _history(run)[-1] == "released"
    local = NodeState(node.work / "node.sqlite").get(run["id"])
    assert local is not None and local.status == "uploaded" and local.attempts == 1
    events = [str(e.details.get("event")) for e in AuditLog(node.work / "audit.sqlite").entries()]
    # The answer to the stored upload was lost: the retry met "already has a release".
    assert "release_already_uploaded" in events and "release_uploaded" not in events
    assert AuditLog(node.work / "audit.sqlite").verify().ok
    with site_net.researcher() as client:
        summary = client.results(study, site_net.tmp / "results")
    assert summary["ok"] and summary["complete"], summary
