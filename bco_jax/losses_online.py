"""Losses for online training (sample -> judge -> train) with on-policy baselines: GRPO and online DPO.

GRPO (Shao et al. 2024) samples K answers per prompt, judges each, and uses the group's mean reward as
the baseline; the loss is PPO's clipped surrogate on per-token log-probs. Online DPO (Guo et al. 2024)
judges the K answers and trains DPO on the best and worst of each group. Both follow TRL 1.13.0
(`GRPOTrainer`, `trl.experimental.online_dpo`) and are tested against TRL's own code.

Same conventions as `losses.py`: pure `jax.numpy`, float32 whatever the input dtype, shape-suffixed
names (B = P * K answers, P prompts, K answers per prompt, T completion positions). Answers are laid
out prompt-major: the K answers of prompt p are rows p*K .. p*K + K-1. See docs/losses.md.
"""

import typing

import jax
import jax.numpy as jnp

from bco_jax.losses import dpo_loss

ScaleRewards = typing.Literal["group", "batch", "none"]
GrpoLossType = typing.Literal["grpo", "dapo", "dr_grpo", "bnpo"]
SCALE_REWARDS = typing.get_args(ScaleRewards)
GRPO_LOSS_TYPES = typing.get_args(GrpoLossType)
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


def _f32(x):
    return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------------------------
# GRPO: group-relative advantages and the clipped surrogate.
# ----------------------------------------------------------------------------------------------


def _nan_mean_std(x, axis):
    """TRL's nanmean and nanstd (unbiased, Bessel-corrected) over `axis`, NaN entries left out.

    Where fewer than two entries count, TRL's std is NaN (one entry) or 0 (K = 1); either way the
    advantage it feeds is 0 (reward - mean = 0), and 0 here keeps the NaN out of the graph.
    """
    valid = ~jnp.isnan(x)
    n = jnp.sum(valid, axis=axis, keepdims=True).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, x, 0.0), axis=axis, keepdims=True) / jnp.maximum(n, 1.0)
    sq = jnp.sum(jnp.where(valid, (x - mean) ** 2, 0.0), axis=axis, keepdims=True) / jnp.maximum(n, 1.0)
    std = jnp.where(n > 1, jnp.sqrt(sq * n / jnp.maximum(n - 1.0, 1.0)), 0.0)
    return mean, std


def group_advantages(rewards_B, group_size, *, scale_rewards="group"):
    """GRPO advantages, as TRL 1.13 `GRPOTrainer._generate_and_score_completions` computes them.

    `rewards_B`: one reward per answer, B = P * group_size, prompt-major (K consecutive answers per
    prompt). advantage = reward - mean of its group, then divided by (std + 1e-4) where std is the
    unbiased (Bessel, n - 1) standard deviation of its group ("group", TRL's default) or of the whole
    batch ("batch", PPO-Lite); "none" (Dr. GRPO) does not divide. True / False mean "group" / "none"
    as in TRL. A NaN reward is TRL's "unscorable" answer: left out of the group's mean and std, its
    advantage is 0. Not reproduced: TRL's multi_objective_aggregation="normalize_then_sum" (pass the
    already aggregated reward here). Returns advantages [B], float32, no gradient.
    """
    scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards: unknown {scale_rewards!r}; expected one of {SCALE_REWARDS}")
    rewards_B = jax.lax.stop_gradient(_f32(rewards_B))
    if group_size < 1 or rewards_B.shape[0] % group_size:
        raise ValueError(f"group_advantages: {rewards_B.shape[0]} rewards are not groups of {group_size}")
    rewards_PxK = rewards_B.reshape(-1, group_size)
    mean_Px1, std_Px1 = _nan_mean_std(rewards_PxK, axis=1)
    advantages_PxK = rewards_PxK - mean_Px1
    if scale_rewards == "group":
        advantages_PxK = advantages_PxK / (std_Px1 + STD_EPS)
    elif scale_rewards == "batch":
        advantages_PxK = advantages_PxK / (_nan_mean_std(rewards_B, axis=0)[1] + STD_EPS)
    advantages_B = advantages_PxK.reshape(-1)
    return jnp.nan_to_num(advantages_B, nan=0.0)


def _masked_mean(x_BxT, mask_BxT):
    return jnp.sum(jnp.where(mask_BxT, x_BxT, 0.0)) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


