"""The losses against float64 NumPy written here, the paper's theorems as properties, the gradients
in closed form, and the reward-shift state against TRL's own RunningMoments."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bco_jax import losses as L

B = 16  # every property test uses this shape: one compilation per dtype, not one per example
EPS32 = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------- float64 NumPy references


def np_softplus(x):
    x = np.asarray(x, np.float64)
    return np.logaddexp(0.0, x)


def np_bco(p, r, y, delta, beta, w):
    z = beta * (p - r) - delta
    return w * np.where(y, np_softplus(-z), np_softplus(z)), beta * (p - r)


def np_dpo(pw, pl, rw, rl, beta, eps):
    h = beta * (pw - rw) - beta * (pl - rl)
    return (1 - eps) * np_softplus(-h) + eps * np_softplus(h)


def np_ipo(pw, pl, rw, rl, beta):
    return (((pw - rw) - (pl - rl)) - 1 / (2 * beta)) ** 2


def np_nca(pw, pl, rw, rl, beta):
    cw, cl = beta * (pw - rw), beta * (pl - rl)
    return np_softplus(-cw) + 0.5 * np_softplus(cw) + 0.5 * np_softplus(cl)


def np_kto(p, r, y, kl, beta, wd, wu):
    lr = p - r
    def sig(x):
        return 1 / (1 + np.exp(-x))
    return np.where(y, wd * (1 - sig(beta * (lr - kl))), wu * (1 - sig(beta * (kl - lr))))


def rand(seed, n=B, scale=30.0):
    rng = np.random.default_rng(seed)
    return [rng.normal(-50, scale, n) for _ in range(4)] + [rng.random(n) < 0.5, rng.random(n) + 0.5]


# ---------------------------------------------------------------- each loss vs float64 NumPy


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_losses_match_float64_numpy(seed, beta):
    pw, pl, rw, rl, y, w = rand(seed)
    delta = 0.37
    got, rew = L.bco_loss(pw, rw, y, delta, beta=beta, weights=w)
    want, want_rew = np_bco(pw, rw, y, delta, beta, w)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(rew, want_rew, rtol=2e-5, atol=1e-5)

    for eps in (0.0, 0.1):
        got, c, r = L.dpo_loss(pw, pl, rw, rl, beta=beta, label_smoothing=eps)
        np.testing.assert_allclose(got, np_dpo(pw, pl, rw, rl, beta, eps), rtol=2e-5, atol=1e-5)
        np.testing.assert_allclose(c, beta * (pw - rw), rtol=2e-5, atol=1e-5)
        np.testing.assert_allclose(r, beta * (pl - rl), rtol=2e-5, atol=1e-5)
    got, _, _ = L.ipo_loss(pw, pl, rw, rl, beta=beta)
    np.testing.assert_allclose(got, np_ipo(pw, pl, rw, rl, beta), rtol=1e-4)
    got, _, _ = L.nca_loss(pw, pl, rw, rl, beta=beta)
    np.testing.assert_allclose(got, np_nca(pw, pl, rw, rl, beta), rtol=2e-5, atol=1e-5)
    kl = 0.8
    got, rew = L.kto_loss(pw, rw, y, kl, beta=beta, desirable_weight=1.3, undesirable_weight=0.7)
    np.testing.assert_allclose(got, np_kto(pw, rw, y, kl, beta, 1.3, 0.7), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(rew, beta * (pw - rw), rtol=2e-5, atol=1e-5)


def test_bce_is_bco_with_zero_delta_and_weights_default_to_one():
    pw, _, rw, _, y, _ = rand(3)
    a, _ = L.bco_loss(pw, rw, y, 0.0)
    b, _ = L.bco_loss(pw, rw, y, 0.0, weights=np.ones(B))
    want, _ = np_bco(pw, rw, y, 0.0, 0.1, 1.0)
    np.testing.assert_allclose(a, want, rtol=2e-5)
    np.testing.assert_array_equal(a, b)


def test_kto_kl_is_detached_clamped_masked_mean():
    p = jnp.array([1.0, 2.0, 30.0])
    r = jnp.array([0.0, 0.0, 0.0])
    assert float(L.kto_kl(p, r, mask=jnp.array([1, 1, 0]))) == pytest.approx(1.5)
    assert float(L.kto_kl(-p, r)) == 0.0
    assert float(jax.grad(lambda x: L.kto_kl(x, r))(p).sum()) == 0.0


def test_paired_losses_without_smoothing_reject_it():
    x = jnp.zeros(2)
    for fn in (L.ipo_loss, L.nca_loss):
        with pytest.raises(ValueError, match="label_smoothing"):
            fn(x, x, x, x, label_smoothing=0.1)


def test_losses_compute_in_float32_for_bfloat16_inputs_and_vmap():
    pw, pl, rw, rl, y, _ = rand(4)
    def bf(a):
        return jnp.asarray(a, jnp.bfloat16)
    out, rew = jax.jit(L.bco_loss)(bf(pw), bf(rw), y, 0.1)
    assert out.dtype == jnp.float32 and rew.dtype == jnp.float32
    def up(a):
        return np.asarray(bf(a), np.float64)
    np.testing.assert_allclose(out, np_bco(up(pw), up(rw), y, 0.1, 0.1, 1.0)[0], rtol=2e-5, atol=1e-5)
    for fn in (L.dpo_loss, L.ipo_loss, L.nca_loss):
        assert fn(bf(pw), bf(pl), bf(rw), bf(rl))[0].dtype == jnp.float32
    per_example = jax.vmap(lambda p, r, l: L.bco_loss(p, r, l, 0.1)[0])(pw, rw, y)
    np.testing.assert_allclose(per_example, L.bco_loss(pw, rw, y, 0.1)[0], rtol=1e-6)


# ---------------------------------------------------------------- Theorems 3 and 4 as properties

# Rewards from 1e-30 to 1e4 in magnitude (tiny ones near 0, large ones near the float32 exp limits).
# We feed rewards directly (beta = 1, reference = 0), so the only rounding is float32's inside the
# losses. Each softplus term is evaluated with relative error of a few eps and the difference
# h = r_w - r_l is rounded once (error <= eps |h|, and softplus is 1-Lipschitz), so sum and DPO loss
# can each be off by ~4 eps (|r_w| + |r_l| + |delta| + 1): that is the tolerance. For bfloat16
# inputs the bound is about the bfloat16-rounded rewards, which the losses upcast exactly, so the
# same float32 tolerance applies.
magnitudes = st.one_of(
    st.floats(-1e4, 1e4, width=32),
    st.floats(-2.0**-10, 2.0**-10, width=32),
    st.sampled_from([0.0, 1e-30, -1e-30, 1e4, -1e4, 88.0, -88.0, 104.0, -104.0]),
)
reward_arrays = hnp.arrays(np.float32, (B,), elements=magnitudes)


def _bound_terms(rw, rl, delta, dtype):
    rw, rl, delta = (jnp.asarray(a, dtype) for a in (rw, rl, delta))
    ones_, zeros_ = jnp.ones(B, bool), jnp.zeros(B, bool)
    up, _ = L.bco_loss(rw, jnp.zeros(B, dtype), ones_, delta, beta=1.0)
    down, _ = L.bco_loss(rl, jnp.zeros(B, dtype), zeros_, delta, beta=1.0)
    dpo, _, _ = L.dpo_loss(rw, rl, jnp.zeros(B, dtype), jnp.zeros(B, dtype), beta=1.0)
    return up, down, dpo


bound_terms = jax.jit(_bound_terms, static_argnums=3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@given(rw=reward_arrays, rl=reward_arrays, delta=reward_arrays)
def test_bco_bounds_dpo_for_any_delta(dtype, rw, rl, delta):
    up, down, dpo = (np.asarray(a, np.float64) for a in bound_terms(rw, rl, delta, dtype))
    assert np.all(np.isfinite(up)) and np.all(np.isfinite(down)) and np.all(np.isfinite(dpo))
    x = [np.asarray(jnp.asarray(a, dtype), np.float64) for a in (rw, rl, delta)]
    tol = 4 * EPS32 * (np.abs(x[0]) + np.abs(x[1]) + np.abs(x[2]) + 1)
    assert np.all(up + down >= dpo - tol)

    # The gap has the closed form of the paper (float64 reference on the same rounded rewards).
    w, l, d = x
    want_gap = np.logaddexp.reduce(np.stack([np.zeros_like(w), -(w - d), l - d, -(w - l)]), axis=0) - \
        np_softplus(-(w - l))
    assert np.all(np.abs((up + down - dpo) - want_gap) <= 2 * tol + 1e-5 * np.abs(want_gap))


@given(rw=hnp.arrays(np.float32, (B,), elements=st.floats(-1e3, 1e3, width=32)),
       rl=hnp.arrays(np.float32, (B,), elements=st.floats(-1e3, 1e3, width=32)),
       offset=st.floats(1e-2, 50.0))
def test_gap_is_smallest_at_the_midpoint(rw, rl, offset):
    mid = (rw.astype(np.float64) + rl) / 2

    def gap(delta):
        up, down, dpo = bound_terms(rw, rl, delta.astype(np.float32), jnp.float32)
        return np.asarray(up, np.float64) + np.asarray(down) - np.asarray(dpo)

    at_mid = gap(mid)
    w, l = rw.astype(np.float64), rl.astype(np.float64)
    tol = 8 * EPS32 * (np.abs(w) + np.abs(l) + 1)
    for shifted in (mid + offset, mid - offset):
        assert np.all(gap(shifted) >= at_mid - tol)


# ---------------------------------------------------------------- gradients in closed form


@pytest.mark.parametrize("with_weights", [False, True])
def test_bco_gradient_closed_form(with_weights):
    pw, _, rw, _, y, w = rand(5, scale=3.0)
    beta, delta = 0.1, -0.4
    w = w if with_weights else None

    def total(p):
        return jnp.sum(L.bco_loss(p, rw, y, delta, beta=beta, weights=w)[0])

    grad = np.asarray(jax.grad(total)(jnp.asarray(pw, jnp.float32)), np.float64)
    z = beta * (pw - rw) - delta
    def sig(x):
        return 1 / (1 + np.exp(-x))
    want = np.where(y, -beta * sig(-z), beta * sig(z)) * (1.0 if w is None else w)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-9)
    # delta is state: no gradient flows into it.
    assert float(jax.grad(lambda d: jnp.sum(L.bco_loss(pw, rw, y, d)[0]))(0.3)) == 0.0


def test_no_nan_in_gradients_at_extremes():
    x = jnp.array([1e4, -1e4, 0.0, 3e38, -3e38, 1e-30], jnp.float32)
    y = jnp.array([True, False, True, False, True, False])
    g = jax.grad(lambda p: jnp.sum(L.bco_loss(p, jnp.zeros_like(p), y, 0.0, beta=1.0)[0]))(x)
    assert np.all(np.isfinite(g))
    g = jax.grad(lambda p: jnp.sum(L.dpo_loss(p, -p, 0 * p, 0 * p, beta=1.0)[0]))(x)
    assert np.all(np.isfinite(g))


# ---------------------------------------------------------------- reward shift


def test_reward_shift_ema_tracks_class_mean_midpoint():
    rng = np.random.default_rng(0)
    state = L.reward_shift_init("ema", decay=0.9)
    up_means, down_means = 0.0, 0.0
    update = jax.jit(L.reward_shift_update)
    for step in range(200):
        labels = rng.random(B) < 0.3
        if step % 7 == 3:
            labels[:] = False  # a batch with no thumbs-up keeps the thumbs-up mean
        rewards = np.where(labels, 2.0, -1.0) + rng.normal(0, 0.5, B)
        state = update(state, rewards, labels)
        if labels.any():
            up_means = 0.9 * up_means + 0.1 * rewards[labels].mean()
        down_means = 0.9 * down_means + 0.1 * rewards[~labels].mean()
        np.testing.assert_allclose(L.reward_shift_delta(state), (up_means + down_means) / 2, rtol=1e-5)
    # The class means converge to the true means (2, -1): delta to their midpoint 0.5.
    assert abs(float(L.reward_shift_delta(state)) - 0.5) < 0.15


def np_corrected_midpoint(batches, decay):
    """float64: per class the EMA from 0 over the batches where the class is present, divided by
    1 - decay^t (t = those batches so far); delta = the midpoint of the two (a class never seen: 0)."""
    ema, steps = np.zeros(2), np.zeros(2)
    for rewards, labels in batches:
        for k, members in enumerate((~labels, labels)):
            if members.any():
                ema[k] = decay * ema[k] + (1 - decay) * np.mean(np.asarray(rewards, np.float64)[members])
                steps[k] += 1
    means = np.where(steps > 0, ema / np.where(steps > 0, 1 - decay ** steps, 1.0), 0.0)
    return means, steps, means.mean()


def test_reward_shift_ema_corrected_is_the_bias_corrected_midpoint():
    """Hand-made batches, one without thumbs-up, one without thumbs-down, against float64 NumPy."""
    batches = [([0.5, -1.0, 2.0, -3.0], [1, 0, 1, 0]), ([-2.0, -0.25], [0, 0]), ([1.0, 3.5, -1.5], [1, 1, 0]),
               ([4.0], [1]), ([0.75, -2.5, 1.25, -0.5], [1, 0, 1, 0])]
    batches = [(np.array(r, np.float32), np.array(y, bool)) for r, y in batches]
    state, update = L.reward_shift_init("ema_corrected", decay=0.8), jax.jit(L.reward_shift_update)
    for i, (rewards, labels) in enumerate(batches):
        state = update(state, rewards, labels)
        means, steps, delta = np_corrected_midpoint(batches[: i + 1], 0.8)
        np.testing.assert_allclose(state.class_means, means, rtol=1e-6)
        np.testing.assert_array_equal(state.class_steps, steps)  # an absent class keeps its count
        np.testing.assert_allclose(float(L.reward_shift_delta(state)), delta, rtol=1e-6)
    # Not the uncorrected EMA's midpoint (which starts near 0 and takes ~1 / (1 - decay) steps to warm up).
    ema = L.reward_shift_init("ema", decay=0.8)
    for rewards, labels in batches:
        ema = L.reward_shift_update(ema, rewards, labels)
    assert abs(float(L.reward_shift_delta(ema)) - delta) > 0.1


def test_reward_shift_ema_corrected_first_update_is_the_batch_mean_exactly():
    """The point of the correction: a class's first update gives its batch mean, bit for bit (the plain
    EMA gives (1 - decay) times it), also for a class first seen later than the other."""
    state = L.reward_shift_init("ema_corrected", decay=0.99)
    state = L.reward_shift_update(state, jnp.array([1.5, 2.25]), jnp.array([1, 1]))  # thumbs-up only
    assert state.class_means.tolist() == [0.0, 1.875] and state.class_steps.tolist() == [0, 1]
    state = L.reward_shift_update(state, jnp.array([-0.75, 9.0, -1.25]), jnp.array([0, 1, 0]))
    assert float(state.class_means[0]) == -1.0  # thumbs-down's first batch mean
    assert state.class_steps.tolist() == [1, 2]
    plain = L.reward_shift_update(L.reward_shift_init("ema", 0.99), jnp.array([1.5, 2.25]), jnp.array([1, 1]))
    assert float(plain.class_means[1]) == pytest.approx(0.01 * 1.875)


def test_reward_shift_fixed_is_the_constant_and_bco_uses_it():
    rng = np.random.default_rng(3)
    state = L.reward_shift_init("fixed", value=-0.35)
    for _ in range(3):
        state = L.reward_shift_update(state, rng.normal(size=B).astype(np.float32), rng.random(B) < 0.5)
        assert float(L.reward_shift_delta(state)) == np.float32(-0.35)
    assert float(jax.jit(L.reward_shift_delta)(state)) == np.float32(-0.35)
    np.testing.assert_array_equal(state.class_means, [0.0, 0.0])  # nothing moves but the counts
    pw, rw = rng.normal(-40, 5, B), rng.normal(-40, 5, B)
    y = rng.random(B) < 0.5
    got, _ = L.bco_loss(pw, rw, y, L.reward_shift_delta(state), beta=0.1)
    want, _ = np_bco(pw, rw, y, np.float64(np.float32(-0.35)), 0.1, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(L.reward_shift_delta(L.reward_shift_init("fixed"))) == 0.0  # default: BCE


def test_reward_shift_states_survive_a_checkpoint_and_old_ones_restore(tmp_path):
    """ema_corrected's step counts are checkpointed; the other modes keep the four arrays they had
    before class_steps existed, so a checkpoint written then restores into today's state."""
    from bco_jax.checkpoint import Checkpointer

    corrected = L.reward_shift_update(L.reward_shift_init("ema_corrected", 0.9), jnp.array([1.0, -2.0, 3.0]),
                                      jnp.array([1, 0, 1]))
    assert len(jax.tree.leaves(L.reward_shift_init("ema"))) == 4
    before = {"class_means": jnp.array([0.5, -0.5]), "class_counts": jnp.array([3.0, 4.0]),
              "mean": jnp.float32(0.0), "count": jnp.float32(1e-24)}  # the previous version's tree
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, {"reward_shift": before})
        ckpt.save(2, {"reward_shift": corrected})
        old, _ = ckpt.restore(1, {"reward_shift": L.reward_shift_init("ema")})
        new, _ = ckpt.restore(2, {"reward_shift": L.reward_shift_init("ema_corrected", 0.9)})
    assert old["reward_shift"].class_means.tolist() == [0.5, -0.5] and old["reward_shift"].mode == "ema"
    for x, y in zip(jax.tree.leaves(new["reward_shift"]), jax.tree.leaves(corrected), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    assert new["reward_shift"].class_steps.tolist() == [1, 1]


def test_reward_shift_mask_changes_nothing_and_none_mode_is_zero():
    r = jnp.array([1.0, 2.0, jnp.nan, 100.0])
    y = jnp.array([True, False, True, False])
    m = jnp.array([True, True, False, False])
    for mode in ("ema", "ema_corrected", "trl"):
        s0 = L.reward_shift_init(mode)
        a = L.reward_shift_update(s0, r, y, m)
        b = L.reward_shift_update(s0, r[:2], y[:2])
        for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, z)
        assert np.isfinite(float(L.reward_shift_delta(a)))
        assert float(L.reward_shift_delta(a)) != 0.0
        all_masked = L.reward_shift_update(s0, r, y, jnp.zeros(4, bool))
        assert float(L.reward_shift_delta(all_masked)) == 0.0
    s = L.reward_shift_update(L.reward_shift_init("none"), r[:2], y[:2])
    assert float(L.reward_shift_delta(s)) == 0.0
    np.testing.assert_array_equal(s.class_counts, [1, 1])


