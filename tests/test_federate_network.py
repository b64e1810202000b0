"""``federate.run_glm`` end to end: a real hub on loopback, three hospital nodes, rounds to convergence."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nbformat
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from phds_tre import federate
from phds_tre.client import Hub as Client
from phds_tre.federate.network import FederatedRunError
from phds_tre.hub.app import create_app
from phds_tre.hub.auth import create_principal, issue_token
from phds_tre.node import NodeAgent
from phds_tre.release.signing import generate_key, load_public_key
from phds_tre.site_policy import ApprovalPolicy, SitePolicy

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "sepsis_logistic.ipynb"
FORMULA = "died ~ lactate + age + C(sex)"
LEVELS = {"sex": ["F", "M"]}
#: Left out: its cohort has fewer than 10 deaths, so its share is withheld and the GLM
#: drops it (tested with the GLM itself); here every site takes part.
SMALL_SITE = "hospital_c_girona"


def _b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def site_cohort(site_dir: Path) -> pd.DataFrame:
    """The cohort the study notebook builds at a site: its ``cohort`` cell, run here as is."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in nb.cells if "cohort" in c.metadata.get("tags", [])]
    from phds_tre.data import connect

    namespace: dict[str, Any] = {"min_age_years": 0}
    source = cell.source.replace("data.connect()", "_connect()")
    namespace["_connect"] = lambda: connect(site_dir)
    exec(compile(source, str(NOTEBOOK), "exec"), namespace)
    cohort: pd.DataFrame = namespace["cohort"]
    return cohort


@dataclass
class Network:
    """A hub on loopback and one serving node per synthetic hospital."""

    url: str
    researcher: str
    key: Ed25519PrivateKey
    sites: list[str]
    site_dirs: list[Path]
    node_keys: dict[str, Path]
    app: Any
    tokens: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def glm_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three synthetic hospitals whose PICU sepsis cohorts each pass the GLM share's checks."""
    from phds_tre.data.synth import generate

    root = tmp_path_factory.mktemp("glm-sites")
    generate(root, sites=4, seed=11)
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != SMALL_SITE)


@pytest.fixture
def network(tmp_path: Path, glm_sites: list[Path], phds_home: Path) -> Iterator[Network]:
    site_dirs = glm_sites
    sites = [p.name for p in site_dirs]
    app = create_app(f"sqlite:///{tmp_path / 'hub.sqlite'}", tmp_path / "hub", poll_interval_s=0.5)
    store = app.state.hub.store
    key = generate_key(tmp_path / "dr_a.pem")
    create_principal(store, "dr_a", "researcher", None, _b64(key))
    node_keys: dict[str, Path] = {}
    tokens: dict[str, str] = {}
    for site in sites:
        node_keys[site] = tmp_path / f"{site}.pem"
        create_principal(store, f"node_{site}", "node", site, _b64(generate_key(node_keys[site])))
        tokens[site] = issue_token(store, f"node_{site}", 3600)[0]
    researcher, _ = issue_token(store, "dr_a", 3600)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threads = [threading.Thread(target=server.run, daemon=True)]
    threads[0].start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline, "the hub did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    policy = SitePolicy(approval=ApprovalPolicy(later_rounds="auto"))
    agents = [
        NodeAgent(
            url,
            tokens[site],
            site,
            site_dir,
            policy,
            tmp_path / f"node-{site}",
            node_keys[site],
            [key.public_key()],
            poll_wait=2,
            backoff_base_s=0.1,
            backoff_cap_s=0.5,
        )
        for site, site_dir in zip(sites, site_dirs, strict=True)
    ]
    for agent in agents:
        threads.append(threading.Thread(target=agent.run_forever, daemon=True))
        threads[-1].start()
    try:
        yield Network(url, researcher, key, sites, site_dirs, node_keys, app)
    finally:
        for agent in agents:
            agent.stop()
        server.should_exit = True
        for thread in threads:
            thread.join(timeout=20)
        for agent in agents:
            agent.close()
        store.dispose()


@pytest.fixture
def network_without_nodes(tmp_path: Path, glm_sites: list[Path]) -> Iterator[Network]:
    """A hub on loopback with the three sites registered but no node serving them."""
    sites = [p.name for p in glm_sites]
    app = create_app(f"sqlite:///{tmp_path / 'hub.sqlite'}", tmp_path / "hub", poll_interval_s=0.2)
    store = app.state.hub.store
    key = generate_key(tmp_path / "dr_a.pem")
    create_principal(store, "dr_a", "researcher", None, _b64(key))
    tokens = {}
    for site in sites:
        create_principal(store, f"node_{site}", "node", site, _b64(Ed25519PrivateKey.generate()))
        tokens[site] = issue_token(store, f"node_{site}", 3600)[0]
    researcher, _ = issue_token(store, "dr_a", 3600)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline, "the hub did not start"
        time.sleep(0.02)
    yield Network(f"http://127.0.0.1:{port}", researcher, key, sites, glm_sites, {}, app, tokens)
    server.should_exit = True
    thread.join(timeout=10)
    store.dispose()


