"""A minimal BCO run on the shipped oracle assets: does binary feedback raise the success rate?

A sanity check of the task's design (not the trainer): it uses only the loss library, the models
and the oracle, with a plain loop, so the task can be judged before `python -m bco_jax.train` exists
and settings for its embedded default can be picked. Reports the oracle success rate on held-out
prompts before and after, and the held-out implicit-reward accuracy.

    .venv/bin/python -m experiments.oracle.check_bco --steps 200 --learning_rate 1e-4
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from transformers import AutoTokenizer

from bco_jax import losses
from bco_jax.models import load_hf, sequence_logps
from bco_jax.oracle import ASSETS, task
from bco_jax.oracle.sampling import success_rate

SEQ_LEN = 12


def encode(tokenizer, rows):
    """BOS prompt completion EOS, right-padded; loss on completion + EOS (as TRL's BCOTrainer)."""
    n = len(rows)
    ids, attn, loss = (np.zeros((n, SEQ_LEN), np.int32) for _ in range(3))
    for i, r in enumerate(rows):
        p = tokenizer(r["prompt"]).input_ids
        c = tokenizer(r["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids[i, :len(p) + len(c)], attn[i, :len(p) + len(c)] = p + c, 1
        loss[i, len(p):len(p) + len(c)] = 1
    return ids, attn, loss, np.array([r["label"] for r in rows])


def read(folder, name):
    with open(os.path.join(folder, name)) as f:
        return [json.loads(line) for line in f]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ASSETS, "sft"))
    p.add_argument("--feedback", default=os.path.join(ASSETS, "feedback"))
    p.add_argument("--data", default="binary.jsonl", help="an unpaired file in --feedback")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.time()
    model_dir = args.model
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy, reference = load_hf(model_dir), load_hf(model_dir)
    data = encode(tok, read(args.feedback, args.data))
    held = encode(tok, read(args.feedback, "eval_binary.jsonl"))
    prompts = task.split_prompts()["eval"]
    before = success_rate(policy, tok, prompts, jax.random.key(1), samples_per_prompt=4)

    # Warmup over the first 10% of steps, then linear decay: the paper's schedule.
    lr = optax.join_schedules([optax.linear_schedule(0.0, args.learning_rate, args.steps // 10),
                               optax.linear_schedule(args.learning_rate, 0.0, args.steps - args.steps // 10)],
                              [args.steps // 10])
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))
    optimizer = nnx.Optimizer(policy, tx, wrt=nnx.Param)
    shift = losses.reward_shift_init("ema")

    @nnx.jit
    def step(policy, optimizer, reference, shift, ids, attn, loss_mask, labels):
        ref, _ = sequence_logps(reference, ids, attn, loss_mask)
        ref = jax.lax.stop_gradient(ref)
        delta = losses.reward_shift_delta(shift)

        def loss_fn(policy):
            pol, _ = sequence_logps(policy, ids, attn, loss_mask)
            per_example, rewards = losses.bco_loss(pol, ref, labels, delta, beta=args.beta)
            return jnp.mean(per_example), rewards

        (loss, rewards), grads = nnx.value_and_grad(loss_fn, has_aux=True)(policy)
        optimizer.update(policy, grads)
        return loss, losses.reward_shift_update(shift, rewards, labels), delta

    @nnx.jit
    def held_rewards(policy, reference, ids, attn, loss_mask):
        return args.beta * (sequence_logps(policy, ids, attn, loss_mask)[0]
                            - sequence_logps(reference, ids, attn, loss_mask)[0])

    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(data[0]))
    for s in range(args.steps):  # epochs of one fixed shuffle, wrapping around
        idx = np.take(order, np.arange(s * args.batch_size, (s + 1) * args.batch_size), mode="wrap")
        loss, shift, delta = step(policy, optimizer, reference, shift, *(jnp.asarray(a[idx]) for a in data))
        if (s + 1) % 50 == 0:
            print(json.dumps(dict(step=s + 1, loss=round(float(loss), 4), delta=round(float(delta), 4),
                                  seconds=round(time.time() - t0, 1))), flush=True)
    r = np.asarray(held_rewards(policy, reference, *(jnp.asarray(a) for a in held[:3])))
    accuracy = float(np.mean((r - float(losses.reward_shift_delta(shift)) > 0) == held[3]))
    after = success_rate(policy, tok, prompts, jax.random.key(1), samples_per_prompt=4)
    print(json.dumps(dict(args=vars(args), before=before, after=after, heldout_reward_accuracy=accuracy,
                          seconds=round(time.time() - t0, 1))))


if __name__ == "__main__":
    main()
