#!/usr/bin/env bash
# Run the E2E suite.
#   E2Etest/run_tests.sh                 # against TTS_URL (default http://localhost:8000)
#   E2Etest/run_tests.sh --with-server   # start a server on a tiny offline checkpoint, run, stop it
# Extra arguments go to pytest, e.g.  E2Etest/run_tests.sh --with-server -m smoke
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3

if [ "${1:-}" = "--with-server" ]; then
  shift
  # conftest.py starts (and stops) its own servers when TTS_URL is unset.
  unset TTS_URL
  exec "$python" -m pytest "$here" -v "$@"
fi
export TTS_URL=${TTS_URL:-http://localhost:8000}
exec "$python" -m pytest "$here" -v "$@"
