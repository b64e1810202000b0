"""Site data access: one read-only call that works at a hospital and in a dry run."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from phds_tre import data
from phds_tre.data import synth

SITE = "hospital_c_girona"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small site; the folder holds only its parquet files."""
    root = tmp_path_factory.mktemp("sites")
    synth.generate(root, sites=3, persons=200, seed=3)
    return root / SITE


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under the folder with its hash and modification time."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
    }


def test_connect_outside_a_run_says_how_to_get_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.SITE_DIR_ENV, raising=False)
    with pytest.raises(data.SiteDataError) as err:
        data.connect()
    message = str(err.value)
    assert "no site data is configured" in message
    assert "phds run" in message and "--data DIR" in message


def test_connect_reads_the_folder_and_name_the_executor_configured(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(data.SITE_DIR_ENV, str(folder))
    monkeypatch.setenv(data.SITE_NAME_ENV, "girona")
    with data.connect() as site:
        assert site.name == "girona"
        assert site.path == folder.resolve()
    monkeypatch.delenv(data.SITE_NAME_ENV)
    with data.connect() as site:
        assert site.name == SITE  # the folder's name by default


def test_connect_takes_an_explicit_folder_and_refuses_empty_ones(
    folder: Path, tmp_path: Path
) -> None:
    with data.connect(folder, name="dry-run") as site:
        assert site.name == "dry-run"
    with pytest.raises(data.SiteDataError, match="does not exist"):
        data.connect(tmp_path / "missing")
    with pytest.raises(data.SiteDataError, match=r"no <table>\.parquet"):
        data.connect(tmp_path)


def test_tables_table_and_sql(folder: Path) -> None:
    with data.connect(folder) as site:
        assert site.tables() == sorted(synth.SCHEMA)
        person = site.table("person")
        assert len(person) == 200 * 1200 // 4000
        assert list(person.columns) == [col for col, _ in synth.SCHEMA["person"]]

        counts = site.sql(
            "SELECT gender_concept_id, count(*) AS n FROM person GROUP BY 1 ORDER BY 1"
        )
        assert counts.n.sum() == len(person)
        with_cte = site.sql(
            "WITH v AS (SELECT person_id FROM visit_occurrence) SELECT count(DISTINCT person_id) AS n FROM v"
        )
        assert with_cte.n[0] == len(person)
        assert "birth_datetime" in set(site.sql("DESCRIBE person").column_name)
        assert set(site.sql("SHOW TABLES").name) == set(synth.SCHEMA)
        assert len(site.sql("SUMMARIZE death")) == len(synth.SCHEMA["death"])
        assert len(site.sql("FROM person LIMIT 3")) == 3
        one = site.sql("SELECT * FROM person WHERE person_id = ?", [int(person.person_id[0])])
        assert len(one) == 1


def test_unknown_table_lists_the_tables(folder: Path) -> None:
    with data.connect(folder) as site:
        with pytest.raises(data.SiteDataError) as err:
            site.table("patients")
        assert "'patients'" in str(err.value)
        assert "person" in str(err.value) and "visit_occurrence" in str(err.value)
        with pytest.raises(data.SiteDataError, match="query failed") as err:
            site.sql("SELECT * FROM patients")
        assert "tables are: condition_occurrence, death" in str(err.value)


@pytest.mark.parametrize(
    "statement",
    [
        "COPY person TO '{out}/leak.csv'",
        "COPY (SELECT * FROM person) TO '{out}/leak.parquet' (FORMAT parquet)",
        "ATTACH '{out}/other.duckdb' AS other",
        "ATTACH ':memory:' AS scratch",
        "CREATE TABLE copy AS SELECT * FROM person",
        "CREATE VIEW v AS SELECT 1",
        "INSERT INTO person (person_id) VALUES (1)",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "PRAGMA database_list",
        "EXPORT DATABASE '{out}/dump'",
        "CALL pragma_version()",
        "EXPLAIN SELECT 1",
        "SELECT 1; COPY person TO '{out}/leak.csv'",
    ],
)
def test_statements_that_are_not_a_single_read_are_refused(
    folder: Path, tmp_path: Path, statement: str
) -> None:
    with data.connect(folder) as site, pytest.raises(data.SiteDataError) as err:
        site.sql(statement.format(out=tmp_path))
    assert "read-only" in str(err.value) or "exactly one statement" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_parquet('{elsewhere}')",
        "SELECT * FROM glob('/tmp/*')",
        "SELECT * FROM query('COPY person TO ''{out}/leak.csv''')",
    ],
)
def test_selects_cannot_reach_other_files(folder: Path, tmp_path: Path, query: str) -> None:
    elsewhere = folder.parent / "hospital_a_barcelona" / "person.parquet"
    with data.connect(folder) as site, pytest.raises(data.SiteDataError, match="query failed"):
        site.sql(query.format(elsewhere=elsewhere, out=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_the_site_folder_is_unchanged_after_use(folder: Path) -> None:
    before = _snapshot(folder)
    with data.connect(folder) as site:
        for table in site.tables():
            site.table(table)
        site.sql("SUMMARIZE measurement")
        site.sql("SELECT person_id, count(*) FROM measurement GROUP BY 1 ORDER BY 2 DESC")
        for attempt in (
            f"COPY person TO '{folder}/person.parquet' (FORMAT parquet)",
            f"COPY person TO '{folder}/extra.csv'",
            "CREATE TABLE person2 AS SELECT * FROM person",
        ):
            with pytest.raises(data.SiteDataError):
                site.sql(attempt)
    assert _snapshot(folder) == before


def test_importing_the_package_loads_neither_duckdb_nor_pandas() -> None:
    code = (
        "import sys; import phds_tre.data; "
        "print(sorted(m for m in ('duckdb', 'pandas', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
