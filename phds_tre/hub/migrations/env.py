"""Alembic environment: migrate the connection :func:`phds_tre.hub.store.upgrade` hands over.

There is no ``alembic.ini``: the store builds the ``Config`` in code and passes an open
connection in ``config.attributes["connection"]`` (so SQLite pragmas and PostgreSQL
advisory locks taken by the store apply to the migration too).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from phds_tre.hub.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    """Run the migrations on the given connection (or on ``sqlalchemy.url``)."""
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.connect() as conn:
            context.configure(connection=conn, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL for ``sqlalchemy.url`` without a database (``alembic upgrade --sql``)."""
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
