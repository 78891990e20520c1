"""`python -m bco_jax.evaluate`: how an aligned policy's implicit reward and samples look (the
scoring itself is `bco_jax.scoring`, shared with the trainer's evaluation).

On labelled feedback: implicit-reward accuracy (sign of reward - delta against the label, with the
delta the training run saved) and ROC AUC, mean reward per class. On held-out prompts: completions
sampled from the policy (written to JSONL), KL(policy || reference) estimated on them as the mean of
log pi(y|x) - log pi_ref(y|x), and optionally an oracle `--reward_fn module:function` scoring
(prompt, completion) -> float, reported as its mean (the success rate for a 0/1 oracle).
Printed as a table and written as strict JSON (a missing quantity is null or absent): inside a
training output dir, else under outputs/eval/<model name>/, or at --output. Every input is checked
before anything is written, and nothing is written into a folder the user owns (docs/reliability.md).

It runs on a mesh as the trainer does (`--mesh`, `--dtype`, `--attn_implementation`), started once per
host with the trainer's launch keys or a cluster's own variables: weights load onto their shardings in
the compute dtype, every process scores and samples its rows, process 0 writes the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bco_jax import files
from bco_jax.argv import join_negative_values
from bco_jax.config import add_keys
from bco_jax.data import DataConfig, DataError, load_dataset
from bco_jax.data.sources import resolve as resolve_data
from bco_jax.errors import USER_ERRORS, ConfigError
from bco_jax.judges import import_callable
from bco_jax.load import check_finite_weights, check_same_base, load_tokenizer, model_folder, reading_weights
from bco_jax.models import load_hf
from bco_jax.models.config import compute_dtype
from bco_jax.run_dir import DEFAULT_PARENT, EVAL_REPORT, FINAL_STATE, RunDir, is_run, overlap, samples_path
from bco_jax.scoring import feedback_metrics, sample_and_score
from bco_jax.sharding import (
    LOGICAL_RULES,
    build_mesh,
    initialize_distributed,
    rounded_to_data,
)


def is_training_output(path: str) -> bool:
    """Whether `path` is a bco-jax run folder (marked, or holding a finished run's bco_state.json):
    the run's own folder, where the report may go."""
    return os.path.isdir(path) and (is_run(path) or os.path.exists(RunDir(path).final_state))


def resolve_model(path: str) -> tuple[str, dict]:
    """(policy folder, what the run saved) of a training output dir (its hf/ export, bco_state.json and
    config.json), or (path, {}) for an HF folder or GGUF file; its files checked, a broken one named."""
    if not os.path.exists(path):
        raise ConfigError(f"--model: {path} does not exist (a training output dir, an HF folder or a GGUF file)")
    out = RunDir(path)
    if os.path.exists(out.final_state):
        saved = read_json(out.final_state)
        if os.path.exists(out.config):
            saved["config"] = read_json(out.config)
        model_folder(out.hf, out.hf, "--model")
        return out.hf, saved
    if is_run(path):
        raise ConfigError(f"--model: {path} is a bco-jax run without {FINAL_STATE} (not finished, or not "
                          "exported): finish the run first")
    model_folder(path, path, "--model")
    return path, {}


def read_json(path: str) -> dict:
    """A JSON object from a run's file; ConfigError naming the file when it does not read."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise ConfigError(f"--model: cannot read {path} ({err})") from None
    return value


def check_reference(model_path: str, ref_path: str) -> None:
    """The reference's files read and it scores the policy's tokens (same vocabulary, architecture,
    width and tokenizer), as the trainer requires."""
    if os.path.abspath(ref_path) == os.path.abspath(model_path):
        return
    if not os.path.exists(ref_path):
        raise ConfigError(f"--ref_model: {ref_path} does not exist (an HF folder or a GGUF file)")
    model_folder(ref_path, ref_path, "--ref_model")
    check_same_base(model_path, ref_path, key="--ref_model")


def check_data(spec: str) -> None:
    """--data names files, a folder or a dataset that exists (read later, rows named when bad)."""
    try:
        resolve_data(spec)
    except DataError as err:
        raise ConfigError(f"--data: {err}") from None


def report_path(args, ref_path: str) -> str:
    """Where the report goes: --output; else inside a training output dir (the run's own folder), else
    outputs/eval/<model name>/eval.json. Never into a folder or file the user owns (--model,
    --ref_model, --data), never onto a folder."""
    output = args.output
    if output is None and is_training_output(args.model):
        output = RunDir(args.model).eval_report
    elif output is None:
        name = os.path.basename(os.path.abspath(args.model))
        output = os.path.join(DEFAULT_PARENT, "eval", os.path.splitext(name)[0] if os.path.isfile(args.model)
                              else name, EVAL_REPORT)
    for target in (output, samples_path(output)):
        if os.path.isdir(target):
            raise ConfigError(f"--output: {target} is a folder; give the report's file path (e.g. {EVAL_REPORT})")
        for flag, path in (("--model", args.model), ("--ref_model", ref_path), ("--data", args.data)):
            relation = overlap(target, path) if os.path.exists(path) else None
            if relation and not is_training_output(path):
                raise ConfigError(f"--output: {target} {relation} the {flag} {path}; the report would change "
                                  "what you own: choose another --output")
    return output


def write_report(output: str, report: dict, rows: list[dict]) -> None:
    """The samples, then the report (strict JSON: a NaN is null), each written whole or not at all."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        files.atomic_write_text(samples_path(output), "".join(json.dumps(strict(r), allow_nan=False) + "\n"
                                                              for r in rows))
        files.atomic_write_json(output, strict(report), indent=2, allow_nan=False)
    except OSError as err:
        raise ConfigError(f"--output: cannot write {output} ({err.strerror or err})") from None


