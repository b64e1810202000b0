# Sourced by scripts/test.sh and scripts/demo.sh: create .venv and install the
# project with its test extra. Idempotent; a second run only checks.
set -euo pipefail
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import phds_tre, pytest, hypothesis, ruff, mypy" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.phds-installed ]; then
    echo "== installing phds_tre[test] into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install --quiet -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import phds_tre" # fail loudly if the install did not work
    touch .venv/.phds-installed
fi
# papermill needs a Jupyter kernel that runs this venv's Python.
if [ ! -d .venv/share/jupyter/kernels/python3 ]; then
    .venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
fi
