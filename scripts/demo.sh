#!/usr/bin/env bash
# Set everything up on a fresh machine and run the main job: the local demo.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/phds demo "$@"
