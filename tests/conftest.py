"""Shared fixtures: synthetic hospitals, made once per test session."""

from __future__ import annotations

from collections.abc import Iterator
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


# -- the hub store on SQLite and on a real PostgreSQL ------------------------------------------


def _pg_admin_url() -> str:
    """The test PostgreSQL (``PHDS_TEST_PG_URL``, set by scripts/postgres.sh); else fail/skip.

    Under CI (``CI=true``) a missing server is a failure, never a skip.
    """
    import os

    url = os.environ.get("PHDS_TEST_PG_URL", "")
    if not url:
        message = (
            "PHDS_TEST_PG_URL is not set: start the test PostgreSQL with "
            "`source scripts/postgres.sh` (scripts/test.sh does)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.fixture
def pg_db_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (SQLAlchemy URL), dropped after the test."""
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(_pg_admin_url())
    name = f"phds_t_{uuid.uuid4().hex[:16]}"
    conninfo = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            # FORCE: a hub process or pool a failed test left behind must not keep it alive.
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def hub_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh hub database: an SQLite file, then a new database on the test PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hub.sqlite'}"
    else:
        yield request.getfixturevalue("pg_db_url")
