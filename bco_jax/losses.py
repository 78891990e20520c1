"""Preference losses on sequence log-probabilities, and the BCO reward-shift state.

Everything here is pure `jax.numpy`: jit-able, vmap-able, differentiable, computed in float32 whatever
the input dtype, and written with softplus so that no finite input gives NaN or inf
(`-log sigmoid(x) == softplus(-x)`, never `log(sigmoid(x))`).

Inputs are per-example sequence log-probabilities: sums of token log-probs over the completion.
Labels are booleans (or 0/1): True = thumbs-up (desirable, "chosen"), False = thumbs-down.

References: BCO, Jung et al. 2024 (arXiv 2404.04656); DPO, Rafailov et al. 2023; conservative DPO,
Mitchell 2023; IPO, Azar et al. 2023; KTO, Ethayarajh et al. 2024; NCA, Chen et al. 2024.
See docs/losses.md for the math.
"""

import dataclasses
import typing

import jax
import jax.numpy as jnp

LossType = typing.Literal["bco", "bce", "dpo", "ipo", "nca", "kto", "grpo", "dapo"]
RewardShiftMode = typing.Literal["ema", "ema_corrected", "trl", "fixed", "none"]
REWARD_SHIFT_MODES = typing.get_args(RewardShiftMode)
DEFAULT_REWARD_SHIFT_DECAY = 0.99


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _bool(labels):
    return jnp.asarray(labels).astype(bool)


def _weights(weights, like):
    return jnp.ones_like(like) if weights is None else _f32(weights)


# ----------------------------------------------------------------------------------------------
# Unpaired losses: one example, one label.
# ----------------------------------------------------------------------------------------------


def implicit_reward(policy_logps, reference_logps, beta):
    """r = beta * (log pi(y|x) - log pi_ref(y|x)), float32: the logit every loss here is built on."""
    return beta * (_f32(policy_logps) - _f32(reference_logps))


def bco_loss(policy_logps, reference_logps, labels, delta, *, beta=0.1, weights=None):
    """Binary Classifier Optimization: BCE on the implicit reward, shifted by `delta`.

    rewards = beta * (policy_logps - reference_logps); thumbs-up: -w log sigmoid(r - delta),
    thumbs-down: -w log sigmoid(-(r - delta)). `delta` is state, not a function of this batch, so no
    gradient flows into it. BCE (the paper's ablation) is `delta = 0`.

    Returns (losses [B], rewards [B]), both float32.
    """
    rewards = implicit_reward(policy_logps, reference_logps, beta)
    margin = rewards - jax.lax.stop_gradient(_f32(delta))
    losses = jnp.where(_bool(labels), jax.nn.softplus(-margin), jax.nn.softplus(margin))
    return _weights(weights, losses) * losses, rewards


def kto_kl(policy_kl_logps, reference_kl_logps, mask=None):
    """KTO's reference point z0: the detached batch mean of policy - reference log-probs on
    mismatched (prompt, completion) pairs, clamped at zero (in log-ratio units, not times beta)."""
    logratios = _f32(policy_kl_logps) - _f32(reference_kl_logps)
    mask = jnp.ones_like(logratios) if mask is None else _f32(mask)
    kl = jnp.sum(logratios * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_loss(policy_logps, reference_logps, labels, kl, *, beta=0.1, desirable_weight=1.0,
             undesirable_weight=1.0):
    """KTO as in TRL: thumbs-up 1 - sigmoid(beta (logratio - kl)), thumbs-down
    1 - sigmoid(beta (kl - logratio)), each class scaled by its weight.

    `kl` is the reference point from `kto_kl` (detached here again). Returns (losses [B], rewards [B])
    with rewards = beta * logratio.
    """
    logratios = _f32(policy_logps) - _f32(reference_logps)
    kl = jax.lax.stop_gradient(_f32(kl))
    up = _bool(labels)
    # 1 - sigmoid(x) == sigmoid(-x): exact and free of cancellation.
    losses = jnp.where(
        up,
        desirable_weight * jax.nn.sigmoid(-beta * (logratios - kl)),
        undesirable_weight * jax.nn.sigmoid(-beta * (kl - logratios)),
    )
    return losses, beta * logratios


# ----------------------------------------------------------------------------------------------
# Paired losses: a chosen and a rejected completion for the same prompt.
# ----------------------------------------------------------------------------------------------


def _pair_rewards(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  reference_rejected_logps, beta):
    return (implicit_reward(policy_chosen_logps, reference_chosen_logps, beta),
            implicit_reward(policy_rejected_logps, reference_rejected_logps, beta))


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, *, beta=0.1, label_smoothing=0.0):
    """DPO, and conservative DPO for label_smoothing = eps > 0:
    h = r_w - r_l, loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h).

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]).
    """
    chosen, rejected = _pair_rewards(policy_chosen_logps, policy_rejected_logps,
                                     reference_chosen_logps, reference_rejected_logps, beta)
    h = chosen - rejected
    losses = (1.0 - label_smoothing) * jax.nn.softplus(-h) + label_smoothing * jax.nn.softplus(h)
    return losses, chosen, rejected


