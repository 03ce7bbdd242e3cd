#!/usr/bin/env bash
# Sets up .venv with jaxserve and its test extra (idempotent; a second run only checks).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
