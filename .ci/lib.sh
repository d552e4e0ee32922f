# Shared by .ci/run and examples/products/run.sh: find pyenv's Pythons, build the wheel once,
# make a venv with a given Django. Sourced, not run.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${RUSTCACHE_WORK:-$ROOT/.work}
mkdir -p "$WORK"
# Everything a build or a test run writes goes under $WORK (the README says so): cargo's target
# dir, ruff's cache, hypothesis' example database and (tests/django_suite/run.py reads
# RUSTCACHE_WORK) the Django source release for its cache tests. Python's __pycache__ stays where
# Python puts it: PYTHONPYCACHEPREFIX changed what tests/test_memory.py measures (RSS growth).
export RUSTCACHE_WORK=$WORK
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$WORK/target}
export RUFF_CACHE_DIR=$WORK/ruff-cache
export HYPOTHESIS_STORAGE_DIRECTORY=$WORK/hypothesis

# python_for 3.11 -> newest pyenv 3.11.x interpreter (or python3.11 on PATH).
python_for() {
  local want=$1 root cand
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  cand=$(ls -d "$root"/versions/"$want".*/bin/python 2>/dev/null | sort -V | tail -n 1)
  if [[ -n $cand ]]; then echo "$cand"; return; fi
  command -v "python$want" || { echo "no Python $want found" >&2; return 1; }
}

# The tools venv (maturin, ruff) on Python 3.11.
tools_venv() {
  if [[ ! -x $WORK/tools/bin/maturin ]]; then
    "$(python_for 3.11)" -m venv "$WORK/tools"
    "$WORK/tools/bin/pip" install -q --disable-pip-version-check "maturin>=1.7,<2" "ruff>=0.6"
  fi
  echo "$WORK/tools"
}

# Builds the abi3 wheel into $WORK/dist and prints its path.
build_wheel() {
  local tools
  tools=$(tools_venv)
  rm -rf "$WORK/dist"
  (cd "$ROOT" && "$tools/bin/maturin" build --release -q -o "$WORK/dist" \
     -i "$(python_for 3.11)" >&2)
  ls "$WORK"/dist/django_rustcache-*.whl | head -n 1
}

# make_venv NAME PYTHON DJANGO_SPEC WHEEL [extra pip args...] -> path of the venv
make_venv() {
  local name=$1 py=$2 django=$3 wheel=$4
  shift 4
  local dir=$WORK/venv-$name
  rm -rf "$dir"
  "$py" -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check "$django" "$wheel" "$@" >&2
  echo "$dir"
}
