"""GRPO and online DPO (issue 21) against float64 NumPy written here and against TRL 1.13's own code.

TRL is run, not copied: `GRPOTrainer._compute_loss` and `OnlineDPOTrainer.training_step` are called
unbound on a minimal object holding the attributes they read (set from a real GRPOConfig /
OnlineDPOConfig, as the trainers' __init__ sets them), with the model forward replaced by fixed
per-token log-probs that require grad; the advantage lines of
`GRPOTrainer._generate_and_score_completions` (which cannot be called without generating) are cut
from TRL's installed source and executed.
"""

import collections
import inspect
import textwrap
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bco_jax import losses as L
from bco_jax import losses_online as O

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")
online_dpo = pytest.importorskip("trl.experimental.online_dpo")

P, K, T = 3, 4, 7
B = P * K
LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
MAX_COMPLETION_LENGTH = 512  # GRPOConfig's default, used by dr_grpo on both sides


# ---------------------------------------------------------------- float64 NumPy references


def np_group_advantages(rewards, k, scale):
    """TRL's recipe in float64: NaN = unscorable (left out), unbiased std, + 1e-4, NaN advantages -> 0."""
    r = np.asarray(rewards, np.float64)
    g = r.reshape(-1, k)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups and single answers: NaN, as TRL's
        mean = np.repeat(np.nanmean(g, axis=1), k)
        group_std = np.repeat(np.nanstd(g, axis=1, ddof=1), k)
        batch_std = np.nanstd(r, ddof=1)
        adv = r - mean
        if scale == "group":
            adv = adv / (group_std + 1e-4)
        elif scale == "batch":
            adv = adv / (batch_std + 1e-4)
    return np.nan_to_num(adv, nan=0.0)