def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, *, beta=0.1, label_smoothing=0.0):
    """IPO: (h / beta - 1 / (2 beta))^2 with h / beta the difference of log-ratios.

    TRL (and our trainer) feed IPO length-averaged log-probs. IPO has no label smoothing; the argument
    exists so that every paired loss takes the same arguments, and must be 0.
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]).
    """
    if label_smoothing:
        raise ValueError("ipo_loss: label_smoothing must be 0 (IPO has no label smoothing)")
    chosen, rejected = _pair_rewards(policy_chosen_logps, policy_rejected_logps,
                                     reference_chosen_logps, reference_rejected_logps, beta)
    logratio_margin = (_f32(policy_chosen_logps) - _f32(reference_chosen_logps)) - (
        _f32(policy_rejected_logps) - _f32(reference_rejected_logps))
    losses = (logratio_margin - 1.0 / (2.0 * beta)) ** 2
    return losses, chosen, rejected


def nca_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, *, beta=0.1, label_smoothing=0.0):
    """NCA, paired form: -log sigmoid(r_w) - 1/2 log sigmoid(-r_w) - 1/2 log sigmoid(-r_l).

    `label_smoothing` must be 0 (kept for a uniform paired-loss signature).
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]).
    """
    if label_smoothing:
        raise ValueError("nca_loss: label_smoothing must be 0 (NCA has no label smoothing)")
    chosen, rejected = _pair_rewards(policy_chosen_logps, policy_rejected_logps,
                                     reference_chosen_logps, reference_rejected_logps, beta)
    losses = (jax.nn.softplus(-chosen) + 0.5 * jax.nn.softplus(chosen)
              + 0.5 * jax.nn.softplus(rejected))
    return losses, chosen, rejected


# ----------------------------------------------------------------------------------------------
# The reward shift delta, as functional state.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RewardShiftState:
    """State of the reward shift. A pytree: it lives in the train state and is checkpointed.

    class_means[0] / [1]: moving averages of thumbs-down / thumbs-up rewards ("ema"; bias-corrected in
    "ema_corrected").
    class_counts[0] / [1]: examples of each class seen so far (all modes; for logging).
    mean, count: TRL's RunningMoments mean and count ("trl" mode; count starts at 1e-24 as TRL's).
    class_steps[0] / [1]: updates in which each class was present ("ema_corrected" only, int32; None and
    no pytree leaf in the other modes).
    mode, decay, value (the constant delta of "fixed" mode) are static: not arrays, not checkpointed.
    """

    class_means: jax.Array
    class_counts: jax.Array
    mean: jax.Array
    count: jax.Array
    class_steps: jax.Array | None = None
    mode: str = "ema"
    decay: float = DEFAULT_REWARD_SHIFT_DECAY
    value: float = 0.0


_SHIFT_ARRAYS = ("class_means", "class_counts", "mean", "count")  # every mode's arrays, in pytree order


def _shift_array_names(mode):
    # class_steps is a child in "ema_corrected" alone (decided by the static mode, as Orbax rebuilds trees
    # from None leaves): the other modes keep the tree, and so the checkpoint layout, they had before it
    # was added, and their older checkpoints still restore.
    return (*_SHIFT_ARRAYS, "class_steps") if mode == "ema_corrected" else _SHIFT_ARRAYS


def _shift_children(state):
    children = [(jax.tree_util.GetAttrKey(n), getattr(state, n)) for n in _shift_array_names(state.mode)]
    return children, (state.mode, state.decay, state.value)


def _shift_from_children(static, children):
    mode, decay, value = static
    return RewardShiftState(**dict(zip(_shift_array_names(mode), children)), mode=mode, decay=decay, value=value)


jax.tree_util.register_pytree_with_keys(RewardShiftState, _shift_children, _shift_from_children)


