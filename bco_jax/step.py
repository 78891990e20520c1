"""The train state, the optimizer, and the pure train / eval steps.

`train_step(state, reference, batch) -> (state, metrics)` is one optimizer step: a scan over the
micro-batches of the global batch (gradient accumulation inside the step), then one AdamW update.
It is a pure function of arrays, jitted once per batch shape by the caller with explicit shardings.

Batches (`bco_jax.data.batch.Batch`) arrive as [A, b, ...] arrays: A micro-batches of b rows
(`sharding.put_batch` reshapes). `compile_step` builds the whole program once (abstract state,
initializer, jitted step and eval) for the trainer, the planner and the benchmarks alike. Delta:
with `reward_shift=ema` every micro-batch of a step uses the delta from before the step and the state
is then updated once with all of the step's rewards, so the update does not depend on how the batch
is split; with `reward_shift=trl` the state moves before each micro-batch's loss, as TRL does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from bco_jax import losses as L
from bco_jax.data.batch import PAIR_SIDES, Batch, Sequences
from bco_jax.models import example_logps, sequence_logps, weight_decay_mask
from bco_jax.models.lora import join_adapters, split_adapters
from bco_jax.sharding import abstract_on, model_shardings
from bco_jax.step_grpo import clip_ratios, grpo_micro_loss, scored_tokens

if typing.TYPE_CHECKING:
    from bco_jax.config import LossOptions  # the loss section of the config: frozen, jit-static


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["step", "params", "opt_state", "reward_shift", "rng", "nonfinite_in_row",
                                "skipped_steps"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # optimizer steps taken (skipped ones included)
    params: dict  # the policy, float32 master copy (nnx pure dict)
    opt_state: optax.OptState
    reward_shift: L.RewardShiftState
    rng: jax.Array
    nonfinite_in_row: jax.Array  # consecutive skipped steps; the loop stops past a limit
    skipped_steps: jax.Array


def state_shardings(abstract_state: TrainState, param_shardings, mesh, optimizer) -> TrainState:
    """Where each part of the state lives: parameters and their optimizer moments by the parameters'
    shardings, every scalar replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state.opt_state, param_shardings,
                                transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt,
                      reward_shift=jax.tree.map(lambda _: replicated, abstract_state.reward_shift),
                      rng=replicated, nonfinite_in_row=replicated, skipped_steps=replicated)


# ---------------------------------------------------------------------------------------- optimizer


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)  # as transformers' TrainingArguments


def learning_rate_schedule(peak: float, total_steps: int, warmup_ratio: float, kind: str):
    """transformers' schedules: linear warmup from 0, then linear to 0 / cosine to 0 / constant
    (`constant_with_warmup`); transformers' `constant` has no warmup at all."""
    warm = 0 if kind == "constant" else warmup_steps(total_steps, warmup_ratio)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        ramp = count / max(warm, 1)
        progress = (count - warm) / max(total_steps - warm, 1)
        if kind == "linear":
            after = jnp.maximum(0.0, 1.0 - progress)
        elif kind == "cosine":
            after = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
        else:
            after = jnp.ones_like(progress)
        return peak * jnp.where(count < warm, ramp, after)

    return schedule


def make_optimizer(optim, total_steps: int, decay_mask):
    """AdamW with global-norm clipping; returns (optimizer, schedule). `decay_mask`: a tree of bools
    like the parameters, True where weight decay applies (as transformers: not on norms and biases;
    `bco_jax.models.weight_decay_mask` derives it from the parameters' logical axes)."""
    schedule = learning_rate_schedule(optim.learning_rate, total_steps, optim.warmup_ratio,
                                      optim.lr_scheduler_type)
    adamw = optax.adamw(schedule, b1=optim.adam_beta1, b2=optim.adam_beta2, eps=optim.adam_epsilon,
                        weight_decay=optim.weight_decay, mask=decay_mask)
    clip = optax.clip_by_global_norm(optim.max_grad_norm) if optim.max_grad_norm > 0 else optax.identity()
    return optax.chain(clip, adamw), schedule


def init_state(params, optimizer, reward_shift: L.RewardShiftState, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      reward_shift=reward_shift, rng=jax.random.key(seed),
                      nonfinite_in_row=jnp.zeros((), jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))


# ---------------------------------------------------------------------------------------- forward


