"""A whole federated network on localhost: one hub and one node per synthetic hospital.

Every part is the real thing a hospital or a coordinator runs: ``phds hub serve``
and ``phds node serve`` as separate processes talking HTTP on loopback, each
with its own keys, tokens, database, audit log and working folder. Only the
bootstrap (principals, tokens, keys) is done here directly, as a hub admin and
site admins would do once by hand.

:class:`LocalNetwork` is a context manager: leaving it — normally, on an error
or on Ctrl-C — stops every process it started (terminate, then kill after a
grace period), so the demo never leaves servers behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from phds_tre.release.signing import (
    generate_key,
    load_public_key,
    public_key_b64,
    public_key_path,
)

__all__ = ["LocalNetwork", "NetworkError", "NodeProcess", "free_port"]

#: Seconds a process gets to stop after SIGTERM before it is killed.
STOP_GRACE_S = 10.0
#: Seconds to wait for the hub to answer /health after starting.
HUB_START_S = 60.0
#: How long the demo's tokens live: long enough for any demo, short enough to be harmless.
TOKEN_LIFETIME_S = 24 * 3600


class NetworkError(RuntimeError):
    """A part of the local network did not start or stopped unexpectedly."""


def free_port() -> int:
    """A free TCP port on loopback (bound and released; good enough on a quiet machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _phds_command() -> list[str]:
    """The ``phds`` command of this Python environment (a console script or ``-m``)."""
    script = Path(sys.executable).with_name("phds")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from phds_tre.cli import main; main()"]


def _ensure_key(path: Path) -> Path:
    """An Ed25519 key pair at ``path`` / ``path.pub`` (made once, kept for later runs)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        generate_key(path)
    return path


@dataclass
class NodeProcess:
    """One hospital's node: its site, data, working folder and process."""

    site: str
    data_dir: Path
    work_dir: Path
    key_path: Path
    log_path: Path
    #: The node's review API (loopback) and the demo reviewer's token for it.
    review_url: str = ""
    reviewer_token: str = ""
    process: subprocess.Popen[bytes] | None = None


@dataclass
class LocalNetwork:
    """A hub and one node per site folder of ``data_root``, all under ``root``.

    ``root`` holds ``hub/`` (database, bundles, releases, audit log), ``nodes/<site>/``
    (node state, runs, audit log), ``keys/`` and ``logs/``. Re-using a root keeps
    its keys and history; the principals are registered once.
    """

    root: Path
    data_root: Path
    sites: Sequence[str]
    policy_path: Path | None = None
    researcher: str = "demo-researcher"
    #: Each hospital's reviewer (never the researcher: authors cannot review their study).
    reviewer: str = "demo-reviewer"
    hub_url: str = ""
    researcher_token: str = ""
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    _hub: subprocess.Popen[bytes] | None = None
    _logs: list[object] = field(default_factory=list)

    # -- paths -------------------------------------------------------------------------

    @property
    def hub_dir(self) -> Path:
        """The hub's data folder."""
        return self.root / "hub"

    @property
    def keys_dir(self) -> Path:
        """Every key of the demo (researcher and sites)."""
        return self.root / "keys"

    @property
    def researcher_key(self) -> Path:
        """The researcher's signing key."""
        return self.keys_dir / f"{self.researcher}.pem"

    def site_key(self, site: str) -> Path:
        """A site's release signing key."""
        return self.keys_dir / f"{site}.pem"

    def site_public_keys(self) -> dict[str, list[Ed25519PublicKey]]:
        """Each site's public key: what the researcher trusts its releases to be signed with."""
        return {s: [load_public_key(public_key_path(self.site_key(s)))] for s in self.sites}

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> LocalNetwork:
        """Bootstrap and start everything; on any failure stop what was started."""
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop every process, whatever happened."""
        self.stop()

    def start(self) -> None:
        """Register principals and tokens, start the hub, wait for it, start the nodes."""
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        tokens = self._bootstrap()
        port = free_port()
        self.hub_url = f"http://127.0.0.1:{port}"
        self._hub = self._spawn(
            [*_phds_command(), "hub", "serve", "--data", str(self.hub_dir), "--port", str(port)],
            self.root / "logs" / "hub.log",
            {},
        )
        self._wait_for_hub()
        for site in self.sites:
            self._start_node(site, tokens[site])

    def _bootstrap(self) -> dict[str, str]:
        """Keys, principals and fresh tokens (the researcher's and one per node)."""
        from phds_tre.hub.auth import create_principal, issue_token
        from phds_tre.hub.store import Store, default_db_url

        _ensure_key(self.researcher_key)
        self.hub_dir.mkdir(parents=True, exist_ok=True)
        store = Store(default_db_url(self.hub_dir))
        try:
            wanted: list[tuple[str, str, str | None, Path]] = [
                (self.researcher, "researcher", None, self.researcher_key)
            ]
            wanted += [(f"node-{s}", "node", s, _ensure_key(self.site_key(s))) for s in self.sites]
            for name, role, site, key in wanted:
                try:
                    create_principal(
                        store,
                        name,
                        role,
                        site,
                        public_key_b64(load_public_key(public_key_path(key))),
                    )
                except ValueError as exc:
                    if "already exists" not in str(exc):
                        raise
            self.researcher_token, _ = issue_token(store, self.researcher, TOKEN_LIFETIME_S)
            return {s: issue_token(store, f"node-{s}", TOKEN_LIFETIME_S)[0] for s in self.sites}
        finally:
            store.engine.dispose()

    def _spawn(
        self, command: list[str], log_path: Path, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        log = log_path.open("ab")
        self._logs.append(log)
        # A new session: Ctrl-C in the terminal reaches the demo, which stops its
        # children in order (nodes first) instead of every process dying at once.
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )

    def _wait_for_hub(self) -> None:
        deadline = time.monotonic() + HUB_START_S
        while time.monotonic() < deadline:
            if self._hub is not None and self._hub.poll() is not None:
                raise NetworkError(
                    f"the hub exited at start (code {self._hub.returncode}); "
                    f"see {self.root / 'logs' / 'hub.log'}"
                )
            try:
                if httpx.get(f"{self.hub_url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise NetworkError(f"the hub did not answer within {HUB_START_S:.0f} s")

    def _start_node(self, site: str, token: str) -> None:
        node = NodeProcess(
            site=site,
            data_dir=self.data_root / site,
            work_dir=self.root / "nodes" / site,
            key_path=self.site_key(site),
            log_path=self.root / "logs" / f"node-{site}.log",
        )
        node.work_dir.mkdir(parents=True, exist_ok=True)
        # The hospital's reviewer works through the node's review API, as the JupyterLab
        # extension will: a token issued by the site, the API on loopback only.
        from phds_tre.node.api import issue_reviewer_token

        node.reviewer_token = issue_reviewer_token(node.work_dir, self.reviewer)
        review_port = free_port()
        node.review_url = f"http://127.0.0.1:{review_port}"
        command = [
            *_phds_command(),
            "node",
            "serve",
            "--hub",
            self.hub_url,
            "--site",
            site,
            "--data",
            str(node.data_dir),
            "--work",
            str(node.work_dir),
            "--key",
            str(node.key_path),
            "--researcher-key",
            str(public_key_path(self.researcher_key)),
            "--review-port",
            str(review_port),
        ]
        if self.policy_path is not None:
            command += ["--policy", str(self.policy_path)]
        # The token goes by environment, never on a command line others can read.
        node.process = self._spawn(command, node.log_path, {"PHDS_NODE_TOKEN": token})
        self.nodes[site] = node

    def check_alive(self) -> None:
        """Raise :class:`NetworkError` naming any part that has stopped."""
        if self._hub is not None and self._hub.poll() is not None:
            raise NetworkError(f"the hub stopped (code {self._hub.returncode}); see logs/hub.log")
        for node in self.nodes.values():
            if node.process is not None and node.process.poll() is not None:
                raise NetworkError(
                    f"the node of {node.site} stopped (code {node.process.returncode}); "
                    f"see {node.log_path}"
                )

    def pids(self) -> list[int]:
        """Process ids of everything running (for tests and for the log)."""
        procs = [n.process for n in self.nodes.values()] + [self._hub]
        return [p.pid for p in procs if p is not None and p.poll() is None]

    def stop(self) -> None:
        """Stop nodes first (they finish their HTTP calls), then the hub; close logs."""
        for proc in [n.process for n in self.nodes.values()]:
            _terminate(proc)
        for proc in [n.process for n in self.nodes.values()]:
            _reap(proc)
        _terminate(self._hub)
        _reap(self._hub)
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]
        self._logs.clear()


def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        # SIGINT first: both servers treat it as Ctrl-C and shut down cleanly
        # (the node closes its kernel pool, which kills its kernels).
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGINT)


def _reap(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Anything the server left in its session (kernels) goes too.
    with _suppress_lookup():
        os.killpg(proc.pid, signal.SIGKILL)


def _suppress_lookup() -> suppress:
    # The process (group) may be gone already, or never have been ours to signal.
    return suppress(ProcessLookupError, PermissionError)
