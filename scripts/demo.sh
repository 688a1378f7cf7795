#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs the main job on the bundled default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
v2flow-rt demo --out demo_out "$@"