def test_reward_shift_trl_mode_reproduces_trl_running_moments():
    """Against TRL 1.13.0's own RunningMoments class and a float64 re-derivation of its arithmetic."""
    import torch
    from trl.experimental.bco.bco_trainer import RunningMoments

    trl_running = RunningMoments(accelerator=types.SimpleNamespace(use_distributed=False))
    mean64, count64 = 0.0, 1e-24
    state = L.reward_shift_init("trl")
    rng = np.random.default_rng(1)
    update = jax.jit(L.reward_shift_update)
    for step in range(50):
        n = int(rng.integers(1, 9))
        rewards = rng.normal(0.2 * step, 1.0, n).astype(np.float32)
        labels = rng.random(n) < 0.5
        trl_running.update(torch.tensor(rewards))
        tot = count64 + n
        mean64 += (rewards.astype(np.float64).mean() - mean64) * n / tot
        count64 = tot
        state = update(state, rewards, labels)
        np.testing.assert_allclose(float(L.reward_shift_delta(state)), trl_running.mean, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(trl_running.mean, mean64, rtol=2e-5, atol=1e-6)
    assert float(state.count) == pytest.approx(trl_running.count)


def test_reward_shift_state_is_a_pytree_that_round_trips():
    s = L.reward_shift_update(L.reward_shift_init("ema", 0.95), jnp.array([1.0, -3.0]), jnp.array([1, 0]))
    leaves, treedef = jax.tree.flatten(s)
    assert len(leaves) == 4
    back = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
    assert back.mode == "ema" and back.decay == 0.95
    assert float(L.reward_shift_delta(back)) == float(L.reward_shift_delta(s))
    # The mode is static: jit specialises on it, and delta comes out right under jit.
    assert float(jax.jit(L.reward_shift_delta)(s)) == pytest.approx(0.5 * (0.05 * 1.0 + 0.05 * -3.0))


def test_reward_shift_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown mode"):
        L.reward_shift_init("median")
    with pytest.raises(ValueError, match="reward_shift_decay"):
        L.reward_shift_init("ema", decay=1.0)
    with pytest.raises(ValueError, match="reward_shift_decay"):
        L.reward_shift_init("ema_corrected", decay=-0.1)
