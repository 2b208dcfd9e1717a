#!/usr/bin/env bash
# Container entrypoint: tune what the container is allowed to tune, check the listening configuration, then
# `exec` the server so that it receives the container's signals (SIGTERM from `docker stop`) directly.
#
#   docker-entrypoint.sh                 serve (the image's default)
#   docker-entrypoint.sh healthcheck     probe /health over TCP, TLS or the Unix socket (the image's HEALTHCHECK)
#   docker-entrypoint.sh CMD [ARGS...]   run another command instead (e.g. bash, or tools/build_tiny_checkpoints.py)
#
# Steps before the server starts, each logged, none fatal:
#   GPU_PERSISTENCE=true    nvidia-smi -pm 1 (persistence mode: no driver re-initialisation between CUDA clients)
#   GPU_LOCK_CLOCKS=MHz     nvidia-smi -lgc MHz or MIN,MAX (steady latency); both need root in the container and
#                           CAP_SYS_ADMIN, and change the whole GPU for every process on the host: off by default.
#   ENABLE_THP=true         back the allocator's large heap regions with transparent huge pages, where the host's
#                           THP mode allows it (always or madvise); the host-wide mode itself is never changed here.
#   USE_JEMALLOC=true       LD_PRELOAD jemalloc (less fragmentation, memory returned to the OS after an idle unload).
#   INFERENCE_CPU_CORES     pin the whole process with taskset (the server also pins its model thread).
# Checks that stop the start with a clear message (exit status 2), before anything heavy is imported:
#   UNIX_SOCKET_PATH        its directory is created; a stale socket file is removed, a live one is refused.
#   SSL_KEYFILE/SSL_CERTFILE  both set, both readable files (the server then checks that they form a pair).
# Outside a container (the tests run it this way): APP_DIR (default: this script's directory), PYTHON (default
# /opt/venv/bin/python, else APP_DIR/.venv/bin/python, else python3), NVIDIA_SMI (default nvidia-smi), APP_USER
# (when started as root and this user exists, the server runs as this user: the image sets it to `app`).
set -euo pipefail

APP_DIR=${APP_DIR:-$(cd "$(dirname "$0")" && pwd)}
if [ -z "${PYTHON:-}" ]; then
  for candidate in /opt/venv/bin/python "$APP_DIR/.venv/bin/python"; do
    if [ -x "$candidate" ]; then PYTHON=$candidate; break; fi
  done
  PYTHON=${PYTHON:-python3}
fi
NVIDIA_SMI=${NVIDIA_SMI:-nvidia-smi}

# One line per event on stderr, in the server's format: loguru-shaped JSON with LOG_FORMAT=json (the default), text
# otherwise, so log collectors see the entrypoint's lines like the server's.
json_string() {
  local s=$1
  s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/\\n}; s=${s//$'\r'/\\r}; s=${s//$'\t'/\\t}
  printf '"%s"' "$s"
}
log() {
  local level=$1; shift
  local now; now=$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ 2>/dev/null || date -u +%Y-%m-%dT%H:%M:%SZ)
  if [ "$(printf '%s' "${LOG_FORMAT:-json}" | tr '[:upper:]' '[:lower:]')" = json ]; then
    printf '{"text": %s, "record": {"level": {"name": "%s"}, "message": %s, "name": "docker-entrypoint", "time": {"repr": "%s"}}}\n' \
      "$(json_string "$now | $level | $*")" "$level" "$(json_string "$*")" "$now" >&2
  else
    printf '%s | %-8s | entrypoint: %s\n' "$now" "$level" "$*" >&2
  fi
}
# The server's own wording for a bad setting: one plain line naming the variable, exit status 2.
die() { echo "configuration error: $*" >&2; exit 2; }
is_true() { case "$(printf '%s' "${1:-}" | tr '[:upper:]' '[:lower:]')" in 1|true|yes|on) return 0;; *) return 1;; esac; }

# ---- healthcheck: GET /health (liveness) wherever the server listens; exit 0 when it answers 200.
healthcheck() {
  exec "$PYTHON" - <<'EOF'
import http.client, os, socket, ssl, sys

path = os.environ.get("HEALTHCHECK_PATH", "/health")
uds, tls = os.environ.get("UNIX_SOCKET_PATH", ""), bool(os.environ.get("SSL_CERTFILE"))
host = os.environ.get("HOST", "0.0.0.0")
host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
port = int(os.environ.get("PORT") or 8000)
context = None
if tls:  # a liveness probe of our own listener, not a check of the certificate's trust chain
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE


class UnixConnection(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(uds)
        if context:
            self.sock = context.wrap_socket(self.sock, server_hostname="localhost")


try:
    if uds:
        conn = UnixConnection("localhost", timeout=5)
    elif tls:
        conn = http.client.HTTPSConnection(host, port, timeout=5, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("GET", path)
    status = conn.getresponse().status
except OSError as exc:
    print(f"healthcheck: {exc}", file=sys.stderr)
    sys.exit(1)
print(f"healthcheck: {path} answered {status}")
sys.exit(0 if status == 200 else 1)
EOF
}

case "${1:-serve}" in
  serve) ;;
  healthcheck) healthcheck ;;
  *) exec "$@" ;;
