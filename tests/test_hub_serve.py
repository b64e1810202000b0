"""`phds hub serve` is a real HTTP service on loopback with a published OpenAPI spec."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

PHDS = Path(sys.executable).with_name("phds")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_hub_serves_health_and_openapi(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [str(PHDS), "hub", "serve", "--data", str(tmp_path / "hub"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                assert time.monotonic() < deadline, "the hub did not start within 30 s"
                time.sleep(0.2)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        spec = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5).json()
        assert spec["info"]["title"] == "phds_tre hub"
        assert {"/studies", "/nodes/next", "/runs/{run_id}/release"} <= set(spec["paths"])
        unauthorised = httpx.get(f"http://127.0.0.1:{port}/studies", timeout=5)
        assert unauthorised.status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)
