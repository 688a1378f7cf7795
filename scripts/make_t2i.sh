#!/usr/bin/env bash
# Rebuild the bundled text-to-image LM (v2flow_rt/assets/t2i) against the bundled V2Flow model
# (v2flow_rt/assets/default), then measure it. Needed again whenever assets/default's tokenizer changes:
# the LM's visual tokens are that model's codes (v2flow.json records the tokenizer's fingerprint and
# loading refuses a mismatch; a decoder-only retrain keeps the LM, then only the reports need re-running).
#
#   bash scripts/make_t2i.sh            # ~19 min training on two cores, ~20 min of measurements
#
# --bundle writes a short README.md into the bundle; the figures in the committed README come from the
# files this script writes under docs/t2i/ (conditioning, export quality, speed) and docs/t2i_grid.png.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export OMP_NUM_THREADS=2

rm -rf runs/t2i
v2flow-rt train-llm --lm v2flow_rt/assets/base_lm --model default --out runs/t2i --steps 2400 --lr 2e-3 \
    --crops-per-subject 512 --max-minutes 30 --threads 2 --bundle v2flow_rt/assets/t2i

# prompt conditioning with the settings of `v2flow-rt generate` (cfg 3, temperature 0.8), 16 seeds, and the
# README grid; then without LLM guidance
python scripts/t2i_report.py --seeds $(seq 0 15) --threads 2 --grid docs/t2i_grid.png > docs/t2i/conditioning.json
python scripts/t2i_report.py --cfg 1 --seeds $(seq 0 7) --threads 2 --grid "" > docs/t2i/conditioning_cfg1.json

# the LLM graphs and their quality figures, then speed against transformers' generate (one thread)
v2flow-rt export-llm --lm default --out runs/t2i/onnx
cp runs/t2i/onnx/llm_manifest.json docs/t2i/llm_manifest.json
for batch in 1 8; do
    python benchmarks/bench_llm.py --lm default --onnx runs/t2i/onnx --threads 1 --repeats 9 --batch $batch \
        > docs/t2i/bench_llm_batch$batch.json
done