def strict(record: dict) -> dict:
    """`record` with every NaN or inf (an AUC over one class) as None (JSON null)."""
    return {k: None if isinstance(v, (float, np.floating)) and not math.isfinite(v) else v for k, v in record.items()}


def load_checked(path: str, flag: str, mesh=None, dtype=jnp.float32, attn_implementation: str = "auto"):
    """The model at `path` on `mesh`'s shardings, its weights in `dtype`; a loader error or a NaN / inf
    weight named in one line."""
    with reading_weights(path, flag):
        model = load_hf(path, dtype=dtype, param_dtype=dtype, mesh=mesh, rules=LOGICAL_RULES,
                        attn_implementation=attn_implementation)
    check_finite_weights(nnx.to_pure_dict(nnx.state(model)), path, flag)
    return model


def load_reward_fn(spec: str):
    """The oracle `module:function`; ConfigError naming --reward_fn when it does not import."""
    return import_callable(spec, "--reward_fn")


class _Parser(argparse.ArgumentParser):
    """argparse, its usage errors raised as one-line ConfigErrors naming the flag (exit 2)."""

    def error(self, message):
        raise ConfigError(message)


def parse(argv=None):
    """The evaluator's options, checked (`check_args`); the trainer's keys among them are typed as the
    trainer reads them (`bco_jax.config.add_keys`)."""
    p = _Parser(prog="python -m bco_jax.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="training output dir (uses hf/ and its saved delta), HF folder or GGUF file")
    p.add_argument("--data", required=True, help="labelled feedback (any format the trainer reads)")
    add_keys(p, {"ref_model": None, "beta": None, "max_length": None, "batch_size": 64, "seed": 0}, helps={
        "ref_model": "reference HF folder (default: the training run's, else --model)",
        "beta": "implicit-reward beta (default: the training run's, else 0.1)",
        "max_length": "default: the training run's, else 1024",
        "batch_size": "prompts or examples per forward pass (rounded up to a multiple of the data-parallel devices)"})
    add_keys(p, {"mesh": (-1, 1, 1), "dtype": "auto", "attn_implementation": "auto", "coordinator_address": None,
                 "num_processes": None, "process_id": None, "distributed_timeout": 300},
             helps={"dtype": "compute dtype, and the weights' (auto: bfloat16 on GPU/TPU, float32 on CPU)"})
    p.add_argument("--delta", type=float, help="reward shift (default: the training run's saved delta, else 0)")
    p.add_argument("--reward_fn", help="oracle module:function(prompt, completion) -> float")
    p.add_argument("--num_samples", type=int, default=256, help="held-out prompts to sample (default 256; 0: none)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--packing", choices=("true", "false"),
                   help="pack several examples per row for the reward pass (default: the training run's, else false)")
    p.add_argument("--output", help=f"JSON report path (default: <run>/{EVAL_REPORT} for a training output dir, else "
                                    f"{DEFAULT_PARENT}/eval/<model name>/{EVAL_REPORT}); samples go beside it")
    return check_args(p.parse_args(join_negative_values(list(sys.argv[1:] if argv is None else argv))))


def check_args(args):
    """`args`, once every number is in range (a NaN fails every comparison); ConfigError naming the flag."""
    def finite(x):
        return x is None or math.isfinite(x)

    checks = [
        (finite(args.temperature) and args.temperature >= 0, "temperature", "must be a finite number >= 0 (0: greedy)"),
        (0 < args.top_p <= 1, "top_p", "must be in (0, 1]"),
        (finite(args.beta) and (args.beta is None or args.beta > 0), "beta", "must be a finite number > 0"),
        (finite(args.delta), "delta", "must be a finite number"),
        (args.num_samples >= 0, "num_samples", "must be >= 0 (0: no sampling)"),
        (args.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
        (args.batch_size >= 1, "batch_size", "must be >= 1"),
        (0 <= args.seed < 2**32, "seed", "must be in [0, 2**32)"),
    ]
    for ok, flag, why in checks:
        if not ok:
            raise ConfigError(f"--{flag}: {why} (got {getattr(args, flag)!r})")
    return args


def run(args) -> dict:
    """Join the job, check every input, then score and sample; the report is written last (by
    process 0), nothing before it."""
    initialize_distributed(args)  # before anything touches a device
    model_path, saved = resolve_model(args.model)
    ref_path = args.ref_model or saved.get("reference_path") or model_path
    check_reference(model_path, ref_path)
    beta = args.beta if args.beta is not None else saved.get("beta", 0.1)
    delta = args.delta if args.delta is not None else saved.get("delta", 0.0)
    for name, value in (("beta", beta), ("delta", delta)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"--model: {RunDir(args.model).final_state} has {name}={value!r}, not a finite number")
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    check_data(args.data)
    output = report_path(args, ref_path)
    tokenizer = load_tokenizer(model_path)
    # The run's own data options (columns, rating rule, lengths), so rewards are computed on the
    # sequences the saved delta was estimated on; --max_length overrides.
    run_options = {f.name: saved["config"][f.name] for f in dataclasses.fields(DataConfig)
                   if f.name in saved.get("config", {})}
    run_options.update(train_data=[args.data], eval_data=[], shuffle=False, paired=False, kl_pairs=False)
    if args.max_length is not None:
        run_options["max_length"] = args.max_length
    if args.packing is not None:
        run_options["packing"] = args.packing == "true"
    cfg = DataConfig(**run_options)
    data = load_dataset([args.data], tokenizer, cfg, require_both_classes=False)
    if data.paired:
        raise DataError(f"--data {args.data}: evaluation reads unpaired feedback (prompt, completion, label)")
    mesh = build_mesh(args.mesh)
    batch_size = rounded_to_data(args.batch_size, mesh)
    options = dict(mesh=mesh, dtype=compute_dtype(args.dtype), attn_implementation=args.attn_implementation)
    policy_model = load_checked(model_path, "--model", **options)
    same = os.path.abspath(ref_path) == os.path.abspath(model_path)
    policy = nnx.split(policy_model)
    reference = policy if same else nnx.split(load_checked(ref_path, "--ref_model", **options))
    report = {"model": model_path, "reference": ref_path, "beta": beta, "delta": delta}
    with jax.set_mesh(mesh):
        report.update(feedback_metrics(data, cfg, policy, reference, beta, delta, batch_size, mesh))
        sampled, rows = sample_and_score(data, tokenizer, policy, reference, mesh, num_prompts=args.num_samples,
                                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_p=args.top_p, batch_size=batch_size, seed=args.seed,
                                         reward_fn=reward_fn, eos_ids=policy_model.config.eos_token_ids)
    report = strict({**report, **sampled})
    if jax.process_index() != 0:
        return report
    write_report(output, report, rows)
    for key, value in report.items():
        print(f"{key:28s} {value:.4f}" if isinstance(value, float) else f"{key:28s} {value}")
    return report


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, force=True)  # onto this call's stderr, as train does
    try:
        run(parse(argv))
    except SystemExit as stop:  # --help
        return stop.code if isinstance(stop.code, int) else 0
    except (*USER_ERRORS, OSError) as err:  # a user error, an unreadable file: one line; a bug: its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
