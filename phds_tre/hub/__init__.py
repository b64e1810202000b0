"""The hub: the coordinator that stores studies, per-site runs and signed releases.

One module per concern: :mod:`.models` (ORM tables), :mod:`.store` (engine, Alembic
migrations, claiming runs), :mod:`.auth` (principals and bearer tokens),
:mod:`.schemas` (the REST models that make the OpenAPI document), :mod:`.archive`
(safe unpacking of uploaded release archives) and :mod:`.app` (the FastAPI routes).
"""

from __future__ import annotations

__all__: list[str] = []
