#!/usr/bin/env bash
# Run the test suite against a real Redis server: scripts/test.sh [PYTEST_ARGS...]
#
# Builds .venv on first use (and when pyproject.toml changes), makes sure a
# Redis server can be had (see scripts/_setup.sh), then runs python -m pytest
# in the repository with the arguments given. With REDIS_URL set, the tests use
# that server and flush its data before each test.
set -euo pipefail

source "$(dirname -- "$0")/_setup.sh"
setup_venv
setup_redis test

cd "$REPO_ROOT"
status=0
"$VENV_PYTHON" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    say "FAILED: pytest collected no tests (exit code 5)"
fi
exit "$status"
