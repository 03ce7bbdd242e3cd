#!/usr/bin/env bash
# The accelerator check: kernel tests compiled for real, pallas vs xla engines on random-weight
# models (tiny and Llama-3.1-8B-shaped, generated on the device), bench/kernels.py and
# workload A, in at most 8 minutes; one JSON under ${OUT:-bench/results}, its path printed last.
#
#   bash scripts/device_check.sh [--wheels DIR] [--only STAGE,...] [--out DIR]
#   bash scripts/device_check.sh --dry-run     # CPU: every stage at the smallest sizes (CI)
#
# No network is assumed: packages the image lacks are installed with
# `pip install --no-index --find-links DIR` (see README.md, "Accelerator check").
# The interpreter: $PYTHON, else .venv/bin/python when there is one, else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" scripts/device_check.py "$@"
