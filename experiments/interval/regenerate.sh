#!/usr/bin/env bash
# Rebuild the interval task's shipped assets: SFT model, feedback sets, measurements in the manifest.
# The tokenizer is the oracle task's (bco_jax/assets/oracle/tokenizer), reused unchanged. Not
# bit-reproducible across CPU types (float32 reductions differ), which is why the outputs are
# committed; expect the same success rate and label balance within sampling noise.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=bco_jax/assets/interval
$PY -m experiments.oracle.make_sft --task interval --noise 0.5 --out $OUT/sft "$@"
$PY -m experiments.oracle.make_feedback --task interval --model $OUT/sft --out $OUT/feedback
$PY -m experiments.interval.measure --model $OUT/sft --manifest $OUT/feedback/manifest.json