def batch_logps(graphdef, params, seqs: Sequences, num_examples: int, capacity: int | None = None,
                dropout_rng=None):
    """(logps_E, counts_E) of a [R, T] `Sequences`, one per example: per row, or with packed rows
    per entry of the example axis (`num_examples`). `capacity`: scored tokens a row may hold (the
    batch's `BatchShape`); the LM head runs on that many positions per row, or on all of them when
    None. `dropout_rng`: LoRA dropout (training)."""
    model = nnx.merge(graphdef, params)
    if seqs.packed:
        return example_logps(model, seqs.input_ids, seqs.attention_mask, seqs.loss_mask, seqs.segment_ids,
                             seqs.positions, seqs.row_first_example, num_examples, completion_capacity=capacity,
                             dropout_rng=dropout_rng)
    return sequence_logps(model, seqs.input_ids, seqs.attention_mask, seqs.loss_mask, completion_capacity=capacity,
                          dropout_rng=dropout_rng)


def scored_logps(graphdef, params, mb: Batch) -> jax.Array:
    """[E, S] log-probs of a micro-batch's scored sequences (`Batch.scored`): the reference table's layout."""
    return jnp.stack([batch_logps(graphdef, params, seqs, mb.num_examples, mb.shape.capacity)[0]
                      for seqs in mb.scored()], axis=-1)


def _masked_sum(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0))


def _class_stats(rewards, logps, up, mask):
    """Sums and counts per class, for TRL's metrics (rewards/chosen ... count/rejected)."""
    is_up, is_down = mask & up, mask & ~up
    return {
        "rewards_sum/chosen": _masked_sum(rewards, is_up), "rewards_sum/rejected": _masked_sum(rewards, is_down),
        "logps_sum/chosen": _masked_sum(logps, is_up), "logps_sum/rejected": _masked_sum(logps, is_down),
        "count/chosen": jnp.sum(is_up).astype(jnp.float32), "count/rejected": jnp.sum(is_down).astype(jnp.float32),
    }


# LoRA dropout draws one key per sequence kind (the kind's place here: main 0, KTO's KL 3).
_SEQUENCE_KINDS = ("main", *PAIR_SIDES, "kl")


def micro_batch_loss(params, reference, mb: Batch, shift, *, graphdefs, cfg: LossOptions, delta, lora=False,
                     rng=None, tokens_per_example=None):
    """Sum of per-example losses of one micro-batch, and what the step needs besides.

    Returns (loss_sum, (rewards_B, labels_B, mask_B, shift, stats)). For unpaired losses, rows are
    examples (packed rows: the entries of the example axis); for paired ones, rows are pairs,
    expanded to 2 rows (chosen, rejected) in what it returns. GRPO (`grpo_micro_loss`) reports each
    answer's advantage as its reward.
    """
    graphdef, ref_graphdef = graphdefs
    if lora:  # `params` are the adapters; `reference` is (the frozen base they sit on, the reference or None)
        base, reference = reference
        params = join_adapters(base, params)
        reference = base if reference is None else reference  # None: the base with adapters off
    E = mb.num_examples

    def capacity(kind):
        return mb.shape.kl_capacity if kind == "kl" and mb.shape.kl_capacity is not None else mb.shape.capacity

    def policy_logps(kind="main"):
        key = None if rng is None else jax.random.fold_in(rng, _SEQUENCE_KINDS.index(kind))
        return batch_logps(graphdef, params, getattr(mb, kind), E, capacity(kind), key)

    def reference_logps(kind="main"):
        if mb.reference_logps is not None:  # precomputed (never for KTO's KL rows): the loop put them in the batch
            return mb.reference_logps[:, 0 if kind == "main" else PAIR_SIDES.index(kind)]
        return jax.lax.stop_gradient(batch_logps(ref_graphdef, reference, getattr(mb, kind), E, capacity(kind))[0])

    mask = mb.example_mask.astype(bool)
    if cfg.loss_type in L.GRPO_LOSSES:
        loss_sum, logps, clips = grpo_micro_loss(graphdefs, params, reference, mb, cfg, tokens_per_example, rng)
        labels = mb.labels.astype(bool)
        stats = _class_stats(jax.lax.stop_gradient(mb.weights), jax.lax.stop_gradient(logps), labels, mask)
        stats.update(clips)
        stats["delta"] = delta
        return loss_sum, (jax.lax.stop_gradient(mb.weights), labels, mask, shift, stats)
    if cfg.loss_type in L.PAIRED_LOSSES:
        (pol_w, n_w), (pol_l, n_l) = (policy_logps(side) for side in PAIR_SIDES)
        ref_w, ref_l = (reference_logps(side) for side in PAIR_SIDES)
        if cfg.loss_type == "ipo":  # IPO on length-averaged log-probs, as TRL
            pol_w, ref_w = pol_w / jnp.maximum(n_w, 1), ref_w / jnp.maximum(n_w, 1)
            pol_l, ref_l = pol_l / jnp.maximum(n_l, 1), ref_l / jnp.maximum(n_l, 1)
        losses, chosen, rejected = L.PAIRED_LOSSES[cfg.loss_type](pol_w, pol_l, ref_w, ref_l, beta=cfg.beta,
                                      label_smoothing=cfg.label_smoothing)
        rewards = jnp.concatenate([chosen, rejected])
        logps = jnp.concatenate([pol_w, pol_l])
        labels = jnp.concatenate([jnp.ones_like(mask), jnp.zeros_like(mask)])
        row_mask = jnp.concatenate([mask, mask])
        used_delta = delta
    else:
        logps, _ = policy_logps()
        ref = reference_logps()
        labels, row_mask = mb.labels.astype(bool), mask
        if cfg.loss_type == "kto":
            pol_kl = jax.lax.stop_gradient(policy_logps("kl")[0])
            ref_kl = reference_logps("kl")
            kl = L.kto_kl(pol_kl, ref_kl, mask)
            losses, rewards = L.kto_loss(logps, ref, labels, kl, beta=cfg.beta,
                                         desirable_weight=cfg.desirable_weight,
                                         undesirable_weight=cfg.undesirable_weight)
            used_delta = kl
        else:
            if shift.mode == "trl":  # TRL folds the batch in before its loss (rewards detached inside)
                shift = L.reward_shift_update(shift, cfg.beta * (logps - ref), labels, mask)
                used_delta = L.reward_shift_delta(shift)
            else:
                used_delta = delta
            losses, rewards = L.bco_loss(logps, ref, labels, used_delta, beta=cfg.beta,
                                         weights=mb.weights)
    stats = _class_stats(jax.lax.stop_gradient(rewards), jax.lax.stop_gradient(logps), labels, row_mask)
    stats["delta"] = used_delta
    return _masked_sum(losses, mask), (jax.lax.stop_gradient(rewards), labels, row_mask, shift, stats)


