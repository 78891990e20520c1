#!/usr/bin/env bash
# Rebuild the oracle task's shipped assets from nothing: tokenizer, SFT model, feedback sets.
# Not bit-reproducible across CPU types (float32 reductions differ), which is why the outputs are
# committed; expect the same success rate and label balance within sampling noise.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
$PY -m bco_jax.oracle.tokenizer bco_jax/assets/oracle/tokenizer
$PY -m experiments.oracle.make_sft --noise 0.5 --out bco_jax/assets/oracle/sft "$@"
$PY -m experiments.oracle.make_feedback --model bco_jax/assets/oracle/sft --out bco_jax/assets/oracle/feedback
