#!/usr/bin/env bash
# The README's first command: builds the package into a fresh venv and runs the products demo
# (caching with tags and a TTL, invalidation on save, hit/miss counts, never a stale page).
set -euo pipefail
source "$(dirname "$0")/../../.ci/lib.sh"
WHEEL=$(build_wheel)
venv=$(make_venv demo "$(python_for 3.11)" "django>=5.2,<5.3" "$WHEEL")
cd "$ROOT/examples/products"
exec "$venv/bin/python" run_demo.py "$@"
