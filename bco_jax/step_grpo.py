"""GRPO's part of the train step: the loss of one micro-batch of sampled answers, and the token count
its `dapo` aggregation divides by. The step (`bco_jax.step.train_step`) scans micro-batches, sums
their losses, divides by the step's example count and applies the update, as for every other loss.

Several steps per sampling round clip the policy ratio against the policy that sampled the answers:
`sampling_logps` computes its per-token log-probs of a step's batch before the round's first update,
and a `GrpoBatch` carries them into the step (TRL's `old_per_token_logps`)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bco_jax import losses_online as LO
from bco_jax.data.batch import Batch
from bco_jax.models.logprobs import token_logps


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=[f.name for f in dataclasses.fields(Batch) if f.name != "shape"]
                   + ["old_per_token_logps"], meta_fields=["shape", "epsilon"])
@dataclasses.dataclass(frozen=True)
class GrpoBatch(Batch):
    """A GRPO batch with its answers' per-token log-probs [E, C] under the policy that sampled them,
    in `token_logps`'s slots (the c-th scored token of a row in slot c), and the clip range of the
    ratio against them (static, as the loss section is; the key `epsilon` is an online one). The plain
    `Batch` keeps no GRPO-only field: one update per round needs none (its old policy is the current one)."""
    old_per_token_logps: Any = None
    epsilon: float = 0.2

    @classmethod
    def of(cls, batch: Batch, old_per_token_logps, epsilon: float) -> GrpoBatch:
        return cls(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(Batch)},
                   old_per_token_logps=old_per_token_logps, epsilon=epsilon)


@functools.partial(jax.jit, static_argnums=0)
def sampling_logps(graphdef, params, batch: Batch):
    """[A, E, C] per-token log-probs of a step's [A, ...] batch under `params` (the policy that sampled
    it), one micro-batch at a time, as the step computes them: no gradient, no dropout."""
    def micro(mb):
        seqs = mb.main
        return token_logps(nnx.merge(graphdef, params), seqs.input_ids, seqs.attention_mask, seqs.loss_mask,
                           mb.shape.capacity)[0]

    return jax.lax.map(micro, batch)


def scored_tokens(batch: Batch):
    """Completion tokens the loss scores in the whole step, over real examples (position 0 never is
    scored: nothing precedes it). Rows are examples: GRPO's answers are not packed."""
    seqs = batch.main
    scored = seqs.loss_mask[..., 1:] * seqs.attention_mask[..., 1:] * batch.example_mask[..., None]
    return jnp.maximum(jnp.sum(scored).astype(jnp.float32), 1.0)


def grpo_micro_loss(graphdefs, params, reference, mb: Batch, cfg, tokens_per_example, rng=None):
    """GRPO on one micro-batch of answers (`mb.weights`: their group-relative advantages), as a sum over
    its examples that the step divides by the step's example count: TRL's aggregation for the whole
    step (`grpo`: mean of per-answer token means; `dapo`: token sum / the step's token count, given as
    `tokens_per_example` = tokens / examples).
    The ratio's old policy: a `GrpoBatch`'s `old_per_token_logps`; for a plain `Batch` (one update per
    sampling round) the current one, ratio 1 in value."""
    graphdef, ref_graphdef = graphdefs
    seqs, capacity = mb.main, mb.shape.capacity

    def per_token(g, p, key=None):
        return token_logps(nnx.merge(g, p), seqs.input_ids, seqs.attention_mask, seqs.loss_mask, capacity,
                           dropout_rng=key)

    logps_BxC, weights_BxC, _ = per_token(graphdef, params, rng)
    ref_BxC = None
    if cfg.beta != 0:
        ref_BxC = jax.lax.stop_gradient(per_token(ref_graphdef, reference)[0])
    mask_BxC = (weights_BxC > 0) & mb.example_mask.astype(bool)[:, None]
    old_BxC, epsilon = (mb.old_per_token_logps, mb.epsilon) if isinstance(mb, GrpoBatch) else (None, 0.2)
    B = logps_BxC.shape[0]
    if cfg.loss_type == "dapo":
        loss, metrics = LO.grpo_loss(logps_BxC, old_BxC, ref_BxC, mb.weights, mask_BxC, beta=cfg.beta,
                                     epsilon_low=epsilon, loss_type="dapo", num_items_in_batch=tokens_per_example)
    else:  # grpo: a mean over this micro-batch's rows -> their sum
        loss, metrics = LO.grpo_loss(logps_BxC, old_BxC, ref_BxC, mb.weights, mask_BxC, beta=cfg.beta,
                                     epsilon_low=epsilon, loss_type="grpo")
        loss = loss * B
    # TRL's clip fractions, as token sums here: the step divides them by its token count (`clip_ratios`).
    tokens = jnp.sum(mask_BxC).astype(jnp.float32)
    clip_sums = {f"clip_sum/{k}": jnp.where(tokens > 0, metrics[f"clip_ratio/{k}_mean"] * tokens, 0.0)
                 for k in CLIP_KINDS}
    return loss, jnp.sum(jnp.where(mask_BxC, logps_BxC, 0.0), axis=1), {**clip_sums, "clip_tokens": tokens}


CLIP_KINDS = ("low", "high", "region")


def clip_ratios(metrics: dict) -> dict:
    """The step's summed clip counts -> TRL's clip_ratio/{low,high,region}_mean over the step's tokens."""
    if "clip_tokens" not in metrics:
        return metrics
    tokens = jnp.maximum(metrics.pop("clip_tokens"), 1.0)
    return {**metrics, **{f"clip_ratio/{k}_mean": metrics.pop(f"clip_sum/{k}") / tokens for k in CLIP_KINDS}}
