"""A network on loopback for the network benchmarks and the load and fault tests.

* :class:`HubProcess` — a real ``phds hub serve`` process (SQLite file) on a free
  loopback port: started, killed (``SIGKILL``), restarted on the same database.
* :func:`bootstrap` — principals, keys and tokens written straight into the hub's
  database (as ``phds hub admin`` does), before the hub starts.
* :class:`ReleaseTemplate` — a signed release for any run, study and site: the files
  are written once by the project's release writer
  (:func:`phds_tre.release.manifest.write_release`); each run gets its own manifest
  (study, site, run), signed with the site's key by
  :func:`phds_tre.release.signing.sign_manifest`. The hub verifies it like any other.
* :class:`PollingNode` — a lightweight node speaking the node HTTP API directly (a
  thread with its own ``httpx`` client): long-polls ``POST /nodes/next``, stamps when
  each claim arrives, reports ``running`` and ``checking`` and uploads the release. It
  runs no notebook: it stands for 50 hospitals on a 2-core machine.

Used by ``benchmarks/run_network.py`` and ``tests/test_network_load.py`` (which puts
this folder on ``sys.path``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nbformat
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nbformat.v4 import new_code_cell, new_notebook

from phds_tre.bundle import build_bundle
from phds_tre.hub.auth import create_principal, issue_token
from phds_tre.hub.store import Store, default_db_url
from phds_tre.release.manifest import MANIFEST_NAME, SIGNATURE_NAME, write_release
from phds_tre.release.notebook import ReleaseNotebook
from phds_tre.release.signing import generate_key, sign_manifest

__all__ = [
    "PHDS",
    "HubProcess",
    "Network",
    "PollingNode",
    "ReleaseTemplate",
    "bootstrap",
    "free_port",
    "study_bundle",
    "tiny_notebook",
]

#: The ``phds`` command of this venv.
PHDS = Path(sys.executable).with_name("phds")
#: Lifetime of the tokens made by :func:`bootstrap` (a day: longer than any run here).
TOKEN_LIFETIME_S = 24 * 3600


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _b64_public(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


# -- the hub ----------------------------------------------------------------------------------


@dataclass
class HubProcess:
    """``phds hub serve`` on ``127.0.0.1:port`` with its data (and SQLite file) in ``data_dir``."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The hub's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the hub's stdout and stderr go (appended across restarts)."""
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self, timeout: float = 60.0) -> None:
        """Start the process and wait until ``/health`` answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(PHDS), "hub", "serve", "--data", str(self.data_dir), "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the caller does not reach it first
            )
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the hub exited at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the hub did not answer within {timeout} s: {self.log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """``kill -9`` the hub (no clean shutdown) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop the hub cleanly (SIGTERM), killing it if it does not exit in 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def rss_bytes(self) -> int:
        """The hub process's resident memory now (bytes)."""
        import psutil  # a dependency of ipykernel, so always present with phds_tre

        assert self.proc is not None
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the hub's log, for error messages."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


@dataclass
class Network:
    """Who may talk to a hub: one researcher and one node per site, with keys and tokens."""

    data_dir: Path
    researcher: str
    researcher_token: str
    researcher_key: Ed25519PrivateKey
    researcher_key_path: Path
    sites: list[str]
    node_tokens: dict[str, str]
    node_keys: dict[str, Ed25519PrivateKey]
    node_key_paths: dict[str, Path]


