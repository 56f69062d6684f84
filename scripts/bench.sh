#!/usr/bin/env bash
# Run the benchmark: scripts/bench.sh [--quick] [--out DIR] [--redis-url URL]
#
# Builds .venv on first use (and when pyproject.toml changes, see
# scripts/_setup.sh), installs the benchmark's own packages from
# scripts/bench-requirements.txt into it, makes sure redis-server is installed,
# then runs scripts/benchmark.py, which writes docs/benchmarks/ unless --out
# names another folder. The benchmark starts its own throwaway redis-server.
# With REDIS_URL set it uses that server instead and flushes it, so point
# REDIS_URL only at a throwaway server.
set -euo pipefail

source "$(dirname -- "$0")/_setup.sh"
setup_venv
setup_redis bench

# Reinstall the benchmark's packages when the requirements file changes; a
# rebuilt .venv loses the stamp with everything else.
requirements="$REPO_ROOT/scripts/bench-requirements.txt"
stamp="$VENV_DIR/.bench-requirements-stamp"
wanted=$(sha256sum <"$requirements" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    say "installing the benchmark's packages from scripts/bench-requirements.txt"
    "$VENV_PYTHON" -m pip install --quiet --disable-pip-version-check \
        --requirement "$requirements" >&2 \
        || die "pip install -r scripts/bench-requirements.txt failed (see the output above)"
    echo "$wanted" >"$stamp"
fi

exec "$VENV_PYTHON" "$REPO_ROOT/scripts/benchmark.py" "$@"
