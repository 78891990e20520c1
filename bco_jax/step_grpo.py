"""GRPO's part of the train step: the loss of one micro-batch of sampled answers, and the token count
its `dapo` aggregation divides by. The step (`bco_jax.step.train_step`) scans micro-batches, sums
their losses, divides by the step's example count and applies the update, as for every other loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bco_jax import losses_online as LO
from bco_jax.data.batch import Batch
from bco_jax.models.logprobs import token_logps


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
    One optimisation step per sampling round: the old policy is the current one (ratio 1)."""
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
    B = logps_BxC.shape[0]
    if cfg.loss_type == "dapo":
        loss, _ = LO.grpo_loss(logps_BxC, None, ref_BxC, mb.weights, mask_BxC, beta=cfg.beta, loss_type="dapo",
                               num_items_in_batch=tokens_per_example)
    else:  # grpo: a mean over this micro-batch's rows -> their sum
        loss = LO.grpo_loss(logps_BxC, None, ref_BxC, mb.weights, mask_BxC, beta=cfg.beta, loss_type="grpo")[0] * B
    return loss, jnp.sum(jnp.where(mask_BxC, logps_BxC, 0.0), axis=1)