def train_step(state: TrainState, reference, batch: Batch, *, graphdefs, cfg: LossOptions, optimizer, schedule,
               lora=False):
    """One optimizer step over a global batch of [A, b, ...] arrays. Returns (state, metrics).

    The gradient is that of the mean per-example loss over every real example of the step (TRL's
    reduction), whatever A is. A non-finite loss or gradient skips the update, the reward-shift update
    included (one NaN would poison delta for good), and is counted. The batch's static `BatchShape`
    says how many positions per row the LM head runs on.
    `reference`: the reference's parameters, or None when its log-probs are precomputed into the batch.
    `lora`: `state.params` are LoRA adapters, their dropout draws from `state.rng`, and `reference` is
    the pair (frozen base the adapters sit on, reference's parameters), the latter None when the
    reference is that base with adapters off (no second copy) or is precomputed.
    """
    n_examples = jnp.maximum(jnp.sum(batch.example_mask).astype(jnp.float32), 1.0)
    tokens_per_example = scored_tokens(batch) / n_examples if cfg.loss_type in L.GRPO_LOSSES else None
    delta = L.reward_shift_delta(state.reward_shift)
    grad_fn = jax.value_and_grad(micro_batch_loss, has_aux=True)

    step_rng = jax.random.fold_in(state.rng, state.step) if lora else None

    def body(carry, mb):
        grads, loss_sum, shift, i = carry
        rng = None if step_rng is None else jax.random.fold_in(step_rng, i)
        (mb_loss, (rewards, labels, mask, shift, stats)), g = grad_fn(
            state.params, reference, mb, shift, graphdefs=graphdefs, cfg=cfg, delta=delta, lora=lora, rng=rng,
            tokens_per_example=tokens_per_example)
        grads = jax.tree.map(lambda acc, x: acc + x / n_examples, grads, g)
        return (grads, loss_sum + mb_loss, shift, i + 1), (rewards, labels, mask, stats)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, jnp.zeros((), jnp.float32), state.reward_shift, jnp.zeros((), jnp.int32))
    (grads, loss_sum, shift, _), (rewards, labels, mask, stats) = jax.lax.scan(body, init, batch)
    if shift.mode != "trl":  # once per step, with every reward of the step (TRL's moved per micro-batch)
        shift = L.reward_shift_update(shift, rewards.reshape(-1), labels.reshape(-1), mask.reshape(-1))

    loss = loss_sum / n_examples
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state, shift

    # A branch, not a select between old and new: the update then happens in place (a select holds
    # both the old and the new parameters and moments at once).
    params, opt_state, shift = jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state,
                                                                        state.reward_shift), None)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        reward_shift=shift,
        rng=jax.random.fold_in(state.rng, state.step),
        nonfinite_in_row=jnp.where(finite, 0, state.nonfinite_in_row + 1),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
    )
    metrics = clip_ratios({k: jnp.sum(v) for k, v in stats.items() if k != "delta"})
    # The delta this step's loss used; in TRL mode it moves per micro-batch and TRL logs their mean.
    metrics["delta"] = jnp.mean(stats["delta"])
    # The rate of this step's update: the schedule counts applied updates (a skipped step applies none).
    metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step - state.skipped_steps),
                   skipped=(~finite).astype(jnp.int32), tokens=_tokens(batch),
                   nonfinite_in_row=new_state.nonfinite_in_row)
    return new_state, metrics


