"""Train the oracle task's SFT model from random init and save it as an HF folder.

Plain next-token cross-entropy on the answer tokens (+ EOS) of noisy demonstrations
(`bco_jax.oracle.task.noisy_answer`), drawn fresh at every step. With `--noise 0.5` a model that
learns the demonstrations well answers right about half of the time at temperature 1, while its
greedy answer is nearly always right: feedback on its samples then says something it can use.

    .venv/bin/python -m experiments.oracle.make_sft --out bco_jax/assets/oracle/sft
    .venv/bin/python -m experiments.oracle.make_sft --task interval   # bco_jax/assets/interval/sft

`--task interval` trains the same model with the same recipe on `bco_jax.oracle.interval`'s noisy
demonstrations (an integer inside "(a b)"; wrong ones on a boundary or just outside). There the greedy
answer is mostly a boundary, by design: see experiments/interval/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from transformers import AutoTokenizer

from bco_jax.models import Decoder, read_config, save_hf
from bco_jax.oracle import TASK_ASSETS, TASKS
from bco_jax.oracle.sampling import success_rate
from bco_jax.oracle.tokenizer import VOCAB
from experiments.oracle.make_feedback import recorded_args

SEQ_LEN = 12  # BOS + 6 question characters + 3 answer digits + EOS, rounded up (interval: 1 + 7 + 2 + 1)


def model_config(args) -> dict:
    """config.json of the tiny Llama, as transformers 5 writes it for LlamaForCausalLM."""
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        # 32 rows, not 21: a multiple of 8 shards over any small mesh axis; the spare rows are
        # never a training target, so the model learns to give them ~0 probability.
        vocab_size=32, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, head_dim=args.hidden // args.heads, hidden_act="silu",
        rms_norm_eps=1e-6, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=VOCAB["<bos>"], eos_token_id=VOCAB["<eos>"], pad_token_id=VOCAB["<pad>"],
        dtype="float32")


def generation_config() -> dict:
    # Plain temperature-1 sampling is what the feedback was collected with.
    return dict(bos_token_id=VOCAB["<bos>"], eos_token_id=VOCAB["<eos>"], pad_token_id=VOCAB["<pad>"],
                do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=5)


def make_batch(stream, batch_size: int):
    """ids / attention mask / loss mask [B, SEQ_LEN]: BOS question answer EOS, right-padded; the
    loss covers the answer and EOS, as the trainer's loss mask covers a completion."""
    ids = np.full((batch_size, SEQ_LEN), VOCAB["<pad>"], np.int32)
    attn = np.zeros((batch_size, SEQ_LEN), np.int32)
    loss = np.zeros((batch_size, SEQ_LEN), np.int32)
    for row in range(batch_size):
        prompt, ans = next(stream)
        toks = [VOCAB["<bos>"]] + [VOCAB[c] for c in prompt + ans] + [VOCAB["<eos>"]]
        ids[row, :len(toks)], attn[row, :len(toks)] = toks, 1
        loss[row, 1 + len(prompt):len(toks)] = 1
    return ids, attn, loss


def cross_entropy(model, ids, attn, loss_mask):
    logits = model(ids[:, :-1], attn[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    target = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    mask = loss_mask[:, 1:]
    return -jnp.sum(target * mask) / jnp.sum(mask)


@nnx.jit
def train_step(model, optimizer, ids, attn, loss_mask):
    loss, grads = nnx.value_and_grad(cross_entropy)(model, ids, attn, loss_mask)
    optimizer.update(model, grads)
    return loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="arithmetic", help="the oracle task")
    p.add_argument("--out", default=None, help="default: bco_jax/assets/<oracle|interval>/sft")
    p.add_argument("--tokenizer", default="bco_jax/assets/oracle/tokenizer",
                   help="tokenizer folder copied into --out (written by bco_jax.oracle.tokenizer)")
    p.add_argument("--noise", type=float, default=0.5, help="fraction of wrong demonstrations")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_every", type=int, default=500)
    args = p.parse_args(argv)
    task = TASKS[args.task]
    args.out = args.out or os.path.relpath(os.path.join(TASK_ASSETS[args.task], "sft"))

    t0 = time.time()
    splits = task.split_prompts()
    cfg = read_config(model_config(args), generation_config_json=json.dumps(generation_config()))
    model = Decoder(cfg, rngs=nnx.Rngs(args.seed), dtype=jnp.float32)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, 100, args.steps, 0.0)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=0.0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    stream = task.demonstrations(splits["train"], np.random.default_rng(args.seed), args.noise)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    history = []
    for step in range(1, args.steps + 1):
        loss = train_step(model, optimizer, *map(jnp.asarray, make_batch(stream, args.batch_size)))
        if step % args.eval_every == 0 or step == args.steps:
            rates = success_rate(model, tokenizer, splits["eval"], jax.random.key(args.seed),
                                 samples_per_prompt=2, task=task)
            greedy = success_rate(model, tokenizer, splits["eval"], jax.random.key(0), temperature=0.0,
                                  task=task)
            row = dict(step=step, loss=round(float(loss), 4), seconds=round(time.time() - t0, 1),
                       **{k: round(v, 4) for k, v in rates.items()}, greedy=greedy["success"])
            history.append(row)
            print(json.dumps(row), flush=True)
    save_hf(model, args.out, tokenizer=args.tokenizer)
    with open(os.path.join(args.out, "training_log.json"), "w") as f:
        json.dump(dict(args=recorded_args(args), history=history), f, indent=1)
    print(f"saved {args.out} in {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