def bootstrap(data_dir: Path, sites: Sequence[str], researcher: str = "dr_net") -> Network:
    """Register a researcher and a node per site (keys in ``data_dir/../keys``) and issue tokens.

    Written directly to the hub's database (migrating it), as ``phds hub admin`` does,
    so 50 nodes are registered in a second rather than 100 CLI starts.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    keys_dir = data_dir.parent / "keys"
    keys_dir.mkdir(exist_ok=True)
    store = Store(default_db_url(data_dir))
    try:
        rkey_path = keys_dir / f"{researcher}.pem"
        rkey = generate_key(rkey_path)
        create_principal(store, researcher, "researcher", None, _b64_public(rkey))
        rtoken, _ = issue_token(store, researcher, TOKEN_LIFETIME_S)
        tokens: dict[str, str] = {}
        keys: dict[str, Ed25519PrivateKey] = {}
        paths: dict[str, Path] = {}
        for site in sites:
            paths[site] = keys_dir / f"{site}.pem"
            keys[site] = generate_key(paths[site])
            create_principal(store, f"node_{site}", "node", site, _b64_public(keys[site]))
            tokens[site], _ = issue_token(store, f"node_{site}", TOKEN_LIFETIME_S)
    finally:
        store.dispose()
    return Network(data_dir, researcher, rtoken, rkey, rkey_path, list(sites), tokens, keys, paths)


# -- studies ----------------------------------------------------------------------------------


def tiny_notebook(path: Path) -> Path:
    """A one-parameter notebook (what the load test submits; nothing executes it)."""
    nb = new_notebook(
        cells=[
            new_code_cell("n = 1", metadata={"tags": ["parameters"]}),
            new_code_cell("n + 1"),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    nbformat.write(nb, path)
    return path


def study_bundle(
    notebook: Path,
    title: str,
    sites: Sequence[str],
    network: Network,
    parameters: Mapping[str, Any] | None = None,
) -> bytes:
    """A signed study bundle (zip bytes) of ``notebook`` for ``sites``."""
    fields = {
        "title": title,
        "researcher": network.researcher,
        "sites": list(sites),
        "parameters": dict(parameters or {}),
    }
    return build_bundle(notebook, fields, network.researcher_key).to_bytes()


def submit(client: httpx.Client, bundle: bytes) -> dict[str, Any]:
    """``POST /studies`` with a researcher's client; the stored study (raises on a refusal)."""
    response = client.post("/studies", content=bundle, headers={"Content-Type": "application/zip"})
    response.raise_for_status()
    study: dict[str, Any] = response.json()
    return study


# -- releases ---------------------------------------------------------------------------------


class ReleaseTemplate:
    """The files of one release, written once; a signed archive per run on demand."""

    def __init__(self) -> None:
        """Write an (empty) release with the project's writer and keep its files in memory."""
        with tempfile.TemporaryDirectory(prefix="phds-release-template-") as tmp:
            signer = Ed25519PrivateKey.generate()  # replaced by each site's key per run
            folder = write_release(
                Path(tmp),
                ReleaseNotebook(notebook=new_notebook(), items=()),
                {"study_id": "template", "site": "template", "run_id": "template"},
                {},
                signer,
            )
            self.files = {
                p.relative_to(folder).as_posix(): p.read_bytes()
                for p in sorted(folder.rglob("*"))
                if p.is_file() and p.name not in (MANIFEST_NAME, SIGNATURE_NAME)
            }
            self.manifest: dict[str, Any] = json.loads((folder / MANIFEST_NAME).read_text())

    def archive(self, study_id: str, site: str, run_id: str, key: Ed25519PrivateKey) -> bytes:
        """The release of ``run_id`` (zip bytes): same files, its own manifest, signed by ``key``."""
        manifest = {**self.manifest, "study_id": study_id, "site": site, "run_id": run_id}
        members = {
            **self.files,
            MANIFEST_NAME: json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n",
            SIGNATURE_NAME: json.dumps(sign_manifest(manifest, key), indent=1).encode() + b"\n",
        }
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, content in sorted(members.items()):
                archive.writestr(name, content)
        return buffer.getvalue()


# -- lightweight nodes ------------------------------------------------------------------------


@dataclass
class Claim:
    """One claim a node received: when (``time.perf_counter``), which run, and what happened."""

    run_id: str
    study_id: str
    site: str
    received: float
    released: float | None = None
    problem: str | None = None


