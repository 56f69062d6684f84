#!/usr/bin/env bash
# Run the demo: scripts/demo.sh [--keep-server]
#
# Builds .venv on first use (and when pyproject.toml changes), makes sure
# redis-server is installed (see scripts/_setup.sh), then runs scripts/demo.py.
# With REDIS_URL set, the demo uses that server instead of starting one.
set -euo pipefail

source "$(dirname -- "$0")/_setup.sh"
setup_venv
setup_redis demo

exec "$VENV_PYTHON" "$REPO_ROOT/scripts/demo.py" "$@"
