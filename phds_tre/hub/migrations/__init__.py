"""Alembic environment of the hub store (run programmatically by :mod:`phds_tre.hub.store`)."""