def np_grpo(logps, old, ref, adv, mask, *, beta, eps_low=0.2, eps_high=0.2, loss_type, bias_kl=True):
    """Loss, analytic gradient w.r.t. logps, and TRL's metrics, in float64."""
    l = np.asarray(logps, np.float64)
    o = l if old is None else np.asarray(old, np.float64)
    m = np.asarray(mask, bool)
    a = np.asarray(adv, np.float64)[:, None]
    ratio = np.exp(l - o)
    per = -np.minimum(ratio * a, np.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
    low = (ratio < 1 - eps_low) & (a < 0)
    high = (ratio > 1 + eps_high) & (a > 0)
    grad = np.where(low | high, 0.0, -a * ratio)  # d ratio / d logps = ratio (also when old = logps)
    metrics = {}
    if beta:
        d = np.asarray(ref, np.float64) - l
        kl, dkl = np.exp(d) - d - 1, 1 - np.exp(d)
        if bias_kl:  # d(kl ratio) / d logps = dkl ratio + kl ratio
            kl, dkl = kl * ratio, (dkl + kl) * ratio
        per, grad = per + beta * kl, grad + beta * dkl
        metrics["kl"] = kl[m].mean()
    n_b = m.sum(1)
    if loss_type == "grpo":
        w = np.broadcast_to(1 / (len(l) * np.maximum(n_b, 1))[:, None], l.shape)
    elif loss_type == "dr_grpo":
        w = np.full(l.shape, 1 / (len(l) * MAX_COMPLETION_LENGTH))
    else:
        w = np.full(l.shape, 1 / max(m.sum(), 1))
    loss = np.sum(np.where(m, per * w, 0.0))
    grad = np.where(m, grad * w, 0.0)
    rows = n_b > 0

    def row_frac(x):
        return (x & m).sum(1)[rows] / n_b[rows]

    metrics.update({
        "clip_ratio/low_mean": low[m].mean(), "clip_ratio/high_mean": high[m].mean(),
        "clip_ratio/region_mean": (low | high)[m].mean(),
        "clip_ratio/low_min": row_frac(low).min(), "clip_ratio/high_max": row_frac(high).max(),
    })
    return loss, grad, metrics


def grpo_batch(seed, *, padding=0.0):
    """Per-token log-probs [B, T] with ratios well outside [0.8, 1.2], ragged masks (one row fully
    padded, one full), advantages from a group of judged answers. `padding`: the value at padded
    positions; None = random finite values (TRL multiplies by the mask, so it needs finite padding)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, B)
    lengths[1], lengths[2] = 0, T
    mask = np.arange(T)[None, :] < lengths[:, None]
    logps = -rng.exponential(1.5, (B, T))
    old = logps + rng.normal(0, 0.35, (B, T))
    ref = logps + rng.normal(0, 0.5, (B, T))
    adv = np_group_advantages(rng.normal(size=B), K, "group")

    def pad(x):
        return np.where(mask, x, padding if padding is not None else rng.normal(size=x.shape)).astype(np.float32)

    return pad(logps), pad(old), pad(ref), adv.astype(np.float32), mask


def ours(logps, old, ref, adv, mask, **kw):
    (loss, metrics), grad = jax.value_and_grad(O.grpo_loss, has_aux=True)(
        jnp.asarray(logps), old, ref, adv, mask, max_completion_length=MAX_COMPLETION_LENGTH, **kw)
    return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------- TRL, run


def trl_advantages(rewards, k, scale):
    """The `sum_then_normalize` advantage lines of TRL's _generate_and_score_completions, executed."""
    src = inspect.getsource(grpo_trainer.GRPOTrainer._generate_and_score_completions)
    first = src.index("mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)")
    last = src.index("is_std_zero = torch.isclose(std_rewards", first)
    block = textwrap.dedent(src[src.rindex("\n", 0, first) + 1:src.index("\n", last)])
    assert "advantages = torch.nan_to_num(advantages, nan=0.0)" in src[last:]  # applied below, as TRL does
    scope = {"rewards": torch.tensor(rewards, dtype=torch.float32), "num_generations": k,
             "self": types.SimpleNamespace(scale_rewards=scale)}
    exec(block, {"torch": torch, "nanstd": trl_utils.nanstd}, scope)
    return torch.nan_to_num(scope["advantages"], nan=0.0).numpy()


@pytest.fixture(scope="module")
def grpo_args(tmp_path_factory):
    with warnings.catch_warnings():  # transformers 5 on GRPOConfig's own gradient_checkpointing default
        warnings.simplefilter("ignore", FutureWarning)
        return trl.GRPOConfig(output_dir=str(tmp_path_factory.mktemp("grpo")), report_to=[], bf16=False,
                              use_cpu=True)


def trl_grpo(args, logps, old, ref, adv, mask, *, beta, loss_type):
    """TRL's GRPOTrainer._compute_loss on these per-token log-probs: (loss, grad, last metrics)."""
    logps_t = torch.tensor(logps, requires_grad=True)
    metrics = {"train": collections.defaultdict(list)}
    trainer = types.SimpleNamespace(  # what GRPOTrainer.__init__ sets from `args`, for a dense model
        args=args, beta=beta, loss_type=loss_type, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        max_completion_length=args.max_completion_length, importance_sampling_level=args.importance_sampling_level,
        off_policy_mask_threshold=args.off_policy_mask_threshold, top_entropy_quantile=args.top_entropy_quantile,
        use_vllm=args.use_vllm, vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        _entropy_bonus_enabled=args.entropy_coef != 0.0 or args.use_adaptive_entropy, aux_loss_enabled=False,
        current_gradient_accumulation_steps=args.gradient_accumulation_steps, _metrics=metrics,
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps_t, torch.zeros(logps.shape), None),
    )
    mask_t = torch.tensor(mask, dtype=torch.int64)
    ids = torch.zeros((B, T), dtype=torch.int64)
    inputs = {"prompt_ids": ids[:, :2], "prompt_mask": torch.ones_like(ids[:, :2]), "completion_ids": ids,
              "completion_mask": mask_t,
              "advantages": torch.tensor(adv), "ref_per_token_logps": torch.tensor(ref),
              "num_items_in_batch": mask_t.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = torch.tensor(old)
    loss = grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss.item(), logps_t.grad.numpy(), {k: v[-1] for k, v in metrics["train"].items() if k != "entropy"}


# ---------------------------------------------------------------- group advantages


def advantage_cases():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(5, 4)).astype(np.float32)
    r[1] = 0.5  # all agree: advantage 0
    r[2] = [1.0, 0.0, 0.0, 1.0]  # a verifier's 0/1
    r[3, 1] = np.nan  # one unscorable answer
    r[4, :3] = np.nan  # one scorable answer left
    return [(r.reshape(-1), 4), (rng.normal(size=6).astype(np.float32), 1), (rng.normal(size=8).astype(np.float32), 8)]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("case", range(3))
