#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then lint, type checks, the test suite, and one quick pass of the benchmark
# suite (benchmarks/test_bench_stages.py is outside testpaths; timing off, each benchmark called once, ~45 s).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check v2flow_rt tests benchmarks scripts
mypy v2flow_rt
python -m pytest -q
python -m pytest -q -p no:cacheprovider benchmarks/test_bench_stages.py --benchmark-disable