def _clip_metrics(ratio_BxT, advantages_Bx1, mask_BxT, epsilon_low, epsilon_high):
    """TRL's clip_ratio/* logs: fractions of real tokens whose surrogate is clipped. low_min and
    high_max are over per-sequence fractions (rows without tokens left out; NaN if there is none)."""
    low_BxT = (ratio_BxT < 1.0 - epsilon_low) & (advantages_Bx1 < 0)
    high_BxT = (ratio_BxT > 1.0 + epsilon_high) & (advantages_Bx1 > 0)
    tokens_B = jnp.sum(mask_BxT, axis=1)
    has_tokens_B = tokens_B > 0

    def per_row(x_BxT):
        return jnp.sum(jnp.where(mask_BxT, x_BxT, False), axis=1) / jnp.maximum(tokens_B, 1)

    nan = jnp.where(jnp.any(has_tokens_B), 0.0, jnp.nan)
    return {
        "clip_ratio/low_mean": _masked_mean(low_BxT, mask_BxT),
        "clip_ratio/high_mean": _masked_mean(high_BxT, mask_BxT),
        "clip_ratio/region_mean": _masked_mean(low_BxT | high_BxT, mask_BxT),
        "clip_ratio/low_min": jnp.min(jnp.where(has_tokens_B, per_row(low_BxT), jnp.inf)) + nan,
        "clip_ratio/high_max": jnp.max(jnp.where(has_tokens_B, per_row(high_BxT), -jnp.inf)) + nan,
    }


