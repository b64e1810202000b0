#!/usr/bin/env bash
# Set everything up on a fresh machine and run every test: lint, types, unit and
# integration tests, and a smoke run of the benchmark harness.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# The hub store tests run on SQLite and on this real PostgreSQL (PHDS_TEST_PG_URL).
source scripts/postgres.sh
trap phds_pg_stop EXIT

echo "== ruff"
.venv/bin/ruff check phds_tre tests benchmarks
.venv/bin/ruff format --check phds_tre tests benchmarks/*.py
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest "$@"
