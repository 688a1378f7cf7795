#!/usr/bin/env bash
# Creates .venv with everything the tests and the demo need (CPU only). torch is pinned to the CPU wheel
# that this kind of machine has on disk; users elsewhere may use any torch >= 2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
