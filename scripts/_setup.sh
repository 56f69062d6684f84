# Shared setup of scripts/demo.sh and scripts/test.sh; source it, then call
# setup_venv and setup_redis. It needs bash and Python 3.10 or newer.
#
# Variables it reads:
#   PYTHON                          interpreter that creates .venv (default python3)
#   REDIS_URL                       use this Redis server; nothing is installed
#   CONCURRENT_RUNS_INSTALL_REDIS   1: install redis-server with apt-get when it is
#                                   missing; 0: never; unset: only when run as root

REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
VENV_DIR="$REPO_ROOT/.venv"
VENV_PYTHON="$VENV_DIR/bin/python"
VENV_EXTRAS="hiredis,test"
MIN_REDIS_MAJOR=7

# The name of the script that sourced this file, for messages.
SCRIPT_NAME="scripts/$(basename -- "$0")"

say() {
    echo "$SCRIPT_NAME: $*" >&2
}

die() {
    say "$*"
    exit 1
}

# The stamp records what .venv was built from: when pyproject.toml, the
# extras, the interpreter or the repository folder change, .venv is rebuilt.
venv_stamp() {
    local python_version
    python_version=$("$1" -c 'import sys; print(sys.version.split()[0])')
    {
        sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1
        echo "extras=$VENV_EXTRAS"
        echo "python=$python_version"
        echo "root=$REPO_ROOT"
    }
}

venv_is_current() {
    local stamp_file="$VENV_DIR/.concurrent-runs-stamp"
    [ -x "$VENV_PYTHON" ] && [ -f "$stamp_file" ] || return 1
    [ "$(venv_stamp "$VENV_PYTHON" 2>/dev/null)" = "$(cat "$stamp_file")" ] || return 1
    # An editable install of another checkout, or a broken one, does not count.
    local package_file
    package_file=$("$VENV_PYTHON" -c \
        'import concurrent_runs; print(concurrent_runs.__file__)' 2>/dev/null) || return 1
    case "$package_file" in
        "$REPO_ROOT"/*) return 0 ;;
        *) return 1 ;;
    esac
}

find_base_python() {
    local python=${PYTHON:-python3}
    command -v "$python" >/dev/null 2>&1 \
        || die "$python not found: install Python 3.10 or newer, or set PYTHON to one"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$python is $("$python" --version 2>&1): install Python 3.10 or newer, or set PYTHON to one"
    echo "$python"
}

create_venv() {
    local python=$1
    rm -rf "$VENV_DIR"
    if "$python" -m venv "$VENV_DIR" 2>/dev/null; then
        return 0
    fi
    rm -rf "$VENV_DIR"
    # Debian ships the venv module apart from python3 itself.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "python3 -m venv failed; installing python3-venv with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
        "$python" -m venv "$VENV_DIR" && return 0
    fi
    die "could not create $VENV_DIR with '$python -m venv': install the venv module (Debian/Ubuntu: apt-get install python3-venv)"
}

# Create .venv with the package installed editable, unless it is current.
setup_venv() {
    # Two scripts started at once must not build .venv at the same time. The
    # lock lives outside .venv because a rebuild deletes that folder.
    local lock_file
    lock_file="${TMPDIR:-/tmp}/concurrent-runs-venv-$(echo "$REPO_ROOT" | cksum | cut -d' ' -f1).lock"
    exec 9>"$lock_file"
    if command -v flock >/dev/null 2>&1; then
        flock 9
    fi
    if ! venv_is_current; then
        local python
        python=$(find_base_python)
        say "installing concurrent-runs[$VENV_EXTRAS] into $VENV_DIR"
        create_venv "$python"
        "$VENV_PYTHON" -m pip install --quiet --disable-pip-version-check \
            --editable "$REPO_ROOT[$VENV_EXTRAS]" >&2 \
            || die "pip install -e '.[$VENV_EXTRAS]' failed (see the output above)"
        venv_stamp "$VENV_PYTHON" >"$VENV_DIR/.concurrent-runs-stamp"
    fi
    exec 9>&-
}

redis_server_major() {
    redis-server --version | sed -n 's/.* v=\([0-9]*\)\..*/\1/p'
}

install_redis_with_apt() {
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || return 1
        sudo="sudo"
    fi
    command -v apt-get >/dev/null 2>&1 || return 1
    say "redis-server not found; installing it with apt-get"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || return 1
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2 \
        || return 1
    hash -r
    command -v redis-server >/dev/null 2>&1
}

docker_engine_answers() {
    "$VENV_PYTHON" - <<'EOF' >/dev/null 2>&1
import docker

engine = docker.from_env(timeout=3)
engine.ping()
engine.close()
EOF
}

# Make sure there is a Redis server to run against. $1 is "demo" or "test":
# only the tests can use a Redis container started through testcontainers.
setup_redis() {
    local purpose=$1
    if [ -n "${REDIS_URL:-}" ]; then
        return 0
    fi

    if ! command -v redis-server >/dev/null 2>&1; then
        local install=${CONCURRENT_RUNS_INSTALL_REDIS:-}
        if [ -z "$install" ] && [ "$(id -u)" = 0 ]; then
            install=1
        fi
        if [ "$install" = 1 ]; then
            install_redis_with_apt || say "could not install redis-server with apt-get"
        fi
    fi

    if command -v redis-server >/dev/null 2>&1; then
        local major
        major=$(redis_server_major)
        if [ -n "$major" ] && [ "$major" -lt "$MIN_REDIS_MAJOR" ]; then
            die "$(command -v redis-server) is Redis $major; install Redis 7.0 or newer, or set REDIS_URL to a Redis 7 server"
        fi
        return 0
    fi

    if [ "$purpose" = test ] && docker_engine_answers; then
        say "redis-server not found; the tests start a Redis container through testcontainers"
        return 0
    fi
    if [ "$purpose" = test ]; then
        die "no Redis server: install redis-server 7.0 or newer (Debian/Ubuntu: apt-get install redis-server), set REDIS_URL to a throwaway Redis 7 server, or start a Docker engine"
    fi
    die "no Redis server: install redis-server 7.0 or newer (Debian/Ubuntu: apt-get install redis-server), or set REDIS_URL to a Redis 7 server"
}
