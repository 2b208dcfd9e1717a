#!/usr/bin/env bash
# Install what is missing, then start the server on PORT (default 8000). Every setting is an environment variable:
#   MODEL_ID=build/checkpoints/tiny-0.6B-CustomVoice ./run.sh     # offline, with a small test checkpoint
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh
exec .venv/bin/python server.py
