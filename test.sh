#!/usr/bin/env bash
# Install what the tests need, build the tiny offline checkpoints, run every test:
#   unit tests (server_test.py), the E2E suite against live servers, and the seed's scripts (test_tts.py,
#   test_quick.sh) against a live server. Extra arguments go to the E2E pytest run (e.g. -m smoke).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh --dev
py=.venv/bin/python
$py tools/build_tiny_checkpoints.py

echo "== lint: shell scripts (shellcheck), Dockerfile (hadolint), docker-compose.yml (the Compose schema)"
if command -v shellcheck >/dev/null 2>&1; then
  shellcheck docker-entrypoint.sh run.sh test.sh scripts/install.sh E2Etest/run_tests.sh test_quick.sh .ci/run
else
  echo "warning: shellcheck is not installed (scripts/install.sh installs it as root): shell scripts not linted" >&2
fi
.venv/bin/hadolint Dockerfile
.venv/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

# PyTorch on one thread in every test process and test server: more threads than free cores make OpenMP spin
# against the other processes (the unit tests took 261 s with the default threads, 122 s with one, on a busy
# machine). The E2E suite runs on TEST_WORKERS pytest-xdist workers (default 2, this machine kind's cores); its
# modules stay whole on one worker (--dist loadscope), so a module's shared server starts once. The unit tests run
# in one process: two workers each load torch and the model again, and took longer (148 s vs 122 s).
workers=${TEST_WORKERS:-2}
export OMP_NUM_THREADS=1

echo "== unit tests"
$py -m pytest server_test.py -q

echo "== end-to-end tests"
E2Etest/run_tests.sh --with-server -n "$workers" --dist loadscope "$@"

echo "== seed scripts against a live server"
port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
MODEL_ID=build/checkpoints/tiny-0.6B-CustomVoice HOST=127.0.0.1 PORT=$port PRELOAD_MODEL=true LOG_FORMAT=text \
  $py server.py >"$log" 2>&1 &
pid=$!
# Keep the script's own exit status: the trap's `wait` would otherwise report the killed server's 143.
status=0
trap 'status=$?; kill $pid 2>/dev/null; wait $pid 2>/dev/null || true; rm -f "$log"; exit $status' EXIT
for _ in $(seq 1 300); do
  curl -fsS "http://127.0.0.1:$port/health" 2>/dev/null | grep -q '"model_state":"ready"' && break
  kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.5
done
export TTS_URL=http://127.0.0.1:$port
$py test_tts.py
bash test_quick.sh
echo "== all tests passed"
