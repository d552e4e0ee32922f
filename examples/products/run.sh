#!/usr/bin/env bash
# The README's first command: builds the package into a fresh venv and runs the products demo
# (caching with tags and a TTL, invalidation on save, hit/miss counts, never a stale page).
#   run.sh --coherence: the demo's second part, coherence_demo.py: 4 gunicorn workers on
#   NearCache then on RustCache, a price changed through one worker (needs redis-server: it is
#   installed with apt-get when missing and we are root; otherwise the demo says why it cannot).
set -euo pipefail
source "$(dirname "$0")/../../.ci/lib.sh"
if [[ ${1:-} == --coherence ]]; then
  shift
  # redis-server first (found, or installed, or why not): before minutes of building.
  "$(python_for 3.11)" "$ROOT/examples/products/coherence_demo.py" --find-redis-server
  WHEEL=$(build_wheel)
  venv=$(make_venv demo "$(python_for 3.11)" "django>=5.2,<5.3" "$WHEEL" gunicorn "redis>=5" hiredis)
  cd "$ROOT/examples/products"
  exec "$venv/bin/python" coherence_demo.py "$@"
fi
WHEEL=$(build_wheel)
venv=$(make_venv demo "$(python_for 3.11)" "django>=5.2,<5.3" "$WHEEL")
cd "$ROOT/examples/products"
exec "$venv/bin/python" run_demo.py "$@"