def test_group_advantages_match_numpy_and_trl(scale, case):
    rewards, k = advantage_cases()[case]
    got = np.asarray(O.group_advantages(rewards, k, scale_rewards=scale))
    np.testing.assert_allclose(got, np_group_advantages(rewards, k, scale), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, trl_advantages(rewards, k, scale), rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(got))


def test_group_advantages_options():
    rewards, k = advantage_cases()[0]
    np.testing.assert_array_equal(O.group_advantages(rewards, k, scale_rewards=True), O.group_advantages(rewards, k))
    np.testing.assert_array_equal(O.group_advantages(rewards, k, scale_rewards=False),
                                  O.group_advantages(rewards, k, scale_rewards="none"))
    with pytest.raises(ValueError, match="scale_rewards"):
        O.group_advantages(rewards, k, scale_rewards="std")
    with pytest.raises(ValueError, match="groups of 3"):
        O.group_advantages(rewards, 3)


# ---------------------------------------------------------------- the GRPO loss


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("on_policy", [False, True])
def test_grpo_loss_matches_numpy_and_trl(grpo_args, loss_type, beta, on_policy):
    logps, old, ref, adv, mask = grpo_batch(1, padding=None)
    old = None if on_policy else old
    loss, grad, metrics = ours(logps, old, ref, adv, mask, beta=beta, loss_type=loss_type)
    want_loss, want_grad, want_metrics = np_grpo(logps, old, ref, adv, mask, beta=beta, loss_type=loss_type)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-8)
    assert metrics.keys() == want_metrics.keys()
    for k, v in want_metrics.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    if not on_policy:  # clipping is exercised on both sides
        assert metrics["clip_ratio/low_mean"] > 0.1 and metrics["clip_ratio/high_mean"] > 0.1

    trl_loss, trl_grad, trl_metrics = trl_grpo(grpo_args, logps, old, ref, adv, mask, beta=beta, loss_type=loss_type)
    np.testing.assert_allclose(loss, trl_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-5, atol=1e-8)
    assert metrics.keys() == trl_metrics.keys()
    for k, v in trl_metrics.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-7, err_msg=k)


def test_grpo_analytic_gradient_matches_finite_differences():
    logps, old, ref, adv, mask = grpo_batch(2)
    h = 1e-6
    for loss_type in ("grpo", "dapo"):
        def f(x):
            return np_grpo(x, old, ref, adv, mask, beta=0.04, loss_type=loss_type)[0]

        _, grad, _ = np_grpo(logps, old, ref, adv, mask, beta=0.04, loss_type=loss_type)
        fd = np.zeros_like(grad)
        base = logps.astype(np.float64)
        for i, j in zip(*np.nonzero(mask)):
            e = np.zeros_like(base)
            e[i, j] = h
            fd[i, j] = (f(base + e) - f(base - e)) / (2 * h)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


