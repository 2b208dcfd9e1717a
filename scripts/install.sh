#!/usr/bin/env bash
# Install everything the server needs into .venv (with --dev: what the tests need too). Safe to re-run: it does
# nothing when the requirements have not changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=false
[ "${1:-}" = "--dev" ] && dev=true
python=${PYTHON:-python3}

# System packages. sox: qwen-tts imports the `sox` Python binding, which warns on every start without the binary.
# curl: test_quick.sh. Installed with apt-get when we are root (as in the Docker image and CI); otherwise named.
missing=()
command -v sox >/dev/null 2>&1 || missing+=(sox)
$dev && { command -v curl >/dev/null 2>&1 || missing+=(curl); }
# For the tests of the deployment files: shellcheck lints the shell scripts; openssl makes a test certificate;
# libjemalloc2 is what docker-entrypoint.sh preloads in the image, so the tests run it the same way.
$dev && { command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck); }
$dev && { command -v openssl >/dev/null 2>&1 || missing+=(openssl); }
# chromium: the web page's tests drive Debian's Chromium with Playwright (Playwright's own browser download needs
# network access that CI does not have).
$dev && { command -v chromium >/dev/null 2>&1 || missing+=(chromium); }
libs=$(ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true)
$dev && { grep -q libjemalloc.so.2 <<<"$libs" || missing+=(libjemalloc2); }
# The voice store's tests on PostgreSQL and the multi-replica test: a PostgreSQL server that the tests start
# themselves (tools/pg_cluster.py; Debian keeps initdb under /usr/lib/postgresql/<version>/bin), and HAProxy as the
# load balancer in front of the replicas.
$dev && { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 \
            || missing+=(postgresql); }
$dev && { command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy); }
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "warning: please install these system packages: ${missing[*]}" >&2
  fi
fi

req=requirements.txt
$dev && req=requirements-dev.txt
stamp=.venv/.installed-$(basename "$req" .txt)
want=$(cat requirements.txt "$req" | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
echo "installing Python packages from $req (first time: a few minutes, about 8 GB with PyTorch)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
