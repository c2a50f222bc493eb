#!/usr/bin/env bash
# Create .venv and install cmrkit into it. Idempotent: a second run only checks.
# torch==2.13.0 goes first so that nothing later pulls another build (or torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if [ ! -f .venv/.cmrkit-installed ] || [ pyproject.toml -nt .venv/.cmrkit-installed ]; then
  $PIP install "torch==2.13.0"
  $PIP install -e ".[dev,hub,peft,serve]"
  touch .venv/.cmrkit-installed
fi