def test_grpo_padding_is_selected_away_and_jit_agrees():
    clean = grpo_batch(3, padding=0.0)
    logps, old, ref, adv, mask = clean
    dirty = [np.where(mask, x, np.float32(v)) for x, v in zip((logps, old, ref), (-np.inf, np.nan, np.inf))]
    loss, grad, metrics = ours(*clean, beta=0.04, loss_type="grpo")
    dirty_loss, dirty_grad, _ = ours(*dirty, adv, mask, beta=0.04, loss_type="grpo")
    assert loss == dirty_loss and np.array_equal(grad, dirty_grad) and np.all(np.isfinite(grad))
    jitted = jax.jit(O.grpo_loss, static_argnames=("beta", "loss_type"))
    np.testing.assert_allclose(jitted(*clean, beta=0.04, loss_type="grpo")[0], loss, rtol=1e-6)
    assert jitted(*clean, beta=0.04, loss_type="grpo")[0].dtype == jnp.float32


def test_dapo_micro_batches_sum_to_the_global_batch():
    logps, old, ref, adv, mask = grpo_batch(4)
    whole, grad, _ = ours(logps, old, ref, adv, mask, beta=0.04, loss_type="dapo")
    n = int(mask.sum())
    parts = [ours(logps[s], old[s], ref[s], adv[s], mask[s], beta=0.04, loss_type="dapo", num_items_in_batch=n)
             for s in (slice(0, 5), slice(5, B))]
    np.testing.assert_allclose(sum(p[0] for p in parts), whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), grad, rtol=1e-6, atol=1e-9)


