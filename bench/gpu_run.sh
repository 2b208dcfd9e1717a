#!/usr/bin/env bash
# The GPU benchmark's one command line on the device machine (run from the repo root there, with .whl carried:
# bench/gpu_wheels.sh fills it here). Installs the carried wheels into /tmp/site, then runs bench/gpu_bench.py,
# which builds the full-size checkpoint and writes $OUT/gpu_bench.json (a log beside it).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit
set -o pipefail
PYTHONUNBUFFERED=1 python3 bench/gpu_bench.py 2>&1 | tee "$OUT/gpu_bench.log"
