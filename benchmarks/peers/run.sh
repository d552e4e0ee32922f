#!/usr/bin/env bash
# Benchmark RustCache against its peers (LocMemCache, theine, diskcache, RedisCache) and the floor.
#
# Usage:  bash benchmarks/peers/run.sh [--quick] [other bench.py options]
#
# Environment:
#   RUSTCACHE_BENCH_VENV   venv to create/reuse (default: <repo>/.work/bench-venv)
#   RUSTCACHE_WHEEL        install this wheel instead of building the repo with maturin
#   RUSTCACHE_BENCH_PYTHON interpreter to build the venv from (default: pyenv's newest 3.11)
#   RUSTCACHE_BENCH_SKIP_INSTALL=1  reuse the venv as it is (no pip, no apt)
#
# The peers are installed only into this venv, never as dependencies of the package.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${RUSTCACHE_BENCH_VENV:-$repo/.work/bench-venv}"

log() { printf '[bench] %s\n' "$*" >&2; }

pick_python() {
    if [[ -n "${RUSTCACHE_BENCH_PYTHON:-}" ]]; then
        echo "$RUSTCACHE_BENCH_PYTHON"
        return
    fi
    local root="${PYENV_ROOT:-$HOME/.pyenv}" best=""
    if [[ -d "$root/versions" ]]; then
        best="$(ls -1 "$root/versions" | grep -E '^3\.11\.[0-9]+$' | sort -t. -k3,3n | tail -n1 || true)"
    fi
    if [[ -n "$best" && -x "$root/versions/$best/bin/python3" ]]; then
        echo "$root/versions/$best/bin/python3"
    elif command -v python3.11 >/dev/null 2>&1; then
        command -v python3.11
    else
        log "no Python 3.11 found (pyenv or python3.11 on PATH); set RUSTCACHE_BENCH_PYTHON"
        exit 1
    fi
}

ensure_venv() {
    if [[ ! -x "$venv/bin/python" ]]; then
        local py
        py="$(pick_python)"
        log "creating venv $venv with $py"
        mkdir -p "$(dirname "$venv")"
        "$py" -m venv "$venv"
    fi
    local pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
    log "installing Django 5.2 and the peers into the benchmark venv"
    "${pip[@]}" install --upgrade pip
    "${pip[@]}" install "Django>=5.2,<5.3" "theine>=2" "diskcache>=5.6" "redis>=5" "gunicorn"
    # hiredis only speeds up redis-py's parser; the Redis column works without it.
    "${pip[@]}" install hiredis || log "hiredis not installed: RedisCache uses redis-py's Python parser"
    if [[ -n "${RUSTCACHE_WHEEL:-}" ]]; then
        log "installing django-rustcache from wheel $RUSTCACHE_WHEEL"
        "${pip[@]}" install --force-reinstall --no-deps "$RUSTCACHE_WHEEL"
    else
        log "building and installing django-rustcache from $repo (maturin, release)"
        "${pip[@]}" install --force-reinstall --no-deps "$repo"
    fi
}

ensure_redis() {
    if command -v redis-server >/dev/null 2>&1; then
        return
    fi
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
        log "redis-server not found: installing it with apt-get"
        apt-get update -qq >/dev/null 2>&1 || true
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null 2>&1; then
            log "apt-get could not install redis-server: the RedisCache column will be skipped"
        fi
    else
        log "redis-server not found and cannot apt-get (not root or no apt): RedisCache is skipped"
    fi
}

ensure_wrk() {
    # Only the optional end-to-end section (--e2e) needs wrk.
    if command -v wrk >/dev/null 2>&1; then
        return
    fi
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
        log "wrk not found: installing it with apt-get"
        apt-get update -qq >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1 \
            || log "apt-get could not install wrk: the end-to-end section will be skipped"
    fi
}

if [[ "${RUSTCACHE_BENCH_SKIP_INSTALL:-0}" != "1" ]]; then
    ensure_venv
    ensure_redis
    for arg in "$@"; do
        if [[ "$arg" == "--e2e" ]]; then ensure_wrk; fi
    done
fi

cmd="bash benchmarks/peers/run.sh${*:+ $*}"
cd "$repo"
exec "$venv/bin/python" "$here/bench.py" --command "$cmd" "$@"