esac

log INFO "starting as uid $(id -u); python $PYTHON; app $APP_DIR"

# ---- GPU: report what is visible; persistence mode and clock locking only when asked for.
gpu_tuning() {
  local out
  if ! command -v "$NVIDIA_SMI" >/dev/null 2>&1; then
    local asked=""
    is_true "${GPU_PERSISTENCE:-false}" && asked=" (GPU_PERSISTENCE skipped)"
    [ -n "${GPU_LOCK_CLOCKS:-}" ] && asked="$asked (GPU_LOCK_CLOCKS skipped)"
    log INFO "no GPU tuning: $NVIDIA_SMI not found (no NVIDIA GPU given to this container)$asked"
    return 0
  fi
  if out=$("$NVIDIA_SMI" --query-gpu=index,name,driver_version,memory.used,memory.total --format=csv,noheader 2>&1)
  then
    log INFO "GPU: ${out//$'\n'/; }"
  else
    log WARNING "$NVIDIA_SMI cannot query the GPU: $out"
  fi
  local hint="needs root in the container with CAP_SYS_ADMIN (compose: user: \"0\", cap_add: [SYS_ADMIN])"
  if is_true "${GPU_PERSISTENCE:-false}"; then
    if out=$("$NVIDIA_SMI" -pm 1 2>&1); then
      log INFO "GPU persistence mode on: ${out//$'\n'/; }"
    else
      log WARNING "GPU_PERSISTENCE: nvidia-smi -pm 1 failed, continuing without it ($hint): ${out//$'\n'/; }"
    fi
  fi
  if [ -n "${GPU_LOCK_CLOCKS:-}" ]; then
    if ! [[ $GPU_LOCK_CLOCKS =~ ^[0-9]+(,[0-9]+)?$ ]]; then
      log WARNING "GPU_LOCK_CLOCKS must be MHz or MIN,MAX (e.g. 1755 or 1410,1755), got '$GPU_LOCK_CLOCKS': skipped"
    elif out=$("$NVIDIA_SMI" -lgc "$GPU_LOCK_CLOCKS" 2>&1); then
      log INFO "GPU clocks locked to $GPU_LOCK_CLOCKS MHz (they stay locked after exit; nvidia-smi -rgc resets):" \
        "${out//$'\n'/; }"
    else
      log WARNING "GPU_LOCK_CLOCKS: nvidia-smi -lgc $GPU_LOCK_CLOCKS failed, continuing without it ($hint):" \
        "${out//$'\n'/; }"
    fi
  fi
}
gpu_tuning

# ---- memory: jemalloc and transparent huge pages, for this process only.
find_jemalloc() {
  local path
  for path in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 \
              /usr/lib64/libjemalloc.so.2 /usr/lib/libjemalloc.so.2 /usr/local/lib/libjemalloc.so.2; do
    if [ -r "$path" ]; then echo "$path"; return 0; fi
  done
  return 1
}
thp_mode=unknown
if [ -r /sys/kernel/mm/transparent_hugepage/enabled ]; then
  # "always [madvise] never": the bracketed word is the mode in force.
  thp_mode=$(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/mm/transparent_hugepage/enabled)
fi
want_thp=false
if is_true "${ENABLE_THP:-true}"; then
  case $thp_mode in
    always|madvise) want_thp=true; log INFO "transparent huge pages: host mode '$thp_mode', heap opted in" ;;
    *) log INFO "transparent huge pages: host mode '$thp_mode', not used (set it to madvise on the host:" \
         "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled; a container does not change host settings)" ;;
  esac
fi
# These variables go to the server alone (through `env` right before it), not to the helpers started before it:
# setpriv, for one, aborts with jemalloc's background thread preloaded.
server_env=()
jemalloc=""
if is_true "${USE_JEMALLOC:-true}"; then
  if jemalloc=$(find_jemalloc); then
    # background_thread: return freed pages on a timer, so an idle unload gives memory back without more activity.
    conf="background_thread:true,dirty_decay_ms:5000,muzzy_decay_ms:5000"
    $want_thp && conf="$conf,thp:always,metadata_thp:auto"
    server_env+=("LD_PRELOAD=$jemalloc${LD_PRELOAD:+:$LD_PRELOAD}" "MALLOC_CONF=${MALLOC_CONF:-$conf}")
    log INFO "jemalloc: ${server_env[*]}"
  else
    jemalloc=""
    log INFO "jemalloc not found (the libjemalloc2 package): using glibc malloc"
  fi
fi
if [ -z "$jemalloc" ] && $want_thp; then
  # glibc 2.35+: malloc's own THP opt-in (madvise on its heap); older glibc ignores the tunable.
  server_env+=("GLIBC_TUNABLES=${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1")
  log INFO "glibc malloc: ${server_env[*]}"
fi