def reward_shift_init(mode="ema", decay=DEFAULT_REWARD_SHIFT_DECAY, value=0.0):
    """A fresh reward-shift state: delta = 0, where rewards start when the policy is the reference
    (in "fixed" mode delta = `value` throughout)."""
    if mode not in REWARD_SHIFT_MODES:
        raise ValueError(f"reward_shift: unknown mode {mode!r}; expected one of {REWARD_SHIFT_MODES}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"reward_shift_decay: must be in [0, 1), got {decay}")
    return RewardShiftState(
        class_means=jnp.zeros(2, jnp.float32),
        class_counts=jnp.zeros(2, jnp.float32),
        mean=jnp.zeros((), jnp.float32),
        count=jnp.full((), 1e-24, jnp.float32),
        class_steps=jnp.zeros(2, jnp.int32) if mode == "ema_corrected" else None,
        mode=mode,
        decay=float(decay),
        value=float(value),
    )


def reward_shift_delta(state):
    """The current delta (a float32 scalar)."""
    if state.mode in ("ema", "ema_corrected"):
        return 0.5 * (state.class_means[0] + state.class_means[1])
    if state.mode == "trl":
        return state.mean
    return jnp.full((), state.value if state.mode == "fixed" else 0.0, jnp.float32)


def reward_shift_update(state, rewards, labels, mask=None):
    """Fold a batch of rewards into the state. Rewards are detached; `mask` False rows are ignored.

    "ema": each class mean moves towards that class's batch mean by (1 - decay); a class absent from
    the batch keeps its mean (and, in "ema_corrected", its update count). "ema_corrected": the same EMA
    divided by Adam's bias correction 1 - decay^t. "trl": TRL's RunningMoments, the pooled cumulative
    mean of every reward seen. "none", "fixed": only the counts change. Reductions run over the whole (global) array, so
    under jit on a mesh delta is global over all devices and hosts.
    """
    rewards = jax.lax.stop_gradient(_f32(rewards))
    up = _bool(labels)
    mask = jnp.ones(rewards.shape, bool) if mask is None else _bool(mask)
    # Masked rows may hold garbage (even NaN from padding): select, never multiply.
    rewards = jnp.where(mask, rewards, 0.0)
    members = jnp.stack([mask & ~up, mask & up])  # [2, B]: thumbs-down, thumbs-up
    n_class = jnp.sum(members, axis=1).astype(jnp.float32)
    sum_class = jnp.sum(jnp.where(members, rewards[None, :], 0.0), axis=1)
    class_counts = state.class_counts + n_class
    class_means, mean, count, class_steps = state.class_means, state.mean, state.count, state.class_steps
    batch_means = sum_class / jnp.maximum(n_class, 1.0)

    if state.mode == "ema":
        moved = state.decay * class_means + (1.0 - state.decay) * batch_means
        class_means = jnp.where(n_class > 0, moved, class_means)
    elif state.mode == "ema_corrected":
        class_steps = class_steps + (n_class > 0).astype(jnp.int32)
        moved = class_means + _corrected_gain(state.decay, class_steps) * (batch_means - class_means)
        class_means = jnp.where(n_class > 0, moved, class_means)
    elif state.mode == "trl":
        # RunningMoments.update: mean += (batch_mean - mean) * n / (count + n); count += n.
        n = jnp.sum(n_class)
        batch_mean = jnp.sum(sum_class) / jnp.maximum(n, 1.0)
        total = count + n
        mean = jnp.where(n > 0, mean + (batch_mean - mean) * n / total, mean)
        count = total
    return dataclasses.replace(state, class_means=class_means, class_counts=class_counts,
                               mean=mean, count=count, class_steps=class_steps)


def _corrected_gain(decay, steps):
    """(1 - d) / (1 - d^t): the step towards the t-th batch mean that keeps a running mean equal to the
    EMA from 0 divided by Adam's bias correction 1 - d^t. It is 1 at t = 1, written out so that a
    class's first mean is its batch mean bit for bit on every backend (pow need not be exact);
    t = 0 (a class never seen) is never used."""
    d = jnp.float32(decay)
    return jnp.where(steps <= 1, 1.0, (1.0 - d) / (1.0 - d ** jnp.maximum(steps, 2)))


PAIRED_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "nca": nca_loss}  # the losses that read pairs
# GRPO (`losses_online.grpo_loss`), by its aggregation as TRL's GRPOConfig.loss_type names it: on the
# online loop's fresh answers only, with group-relative advantages instead of labels.
GRPO_LOSSES = ("grpo", "dapo")
