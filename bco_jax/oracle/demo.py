"""The trainer's embedded default run: BCO on the shipped oracle-task SFT model and feedback, scored
by the oracle before and after (`python -m bco_jax.train` with no arguments)."""
from __future__ import annotations

import jax
from flax import nnx

from bco_jax import oracle, run_dir
from bco_jax.oracle import sampling, task


def defaults() -> dict:
    """Config keys of the demo: the shipped model and data, and settings under which a
    200k-parameter model visibly improves in well under a CPU minute of training."""
    return {"model": oracle.MODEL_DIR, "train_data": [oracle.TRAIN_FEEDBACK],
            "eval_data": [oracle.EVAL_FEEDBACK], **oracle.DEMO_SETTINGS}


def success(graphdef, params, tokenizer, *, seed: int, samples: int, mesh=None) -> dict:
    """Oracle success rate of about `samples` temperature-1 answers on the held-out eval prompts
    (`mesh`: sampled on it, every process its share)."""
    prompts = task.split_prompts()["eval"]
    model = nnx.merge(graphdef, params)
    result = sampling.success_rate(model, tokenizer, prompts, jax.random.key(seed),
                                   samples_per_prompt=max(1, samples // len(prompts)), mesh=mesh)
    return {"oracle_success": result["success"], "oracle_samples": result["n"]}


def print_table(before: dict, after: dict, output_dir: str) -> None:
    rows = [("oracle success rate (held-out prompts, T=1)", "oracle_success"),
            ("implicit-reward accuracy (held-out feedback)", "eval_reward_accuracy"),
            ("implicit-reward ROC AUC", "eval_reward_auc"),
            ("mean reward, thumbs-up", "eval_rewards/chosen"),
            ("mean reward, thumbs-down", "eval_rewards/rejected"),
            ("delta", "eval_delta")]
    print(f"\n{'':46s} {'before':>10s} {'after':>10s}")
    for name, key in rows:
        def fmt(d):
            return f"{d[key]:10.4f}" if key in d else f"{'-':>10s}"
        print(f"{name:46s} {fmt(before)} {fmt(after)}")
    names = (run_dir.METRICS, f"{run_dir.TENSORBOARD}/", f"{run_dir.CHECKPOINTS}/", f"{run_dir.HF_EXPORT}/")
    print(f"\noutputs in {output_dir}: {', '.join(names)} (the aligned model)")