def test_grpo_loss_arguments():
    logps, old, ref, adv, mask = grpo_batch(5)
    loss, metrics = O.grpo_loss(logps, old, None, adv, mask)  # beta 0: no reference needed
    assert "kl" not in metrics and np.isfinite(loss)
    with pytest.raises(ValueError, match="ref_logps"):
        O.grpo_loss(logps, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        O.grpo_loss(logps, old, ref, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        O.grpo_loss(logps, old, ref, adv, mask, loss_type="cispo")
    # epsilon_high widens only the upper clip (DAPO's clip-higher)
    _, wide = O.grpo_loss(logps, old, ref, adv, mask, epsilon_high=0.5)
    assert wide["clip_ratio/high_mean"] < metrics["clip_ratio/high_mean"]
    assert wide["clip_ratio/low_mean"] == metrics["clip_ratio/low_mean"]


# ---------------------------------------------------------------- online DPO


def test_best_worst_pairs_hand_made():
    scores = np.array([[0.1, 0.9, 0.5, 0.2],
                       [1.0, 1.0, 0.0, 0.0],  # ties at both ends: lowest index
                       [0.3, 0.3, 0.3, 0.3],  # all agree: no pair
                       [np.nan, 2.0, np.nan, 1.0],  # unscorable answers are never picked
                       [np.nan, 2.0, np.nan, np.nan]], np.float32)  # one scorable answer: no pair
    chosen, rejected, valid = O.best_worst_pairs(scores)
    np.testing.assert_array_equal(chosen, [1, 0, 0, 1, 1])
    np.testing.assert_array_equal(rejected, [0, 2, 0, 3, 1])
    np.testing.assert_array_equal(valid, [True, True, False, True, False])
    assert chosen.dtype == jnp.int32 and valid.dtype == jnp.bool_


def test_online_dpo_loss_matches_numpy():
    rng = np.random.default_rng(6)
    policy, reference = rng.normal(-40, 10, (2, 5, 4))
    scores = rng.normal(size=(5, 4)).astype(np.float32)
    scores[2] = 1.0  # one prompt without a pair
    chosen, rejected, valid = (np.asarray(x) for x in O.best_worst_pairs(scores))
    rows = np.arange(5)
    h = 0.1 * ((policy[rows, chosen] - reference[rows, chosen]) - (policy[rows, rejected] - reference[rows, rejected]))
    for eps in (0.0, 0.1):
        want = ((1 - eps) * np.logaddexp(0, -h) + eps * np.logaddexp(0, h))[valid].mean()
        loss, metrics = O.online_dpo_loss(policy, reference, scores, beta=0.1, label_smoothing=eps)
        np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["pairs/valid_fraction"], 0.8)
    loss, metrics = O.online_dpo_loss(policy, reference, np.ones((5, 4)))
    assert loss == 0.0 and metrics["pairs/valid_fraction"] == 0.0


def trl_online_dpo(policy_2PxT, reference_2PxT, mask_2PxT, rewards_2P, beta):
    """TRL's OnlineDPOTrainer.training_step with K = 2 fixed completions: (loss, grad, stats).
    TRL lays the 2P completions out answer-major: all first answers, then all second answers."""
    n = len(rewards_2P) // 2
    logps_t = torch.tensor(policy_2PxT, requires_grad=True)
    model, ref_model = torch.nn.Module(), torch.nn.Module()
    completion_ids = torch.ones(policy_2PxT.shape, dtype=torch.int64)
    generated = (torch.ones((2 * n, 2), dtype=torch.int64), torch.ones((2 * n, 2), dtype=torch.int64),
                 completion_ids, torch.tensor(mask_2PxT, dtype=torch.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = online_dpo.OnlineDPOConfig(output_dir="unused", report_to=[], bf16=False, use_cpu=True, beta=beta)
    trainer = types.SimpleNamespace(
        args=args, beta=args.beta, ref_model=ref_model, reward_funcs=[None], stats=collections.defaultdict(list),
        _generate=lambda model, prompts, images=None: generated,
        _forward=lambda m, *a: logps_t if m is model else torch.tensor(reference_2PxT),
        _tokenizer=types.SimpleNamespace(eos_token_id=0),
        processing_class=types.SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: ["a"] * len(ids)),
        _calculate_rewards_from_functions=lambda **kw: torch.tensor(rewards_2P),
        accelerator=types.SimpleNamespace(gather_for_metrics=lambda t: t, backward=lambda loss, **kw: loss.backward()),
        state=types.SimpleNamespace(global_step=0),
    )
    loss = online_dpo.OnlineDPOTrainer.training_step(trainer, model, {"prompt": ["q"] * n})
    return loss.item(), logps_t.grad.numpy(), {k: v[-1] for k, v in trainer.stats.items()}


def test_online_dpo_matches_trl_for_two_answers():
    rng = np.random.default_rng(7)
    n = 6
    lengths = rng.integers(1, T + 1, 2 * n)
    mask = np.arange(T)[None, :] < lengths[:, None]
    policy = np.where(mask, -rng.exponential(1.5, (2 * n, T)), rng.normal(size=(2 * n, T))).astype(np.float32)
    reference = (policy + rng.normal(0, 0.5, policy.shape)).astype(np.float32)
    rewards = rng.permutation(2 * n).astype(np.float32)  # no ties: TRL keeps tied pairs, we drop them
    trl_loss, trl_grad, stats = trl_online_dpo(policy, reference, mask, rewards, beta=0.1)

    def to_PxK(x_2P):  # answer-major -> prompt-major
        return x_2P.reshape(2, n).T

    def loss_fn(seq_2P):
        return O.online_dpo_loss(to_PxK(seq_2P), to_PxK(np.where(mask, reference, 0).sum(1)), to_PxK(rewards),
                                 beta=0.1)

    (loss, metrics), seq_grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(np.where(mask, policy, 0).sum(1)))
    np.testing.assert_allclose(loss, trl_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(seq_grad)[:, None] * mask, trl_grad, rtol=1e-5, atol=1e-8)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        np.testing.assert_allclose(metrics[k], stats[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # and our pair is TRL's: the higher-rewarded of the two answers, dpo_loss on it
    chosen, rejected, valid = O.best_worst_pairs(to_PxK(rewards))
    assert np.all(valid) and np.array_equal(chosen, to_PxK(rewards).argmax(1))
    assert O.dpo_loss is L.dpo_loss  # the pair's loss is the existing one, not a second copy