@pytest.mark.slow
def test_run_glm_over_three_sites_equals_statsmodels_on_the_pooled_rows(
    network: Network, tmp_path: Path
) -> None:
    site_keys = {s: [load_public_key(f"{network.node_keys[s]}.pub")] for s in network.sites}
    with Client(network.url, network.researcher) as hub:
        fit = federate.run_glm(
            hub,
            NOTEBOOK,
            network.sites,
            FORMULA,
            "binomial",
            levels=LEVELS,
            title="PICU sepsis mortality (federated)",
            key=network.key,
            site_keys=site_keys,
            work_dir=tmp_path / "rounds",
            round_timeout_s=300,
            progress=False,
        )
        study = hub.study(fit.study_id)

    pooled = pd.concat([site_cohort(d) for d in network.site_dirs], ignore_index=True)
    pooled["sex"] = pd.Categorical(pooled["sex"], categories=LEVELS["sex"])
    reference = smf.glm(FORMULA, pooled, family=sm.families.Binomial()).fit()
    assert fit.result is not None and fit.model.converged
    assert list(fit.result.params.index) == list(reference.params.index)
    np.testing.assert_allclose(fit.result.params, reference.params, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fit.result.bse, reference.bse, rtol=0, atol=1e-6)
    assert fit.result.nobs == len(pooled)
    assert fit.iterations == reference.fit_history["iteration"]
    # One round per IRLS iteration plus the one that shows convergence; one timing each.
    assert [t.round for t in fit.rounds] == list(range(1, fit.iterations + 2))
    assert study["rounds"] == len(fit.rounds)
    for timing in fit.rounds:
        assert set(timing.sites) == set(network.sites)
        assert timing.site_s == max(timing.sites.values()) and timing.wall_s > timing.site_s
    # Every round's runs were released exactly once, one per site.
    by_round: dict[int, list[str]] = {}
    for run in study["runs"]:
        assert run["status"] == "released", run["history"]
        assert [e["status"] for e in run["history"]].count("released") == 1
        by_round.setdefault(run["round"], []).append(run["site"])
    assert by_round == {n: sorted(network.sites) for n in range(1, len(fit.rounds) + 1)}
    # Each release names its round; the state it ran with is the round's signed one.
    last = tmp_path / "rounds" / f"round-{len(fit.rounds)}"
    for site in network.sites:
        manifest = json.loads((last / site / "release" / "manifest.json").read_text())
        assert manifest["round"] == len(fit.rounds)
        assert json.loads(manifest["parameters"]["glm_state"])["iteration"] == fit.iterations
    assert os.path.isdir(tmp_path / "rounds" / "round-1")


def test_run_glm_stops_with_the_reason_when_a_site_does_not_release(
    network_without_nodes: Network, tmp_path: Path
) -> None:
    net = network_without_nodes
    failures: list[BaseException] = []

    def fit(timeout: float, title: str) -> None:
        with Client(net.url, net.researcher) as hub:
            try:
                federate.run_glm(
                    hub,
                    NOTEBOOK,
                    net.sites,
                    FORMULA,
                    levels=LEVELS,
                    title=title,  # a study of its own (same bundle in one second: same id)
                    key=net.key,
                    round_timeout_s=timeout,
                    progress=False,
                )
            except Exception as exc:
                failures.append(exc)

    # A site refuses the run: the fit stops at once, naming the site and its reason.
    worker = threading.Thread(target=fit, args=(60.0, "refused"), daemon=True)
    worker.start()
    for site, token in net.tokens.items():
        claimed = httpx.post(f"{net.url}/nodes/next?wait=10", headers=_auth(token), timeout=30)
        assert claimed.status_code == 200, claimed.text
        status = "rejected" if site == net.sites[0] else "failed"
        httpx.post(
            f"{net.url}/runs/{claimed.json()['run']['id']}/status",
            json={"status": status, "detail": f"{status} by the test"},
            headers=_auth(token),
        ).raise_for_status()
    worker.join(timeout=30)
    (refused,) = failures
    assert isinstance(refused, FederatedRunError)
    assert str(refused).startswith(f"round 1: {net.sites[0]} rejected (rejected by the test); ")

    # Nobody serves the sites: the round times out, naming what is unfinished.
    fit(0.3, "unserved")
    assert isinstance(failures[-1], TimeoutError)
    assert re.fullmatch(r"round 1 of study \w+ unfinished: .*queued.*", str(failures[-1]))