def grpo_loss(logps_BxT, old_logps_BxT, ref_logps_BxT, advantages_B, mask_BxT, *, beta=0.0,
              epsilon_low=0.2, epsilon_high=None, loss_type="dapo", max_completion_length=None,
              use_bias_correction_kl=True, num_items_in_batch=None):
    """GRPO's clipped surrogate with an optional KL penalty, as TRL 1.13 `GRPOTrainer._compute_loss`.

    Per token: ratio = exp(logps - old_logps), loss = -min(ratio A, clip(ratio, 1 - eps_low,
    1 + eps_high) A), plus beta * k3 with k3 = exp(ref - logps) - (ref - logps) - 1 when beta != 0.
    `use_bias_correction_kl` (TRL's default, True) multiplies k3 by the ratio: its value is unchanged
    on-policy but its gradient is not (the unbiased reverse-KL gradient, DeepSeek-V3.2).

    `old_logps_BxT` None means one optimisation step per sampling round: old = stop_gradient(logps),
    ratio == 1 in value while the gradient still flows through `logps`. `old_logps` and `ref_logps`
    are detached. `ref_logps_BxT` may be None when beta == 0; `beta`, the epsilons and `loss_type` are
    static (Python numbers and strings). `mask_BxT` marks real completion tokens; padding may hold
    anything (even -inf / NaN): it is selected away, never multiplied.

    Aggregation over real tokens, for one global batch (`loss_type`, default "dapo" as TRL's):
      grpo    mean over sequences of (sum of the sequence's token losses / its token count);
      bnpo    sum over all tokens / number of tokens in this batch;
      dapo    sum over all tokens / `num_items_in_batch` (default: number of tokens in this batch,
              which equals bnpo; pass the whole step's count when summing micro-batch losses, as TRL
              normalises by the tokens of the global accumulated batch);
      dr_grpo sum over all tokens / (B * max_completion_length) (required).

    Not reproduced (off by default in TRL): importance_sampling_level="sequence" (GSPO), two-sided
    clipping `delta`, the vLLM importance-sampling correction, the off-policy sequence mask,
    top_entropy_quantile, the entropy bonus and MoE aux loss, the cispo/sapo/luspo/vespo losses, and
    TRL's division by the gradient-accumulation steps (this is the loss of the whole batch).

    Returns (loss, metrics): a float32 scalar and float32 scalars named as TRL logs them: "kl" (mean
    over real tokens of the KL term as added, beta != 0 only) and "clip_ratio/{low_mean, high_mean,
    region_mean, low_min, high_max}". TRL's "entropy" needs the logits and is not here.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_loss: unknown loss_type {loss_type!r}; expected one of {GRPO_LOSS_TYPES}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("grpo_loss: loss_type='dr_grpo' needs max_completion_length")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask_BxT = jnp.asarray(mask_BxT).astype(bool)
    # Zero the padding before any exp, so that its gradient is 0, not 0 * inf.
    logps_BxT = jnp.where(mask_BxT, _f32(logps_BxT), 0.0)
    old_BxT = logps_BxT if old_logps_BxT is None else jnp.where(mask_BxT, _f32(old_logps_BxT), 0.0)
    old_BxT = jax.lax.stop_gradient(old_BxT)
    advantages_Bx1 = jax.lax.stop_gradient(_f32(advantages_B))[:, None]

    ratio_BxT = jnp.exp(logps_BxT - old_BxT)
    clipped_BxT = jnp.clip(ratio_BxT, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss_BxT = -jnp.minimum(ratio_BxT * advantages_Bx1, clipped_BxT * advantages_Bx1)
    metrics = {}
    if beta != 0.0:
        if ref_logps_BxT is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_logps_BxT")
        ref_BxT = jax.lax.stop_gradient(jnp.where(mask_BxT, _f32(ref_logps_BxT), 0.0))
        kl_BxT = jnp.exp(ref_BxT - logps_BxT) - (ref_BxT - logps_BxT) - 1.0
        if use_bias_correction_kl:
            kl_BxT = kl_BxT * ratio_BxT
        loss_BxT = loss_BxT + beta * kl_BxT
        metrics["kl"] = _masked_mean(kl_BxT, mask_BxT)

    loss_BxT = jnp.where(mask_BxT, loss_BxT, 0.0)
    if loss_type == "grpo":
        tokens_B = jnp.sum(mask_BxT, axis=1).astype(jnp.float32)
        loss = jnp.mean(jnp.sum(loss_BxT, axis=1) / jnp.maximum(tokens_B, 1.0))
    elif loss_type == "dr_grpo":
        loss = jnp.sum(loss_BxT) / (loss_BxT.shape[0] * max_completion_length)
    else:
        count = jnp.sum(mask_BxT) if loss_type == "bnpo" or num_items_in_batch is None else num_items_in_batch
        loss = jnp.sum(loss_BxT) / jnp.maximum(_f32(count), 1.0)
    metrics.update(_clip_metrics(ratio_BxT, advantages_Bx1, mask_BxT, epsilon_low, epsilon_high))
    return loss, jax.tree.map(lambda m: jax.lax.stop_gradient(_f32(m)), metrics)


# ----------------------------------------------------------------------------------------------
# Online DPO: the best and the worst of each group as a DPO pair.
# ----------------------------------------------------------------------------------------------


def best_worst_pairs(scores_PxK):
    """Per prompt, the index of its best-scored answer (chosen) and of its worst (rejected).

    Ties go to the lowest index, deterministically. A NaN score (unscorable) is never picked. valid is
    False where the group has no pair to learn from: every scorable answer has the same score (or
    fewer than two are scorable). Returns (chosen_idx_P int32, rejected_idx_P int32, valid_P bool).
    """
    scores_PxK = jax.lax.stop_gradient(_f32(scores_PxK))
    unscorable = jnp.isnan(scores_PxK)
    high_PxK = jnp.where(unscorable, -jnp.inf, scores_PxK)
    low_PxK = jnp.where(unscorable, jnp.inf, scores_PxK)
    chosen_P = jnp.argmax(high_PxK, axis=1).astype(jnp.int32)  # argmax / argmin: the first occurrence
    rejected_P = jnp.argmin(low_PxK, axis=1).astype(jnp.int32)
    return chosen_P, rejected_P, jnp.max(high_PxK, axis=1) > jnp.min(low_PxK, axis=1)


def online_dpo_loss(policy_logps_PxK, reference_logps_PxK, scores_PxK, *, beta=0.1, label_smoothing=0.0):
    """`dpo_loss` on each prompt's best-worst pair (`best_worst_pairs`), averaged over valid pairs.

    Inputs are sequence log-probs (sums over each answer's tokens) and judge scores, one per answer.
    TRL's OnlineDPOTrainer (K = 2 only) trains on a tied pair too, the first answer as chosen; here
    a tie is no pair (valid False) and adds nothing. Returns (loss, metrics): the mean loss over
    valid pairs (0 if none) and TRL's rewards/{chosen, rejected, margins, accuracies} over them, with
    "pairs/valid_fraction".
    """
    chosen_P, rejected_P, valid_P = best_worst_pairs(scores_PxK)

    def pick(x_PxK, idx_P):
        return jnp.take_along_axis(_f32(x_PxK), idx_P[:, None], axis=1)[:, 0]

    losses_P, chosen_rewards_P, rejected_rewards_P = dpo_loss(
        pick(policy_logps_PxK, chosen_P), pick(policy_logps_PxK, rejected_P),
        pick(reference_logps_PxK, chosen_P), pick(reference_logps_PxK, rejected_P),
        beta=beta, label_smoothing=label_smoothing)

    def mean(x_P):
        return jnp.sum(jnp.where(valid_P, x_P, 0.0)) / jnp.maximum(jnp.sum(valid_P), 1)

    margins_P = jax.lax.stop_gradient(chosen_rewards_P - rejected_rewards_P)
    metrics = {
        "rewards/chosen": mean(jax.lax.stop_gradient(chosen_rewards_P)),
        "rewards/rejected": mean(jax.lax.stop_gradient(rejected_rewards_P)),
        "rewards/margins": mean(margins_P),
        "rewards/accuracies": mean((margins_P > 0).astype(jnp.float32)),
        "pairs/valid_fraction": jnp.mean(valid_P.astype(jnp.float32)),
    }
    return mean(losses_P), metrics
