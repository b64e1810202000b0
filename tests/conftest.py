"""Shared fixtures: synthetic hospitals, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small synthetic hospitals (``<root>/<site>/<table>.parquet``)."""
    from phds_tre.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, sites=3, persons=1500, seed=11)
    return root


@pytest.fixture(scope="session")
def site_dir(synth_sites: Path) -> Path:
    """The largest synthetic hospital's data folder."""
    return sorted(p for p in synth_sites.iterdir() if p.is_dir())[0]


@pytest.fixture
def phds_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private PHDS_HOME, so site keys made by a test stay in the test."""
    home = tmp_path / "phds-home"
    monkeypatch.setenv("PHDS_HOME", str(home))
    return home
