"""Scoring models on the mesh: the implicit reward over labelled feedback (the trainer's `eval_pass`
and the evaluator's `feedback_metrics`), and answers sampled for held-out prompts with their KL to the
reference (`sample_and_score`). Every process of a job calls these with the same arguments; each
feeds its block of every global batch (`bco_jax.sharding.data_shard`, as training feeds it) and every
process gets the whole result."""
from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from bco_jax import losses as L
from bco_jax.data import class_prompts, ordered_batches
from bco_jax.data.batch import Batch, Sequences
from bco_jax.data.tokenize import decode_answer
from bco_jax.metrics import eval_summary
from bco_jax.models import generate
from bco_jax.models.generate import left_padded, right_align
from bco_jax.precompute import attach_tables
from bco_jax.sharding import data_shard, host_gather, make_mesh, put_batch, put_rows, row_block, shard_devices
from bco_jax.step import scored_logps


def eval_pass(eval_fn, params, reference, reward_shift, data, data_cfg, batch_size: int, mesh,
              ref_table=None) -> dict:
    """eval_ metrics over a whole labelled dataset with the state's current delta (`eval_fn`:
    `bco_jax.step.StepProgram.eval`). Every process calls it; each feeds its block of the rows, laid
    out as training's (`data_shard`: processes whose devices hold the same rows feed the same ones)."""
    rows, n_rows, loss_sum = {"rewards": [], "labels": [], "mask": []}, 0, 0.0
    shard, shards = data_shard(mesh)
    for batch in ordered_batches(data, data_cfg, batch_size, shard, shards, shard_devices(mesh)):
        out = eval_fn(params, reference, put_batch(attach_tables(batch, ref_table), mesh), reward_shift)
        for key in rows:
            rows[key].append(host_gather(out[key]).reshape(-1))
        loss_sum += float(host_gather(out["loss_sum"]))
        n_rows += int(host_gather(out["n_examples"]))
    delta = float(L.reward_shift_delta(reward_shift))
    return eval_summary(*(np.concatenate(rows[k]) for k in ("rewards", "labels", "mask")), loss_sum, n_rows, delta)


@functools.lru_cache(maxsize=16)  # one compilation per model structure, not per call
def _logps_fn(graphdef):
    @jax.jit
    def fn(params, batch: Batch):  # the step's own log-prob helper, on an unpaired [E] batch
        return scored_logps(graphdef, params, batch)[:, 0]
    return fn


def feedback_metrics(data, cfg, policy, reference, beta, delta, batch_size, mesh=None) -> dict:
    """Accuracy / AUC / class means of the implicit reward on labelled (unpaired) feedback: every
    process scores its block of each global batch (`data_shard`), every process gets the totals.
    `mesh` None: the first device."""
    mesh = mesh or make_mesh((1, 1, 1), jax.devices()[:1])
    pol_fn, ref_fn = _logps_fn(policy[0]), _logps_fn(reference[0])
    rewards, labels, mask = [], [], []
    shard, shards = data_shard(mesh)
    for batch in ordered_batches(data, cfg, batch_size, shard, shards, shard_devices(mesh)):
        arrays = put_rows(batch.replace(example_index=None), mesh)
        r = L.implicit_reward(pol_fn(policy[1], arrays), ref_fn(reference[1], arrays), beta)
        for out, x in ((rewards, r), (labels, arrays.labels), (mask, arrays.example_mask)):
            out.append(host_gather(x))
    rewards, labels, mask = (np.concatenate(x) for x in (rewards, labels, mask))
    out = eval_summary(rewards, labels, mask, 0.0, 1, delta)
    out.pop("eval_loss")
    return {k.removeprefix("eval_"): v for k, v in out.items()}


def sample_and_score(data, tokenizer, policy, reference, mesh=None, *, num_prompts, max_new_tokens, temperature, top_p,
                     batch_size, seed, reward_fn=None, eos_ids=()):
    """Sample one completion per held-out prompt; KL estimate and optional oracle reward. Every
    process samples and scores its block of each batch of prompts; prompt i draws from the seed
    folded with i, so the answers do not depend on the process or device count."""
    # Distinct prompts in a seeded random order: cutting a class-sorted list would sample one class's
    # prompts only (and under prompt mismatch, one prompt family).
    by_index = {}
    for up in (True, False):
        for ids, index in zip(*class_prompts(data, up)):
            by_index[int(index)] = np.asarray(ids)
    seen, prompts = set(), []
    for index in np.random.default_rng(seed).permutation(sorted(by_index)):
        key = tuple(by_index[int(index)])
        if key not in seen:
            seen.add(key)
            prompts.append(by_index[int(index)])
    prompts = prompts[:num_prompts]
    pol_fn, ref_fn = _logps_fn(policy[0]), _logps_fn(reference[0])
    model = nnx.merge(*policy)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    mesh = mesh or make_mesh((1, 1, 1), jax.devices()[:1])
    mine = row_block(batch_size, mesh)
    rows, kls = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        chunk = chunk + [chunk[0]] * (batch_size - len(chunk))  # one shape: one compilation
        ids, mask = (x[mine] for x in left_padded(chunk, pad))
        tokens, gen_mask = generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, rng=jax.random.key(seed), eos_ids=eos_ids or None, pad_id=pad,
                                    row_ids=start + np.arange(batch_size)[mine], mesh=mesh)
        # Prompts were left-padded for sampling; scoring takes real tokens first (the training layout,
        # which fused attention kernels assume).
        full_mask, full, loss_mask = (np.asarray(x) for x in right_align(
            np.concatenate([mask, gen_mask], axis=1), np.concatenate([ids, tokens], axis=1),
            np.concatenate([np.zeros_like(mask), gen_mask], axis=1)))
        arrays = put_rows(Batch(example_mask=np.ones(len(full), bool), main=Sequences(full, full_mask, loss_mask)),
                          mesh)
        lp_pol, lp_ref = host_gather(pol_fn(policy[1], arrays)), host_gather(ref_fn(reference[1], arrays))
        tokens, gen_mask = host_gather(arrays.main.input_ids), host_gather(arrays.main.loss_mask)
        stop = set(eos_ids or model.config.eos_token_ids)
        for i in range(min(batch_size, len(prompts) - start)):
            prompt = tokenizer.decode(chunk[i], skip_special_tokens=True)
            completion = decode_answer(tokenizer, tokens[i][gen_mask[i] > 0], stop)
            row = {"prompt": prompt, "completion": completion, "policy_logp": float(lp_pol[i]),
                   "reference_logp": float(lp_ref[i])}
            if reward_fn is not None:
                row["oracle_reward"] = float(reward_fn(prompt, completion))
            rows.append(row)
            kls.append(lp_pol[i] - lp_ref[i])
    out = {"samples": len(rows)}  # no samples: no KL and no oracle reward (a mean of nothing)
    if rows:
        out["kl"] = float(np.mean(kls))
    if rows and reward_fn is not None:
        out["oracle_reward"] = float(np.mean([r["oracle_reward"] for r in rows]))
    return out, rows
