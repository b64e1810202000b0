"""Read-only access to one site's OMOP tables, the same at a hospital and in a dry run.

A site is a folder of ``<table>.parquet`` files. :func:`connect` opens an
in-memory DuckDB database with one VIEW per file, then closes DuckDB's door to
the file system, so that a notebook can read the site's tables and nothing else.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # duckdb is imported lazily: `import phds_tre.data` must stay cheap.
    import duckdb
    import pandas as pd

#: Environment variables set by the executor (``phds run`` / the node) for the kernel.
SITE_DIR_ENV = "PHDS_SITE_DIR"
SITE_NAME_ENV = "PHDS_SITE_NAME"

_NOT_CONFIGURED = (
    "no site data is configured: data.connect() works inside a run started by phds run / "
    "the node; for a local dry run use phds run --data DIR"
)
# A file becomes a view only if its stem is a plain SQL identifier (no quoting games).
_TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


class SiteDataError(RuntimeError):
    """The site's data cannot be opened, or a request to it is not allowed."""


class Site:
    """One site's OMOP tables, readable through pandas and DuckDB SQL.

    Create it with :func:`connect`. The underlying DuckDB database lives in
    memory; it has a view per table and no access to any other file.
    """

    def __init__(self, name: str, path: Path, con: duckdb.DuckDBPyConnection, tables: list[str]):
        """Wrap an already locked-down connection (use :func:`connect`)."""
        self.name = name
        self.path = path
        self._con = con
        self._tables = tables

    def __repr__(self) -> str:
        return f"Site(name={self.name!r}, tables={self._tables!r})"

    def tables(self) -> list[str]:
        """Names of the site's tables, sorted."""
        return list(self._tables)

    def table(self, name: str) -> pd.DataFrame:
        """Return one whole OMOP table as a pandas DataFrame."""
        if name not in self._tables:
            raise SiteDataError(
                f"site {self.name!r} has no table {name!r}; its tables are: "
                + ", ".join(self._tables)
            )
        return self._con.execute(f'SELECT * FROM "{name}"').df()

    def sql(self, query: str, params: Any = None) -> pd.DataFrame:
        """Run one read-only DuckDB query over the site's tables and return a DataFrame.

        Each table is a view named after it (``SELECT * FROM person``). Only a
        single SELECT (including WITH, FROM-first, VALUES), DESCRIBE, SHOW or
        SUMMARIZE statement is accepted; ``params`` fills ``?`` / ``$name``
        placeholders.
        """
        import duckdb

        try:
            statements = self._con.extract_statements(query)
        except duckdb.Error as exc:
            raise SiteDataError(f"cannot parse the query: {exc}") from None
        if len(statements) != 1:
            raise SiteDataError(
                f"site.sql() runs exactly one statement; got {len(statements)}. "
                "Run them one call at a time."
            )
        # DuckDB parses WITH, DESCRIBE, SHOW and SUMMARIZE into SELECT statements, so
        # the one allowed type covers every read form; COPY, ATTACH, CREATE, INSERT,
        # INSTALL/LOAD, SET, PRAGMA, EXPORT, CALL... all have their own types.
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            raise SiteDataError(
                f"site data is read-only: {kind.name} statements are not allowed; "
                "use a single SELECT / WITH / DESCRIBE / SHOW / SUMMARIZE query"
            )
        try:
            return self._con.execute(query, params).df()
        except duckdb.CatalogException as exc:
            raise SiteDataError(
                f"query failed: {exc}\nthe site's tables are: " + ", ".join(self._tables)
            ) from None
        except duckdb.Error as exc:
            raise SiteDataError(f"query failed: {exc}") from None

    def close(self) -> None:
        """Close the in-memory database."""
        self._con.close()

    def __enter__(self) -> Site:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def connect(path: str | os.PathLike[str] | None = None, name: str | None = None) -> Site:
    """Open the site's data: the folder ``path``, or the one the executor configured.

    Without ``path`` the folder comes from ``PHDS_SITE_DIR`` and the name from
    ``PHDS_SITE_NAME`` (both set by ``phds run`` and the node); the name
    defaults to the folder's name. Raises :class:`SiteDataError` when no site
    is configured or the folder holds no tables.
    """
    if path is None:
        env_dir = os.environ.get(SITE_DIR_ENV, "").strip()
        if not env_dir:
            raise SiteDataError(_NOT_CONFIGURED)
        path = env_dir
        if name is None:
            name = os.environ.get(SITE_NAME_ENV, "").strip() or None
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise SiteDataError(f"site data folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.glob("*.parquet") if _TABLE_NAME.match(p.stem) and p.is_file())
    if not files:
        raise SiteDataError(f"site data folder {str(folder)!r} holds no <table>.parquet files")

    import duckdb

    # Extensions may not be fetched or loaded on demand: no network, no new code.
    con = duckdb.connect(
        ":memory:",
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
    )
    try:
        for f in files:
            con.execute(
                f'CREATE VIEW "{f.stem}" AS SELECT * FROM read_parquet({_sql_string(str(f))})'
            )
        # enable_external_access=false alone would also block the views' own reads
        # (checked with DuckDB 2.0: "file system operations are disabled"), so the
        # table files are listed in allowed_paths first. What then holds: reads of
        # exactly these files work; any other path (read_csv('/etc/passwd'), COPY ...
        # TO, ATTACH 'x.db', INSTALL) fails with a PermissionException, and the lock
        # stops SQL from turning access back on. sql() also rejects non-SELECTs.
        allowed = "[" + ", ".join(_sql_string(str(f)) for f in files) + "]"
        con.execute(f"SET allowed_paths = {allowed}")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except duckdb.Error as exc:
        con.close()
        raise SiteDataError(f"cannot open site data in {str(folder)!r}: {exc}") from None
    return Site(name or folder.name, folder, con, [f.stem for f in files])