class PollingNode(threading.Thread):
    """A node thread: long-poll, then ``running`` → ``checking`` → signed release, per claim.

    Every claim is appended to :attr:`claims` (shared by all nodes, under :attr:`lock`);
    a request the hub refuses is recorded as the claim's ``problem`` (never retried, so
    a lost or duplicated run shows). Transport errors are retried after a short pause.
    """

    def __init__(
        self,
        hub_url: str,
        site: str,
        token: str,
        key: Ed25519PrivateKey,
        template: ReleaseTemplate,
        claims: list[Claim],
        lock: threading.Lock,
        *,
        wait: int = 25,
        on_claim: threading.Event | None = None,
    ) -> None:
        """A node of ``site`` (not started); ``wait`` is the long-poll's seconds."""
        super().__init__(name=f"node-{site}", daemon=True)
        self.site = site
        self.key = key
        self.template = template
        self.claims = claims
        self.lock = lock
        self.wait = wait
        self.on_claim = on_claim
        self.polls = 0
        self.errors = 0
        self._stop_event = threading.Event()
        self.client = httpx.Client(
            base_url=hub_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30.0, read=wait + 30.0),
        )

    def stop(self) -> None:
        """Stop after the current long-poll (closing the client ends it at once)."""
        self._stop_event.set()

    def run(self) -> None:
        """Poll and process until stopped."""
        try:
            while not self._stop_event.is_set():
                try:
                    response = self.client.post("/nodes/next", params={"wait": self.wait})
                except httpx.TransportError:
                    if self._stop_event.is_set():
                        return
                    self.errors += 1
                    self._stop_event.wait(0.2)
                    continue
                received = time.perf_counter()
                self.polls += 1
                if response.status_code == 204:
                    continue
                if response.status_code != 200:
                    self.errors += 1
                    self._stop_event.wait(0.2)
                    continue
                body = response.json()
                claim = Claim(str(body["run"]["id"]), str(body["study_id"]), self.site, received)
                with self.lock:
                    self.claims.append(claim)
                if self.on_claim is not None:
                    self.on_claim.set()
                self.process(claim)
        finally:
            self.client.close()

    def process(self, claim: Claim) -> None:
        """Report ``running`` and ``checking``, upload the signed release; note any refusal."""
        steps: list[tuple[str, dict[str, Any]]] = [
            ("status", {"status": "running", "cells_done": 0, "cells_total": 2}),
            ("status", {"status": "checking", "cells_done": 2, "cells_total": 2}),
        ]
        try:
            for _, body in steps:
                r = self.client.post(f"/runs/{claim.run_id}/status", json=body)
                if r.status_code != 200:
                    claim.problem = f"status {body['status']}: {r.status_code} {r.text[:200]}"
                    return
            data = self.template.archive(claim.study_id, self.site, claim.run_id, self.key)
            r = self.client.post(
                f"/runs/{claim.run_id}/release",
                content=data,
                headers={"Content-Type": "application/zip"},
            )
            if r.status_code != 201:
                claim.problem = f"release: {r.status_code} {r.text[:200]}"
                return
            claim.released = time.perf_counter()
        except httpx.TransportError as exc:
            claim.problem = f"transport: {type(exc).__name__}"


def start_nodes(
    network: Network,
    hub_url: str,
    template: ReleaseTemplate,
    *,
    wait: int = 25,
) -> tuple[list[PollingNode], list[Claim], threading.Lock]:
    """One started :class:`PollingNode` per site of ``network``; the shared claims list."""
    claims: list[Claim] = []
    lock = threading.Lock()
    nodes = [
        PollingNode(
            hub_url,
            site,
            network.node_tokens[site],
            network.node_keys[site],
            template,
            claims,
            lock,
            wait=wait,
        )
        for site in network.sites
    ]
    for node in nodes:
        node.start()
    return nodes, claims, lock


def stop_nodes(nodes: Sequence[PollingNode], timeout: float = 10.0) -> None:
    """Stop every node; a node blocked in a long-poll is cut off by closing its client."""
    for node in nodes:
        node.stop()
    for node in nodes:
        node.client.close()  # ends a pending long-poll with a transport error
    deadline = time.monotonic() + timeout
    for node in nodes:
        node.join(max(0.0, deadline - time.monotonic()))