def _tokens(batch: Batch):
    return sum(jnp.sum(seqs.attention_mask).astype(jnp.float32) for seqs in batch.scored())


def eval_step(params, reference, batch: Batch, shift, *, graphdefs, cfg: LossOptions, lora=False):
    """Per-row rewards, labels, mask and losses of one [b, ...] batch, for accuracy / AUC on the host.
    Uses the state's current delta and does not move it."""
    delta = L.reward_shift_delta(shift)
    # Any mode but "trl" uses the delta given; evaluation must not move TRL's running mean either.
    shift = dataclasses.replace(shift, mode="none")
    loss_sum, (rewards, labels, mask, _, stats) = micro_batch_loss(
        params, reference, batch, shift, graphdefs=graphdefs, cfg=cfg, delta=delta, lora=lora)
    return {"rewards": rewards, "labels": labels, "mask": mask, "loss_sum": loss_sum, **stats,
            "delta": delta, "n_examples": jnp.sum(batch.example_mask)}


# ---------------------------------------------------------------------------------------- program


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """The training program of one model on one mesh: what `compile_step` returns.

    `step(state, frozen, batch) -> (state, metrics)` (the state donated) and
    `eval(params, frozen, batch, reward_shift) -> per-row outputs` on [1, b, ...] batches are jitted;
    `frozen` is `train_step`'s `reference`. `init(trained params) -> TrainState` (donating the params:
    no second copy of the weights at start) builds the initial
    state straight onto its shardings (on several hosts no process holds all of it).
    `abstract_state`: the state's shapes, dtypes and shardings."""
    abstract_state: TrainState
    init: typing.Callable
    step: typing.Callable
    eval: typing.Callable
    schedule: typing.Callable


def trained_part(params, lora: bool):
    """What the optimizer trains: the whole policy, or with LoRA its adapters alone."""
    return split_adapters(params)[1] if lora else params


def compile_step(graphdefs, abstract_params, mesh, *, loss: LossOptions, optim, total_steps: int, seed: int = 0,
                 lora: bool = False) -> StepProgram:
    """The program for the policy `abstract_params` (an abstract nnx.State; with `lora`, adapters
    included) and reference / base graphdefs `graphdefs` = (policy's, reference's) on `mesh`:
    AdamW as `optim` says over `total_steps`, the loss as `loss` says."""
    decay = trained_part(weight_decay_mask(abstract_params), lora)
    optimizer, schedule = make_optimizer(optim, total_steps, decay)
    shift = L.reward_shift_init(loss.reward_shift, loss.reward_shift_decay, loss.reward_shift_value)
    make_state = functools.partial(init_state, optimizer=optimizer, reward_shift=shift, seed=seed)
    params_shape = trained_part(nnx.to_pure_dict(abstract_params), lora)
    shape = jax.eval_shape(make_state, params_shape)
    shardings = state_shardings(shape, trained_part(nnx.to_pure_dict(model_shardings(abstract_params, mesh)), lora),
                                mesh, optimizer)
    step = jax.jit(functools.partial(train_step, graphdefs=graphdefs, cfg=loss, optimizer=optimizer,
                                     schedule=schedule, lora=lora),
                   out_shardings=(shardings, None), donate_argnums=0)

    def evaluate(params, frozen, batch, reward_shift):
        return eval_step(params, frozen, jax.tree.map(lambda x: x[0], batch), reward_shift, graphdefs=graphdefs,
                         cfg=loss, lora=lora)

    init = jax.jit(make_state, out_shardings=shardings, donate_argnums=0)
    return StepProgram(abstract_state=abstract_on(shape, shardings), init=init, step=step, eval=jax.jit(evaluate),
                       schedule=schedule)


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
                 "generated_code_size_in_bytes")


def memory_report(compiled) -> dict:
    """XLA's per-device memory analysis of a compiled function, in bytes, with
    `peak_estimate_bytes` = arguments + temporaries."""
    mem = compiled.memory_analysis()
    report = {k: int(getattr(mem, k, 0) or 0) for k in MEMORY_FIELDS}
    report["peak_estimate_bytes"] = report["argument_size_in_bytes"] + report["temp_size_in_bytes"]
    return report
