#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then lint, type checks and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check v2flow_rt tests benchmarks scripts
mypy v2flow_rt
python -m pytest -q