# ---- where the server listens: Unix socket or TCP, plain or TLS. Mistakes here stop the start with exit 2.
if [ -n "${UNIX_SOCKET_PATH:-}" ]; then
  socket_dir=$(dirname "$UNIX_SOCKET_PATH")
  mkdir -p "$socket_dir" 2>/dev/null || die "UNIX_SOCKET_PATH=$UNIX_SOCKET_PATH: cannot create directory $socket_dir"
  [ -w "$socket_dir" ] || die "UNIX_SOCKET_PATH=$UNIX_SOCKET_PATH: directory $socket_dir is not writable by uid $(id -u)"
  if [ -S "$UNIX_SOCKET_PATH" ]; then
    if "$PYTHON" -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])' \
        "$UNIX_SOCKET_PATH" 2>/dev/null; then
      die "UNIX_SOCKET_PATH=$UNIX_SOCKET_PATH: another server is listening on this socket"
    fi
    rm -f "$UNIX_SOCKET_PATH"
    log INFO "removed the stale socket $UNIX_SOCKET_PATH"
  elif [ -e "$UNIX_SOCKET_PATH" ]; then
    die "UNIX_SOCKET_PATH=$UNIX_SOCKET_PATH exists and is not a socket"
  fi
fi
if [ -n "${SSL_KEYFILE:-}" ] || [ -n "${SSL_CERTFILE:-}" ]; then
  [ -n "${SSL_KEYFILE:-}" ] || die "SSL_CERTFILE is set but SSL_KEYFILE is not: set both to serve HTTPS, or neither"
  [ -n "${SSL_CERTFILE:-}" ] || die "SSL_KEYFILE is set but SSL_CERTFILE is not: set both to serve HTTPS, or neither"
  for var in SSL_CERTFILE SSL_KEYFILE; do
    file=${!var}
    [ -e "$file" ] || die "$var=$file does not exist (mount it into the container, e.g. ./certs:/certs:ro)"
    [ -f "$file" ] || die "$var=$file is not a regular file"
    [ -r "$file" ] || die "$var=$file is not readable by uid $(id -u) (make it readable by the container's user)"
  done
fi
if [ -n "${UNIX_SOCKET_PATH:-}" ]; then where="unix:$UNIX_SOCKET_PATH"; else where="${HOST:-0.0.0.0}:${PORT:-8000}"; fi
if [ -n "${SSL_CERTFILE:-}" ]; then
  log INFO "serving HTTPS (HTTP/2 and HTTP/1.1) on $where"
else
  log INFO "serving HTTP on $where"
fi

# ---- volumes: the model cache must be writable, or hub downloads fail later with a less obvious message.
for dir in "${HF_HOME:-}" "${DATA_DIR:-}"; do
  if [ -n "$dir" ] && [ -d "$dir" ] && [ ! -w "$dir" ] && [ "$(id -u)" != 0 ]; then
    log WARNING "$dir is not writable by uid $(id -u): on the host, chown $(id -u):$(id -g) the directory mounted there"
  fi
done

# ---- the command: [setpriv to APP_USER] [taskset -c CORES] [env LD_PRELOAD=... MALLOC_CONF=...] python server.py
cmd=()
if [ "$(id -u)" = 0 ] && [ -n "${APP_USER:-}" ] && id "$APP_USER" >/dev/null 2>&1; then
  if command -v setpriv >/dev/null 2>&1; then
    drop=(setpriv --reuid="$(id -u "$APP_USER")" --regid="$(id -g "$APP_USER")" --init-groups)
    for dir in "${HF_HOME:-}" "${DATA_DIR:-}"; do
      if [ -n "$dir" ] && [ -d "$dir" ] && ! "${drop[@]}" test -w "$dir"; then
        if chown -R "$APP_USER:" "$dir"; then log INFO "gave $dir to $APP_USER"; else log WARNING "cannot chown $dir"; fi
      fi
    done
    cmd=("${drop[@]}")
    HOME=$(getent passwd "$APP_USER" | cut -d: -f6)
    export HOME
    log INFO "root steps done: the server runs as $APP_USER"
  else
    log WARNING "setpriv not found: the server runs as root"
  fi
fi
if [ -n "${INFERENCE_CPU_CORES:-}" ]; then
  if ! command -v taskset >/dev/null 2>&1; then
    log INFO "INFERENCE_CPU_CORES=$INFERENCE_CPU_CORES: taskset not found, only the model thread is pinned"
  elif ! [[ $INFERENCE_CPU_CORES =~ ^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$ ]]; then
    log WARNING "INFERENCE_CPU_CORES=$INFERENCE_CPU_CORES is not a CPU list like 0-3,6 (the server will say so)"
  elif out=$(taskset -c "$INFERENCE_CPU_CORES" true 2>&1); then
    cmd+=(taskset -c "$INFERENCE_CPU_CORES")
    log INFO "process pinned to CPUs $INFERENCE_CPU_CORES"
  else
    log WARNING "INFERENCE_CPU_CORES=$INFERENCE_CPU_CORES: taskset refused (${out//$'\n'/; }); not pinned"
  fi
fi
[ ${#server_env[@]} -eq 0 ] || cmd+=(env "${server_env[@]}")
cmd+=("$PYTHON" "$APP_DIR/server.py")
log INFO "exec ${cmd[*]}"
exec "${cmd[@]}"
