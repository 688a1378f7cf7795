#!/usr/bin/env bash
# Rebuild the bundled text-to-image LM (v2flow_rt/assets/t2i) against the bundled V2Flow model
# (v2flow_rt/assets/default), then measure it. Needed again whenever assets/default changes: the LM's
# visual tokens are that model's codes (v2flow.json records its sha256 and loading refuses a mismatch).
#
#   bash scripts/make_t2i.sh            # ~20 min training on two cores, ~10 min of measurements
#
# --bundle writes a short README.md into the bundle; the figures in the committed README come from the
# runs/t2i/*.json files this script writes (conditioning, export quality in runs/t2i/onnx, speed).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export OMP_NUM_THREADS=2

rm -rf runs/t2i
v2flow-rt train-llm --lm v2flow_rt/assets/base_lm --model default --out runs/t2i --steps 1200 --lr 2e-3 \
    --max-minutes 19 --threads 2 --bundle v2flow_rt/assets/t2i

# prompt conditioning (README figure) and the prompts × seeds grid, one core each
export OMP_NUM_THREADS=1
python scripts/t2i_report.py --cfg 1 --grid "" > runs/t2i/conditioning_cfg1.json &
python scripts/t2i_report.py --cfg 3 --grid docs/t2i_grid.png > runs/t2i/conditioning_cfg3.json
wait

# the LLM graphs and their quality figures, then speed against transformers' generate
v2flow-rt export-llm --lm default --out runs/t2i/onnx
python benchmarks/bench_llm.py --lm default --onnx runs/t2i/onnx --threads 1 --repeats 9 > runs/t2i/bench_llm.json
