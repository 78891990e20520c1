"""The pure train step: accumulation invariance, TRL's per-micro-batch delta, skipped non-finite steps,
precomputed = live reference, paired losses, the schedule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bco_jax import losses as L
from bco_jax.config import LossOptions, OptimOptions
from bco_jax.data.batch import Batch, BatchShape, Sequences
from bco_jax.models import Decoder, ModelConfig, sequence_logps
from bco_jax.step import eval_step, init_state, learning_rate_schedule, make_optimizer, train_step

CFG = ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
B, T = 8, 12


@pytest.fixture(scope="module")
def models():
    policy = Decoder(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32)
    graphdef, params = nnx.split(policy)
    params = nnx.to_pure_dict(params)
    # The reference differs from the policy, so rewards are not all zero at step 0.
    ref = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape), params)
    return graphdef, params, ref


def sequences(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CFG.vocab_size, (B, T)).astype(np.int32)
    lengths = rng.integers(6, T + 1, B)
    am = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    lm = am * (np.arange(T)[None] >= 4)
    return Sequences(input_ids=ids, attention_mask=am, loss_mask=lm.astype(np.int32))


def make_batch(seed, *, paired=False, pad_rows=0):
    example_mask = np.arange(B) < B - pad_rows
    if paired:
        return Batch(example_mask=example_mask, chosen=sequences(seed), rejected=sequences(seed + 100))
    labels = np.random.default_rng(seed).random(B) < 0.5
    labels[:2] = [True, False]
    return Batch(example_mask=example_mask, main=sequences(seed), labels=labels)


def split(batch, a):
    return jax.tree.map(lambda v: jnp.asarray(v).reshape(a, B // a, *v.shape[1:]), batch)


def seq_args(seqs, rows=slice(None)):
    return [jnp.asarray(x[rows]) for x in (seqs.input_ids, seqs.attention_mask, seqs.loss_mask)]


OPTIMIZER, SCHEDULE = make_optimizer(OptimOptions(learning_rate=1e-3, warmup_ratio=0.0), 10, decay_mask=None)


@functools.cache
def jitted_step(graphdef, cfg):
    # One compiled step per (model, loss config) for the whole module: compiling dominates test time.
    return jax.jit(functools.partial(train_step, graphdefs=(graphdef, graphdef), cfg=cfg,
                                     optimizer=OPTIMIZER, schedule=SCHEDULE))


BCO = LossOptions()


def run(models, batches, *, accumulation=1, cfg=BCO, shift_mode="ema", precomputed=None):
    graphdef, params, ref = models
    state = init_state(params, OPTIMIZER, L.reward_shift_init(shift_mode, 0.5), 0)
    step = jitted_step(graphdef, cfg)
    history = []
    for batch in batches:
        if precomputed is not None:
            batch = batch.replace(reference_logps=precomputed(batch))
        state, metrics = step(state, None if precomputed is not None else ref, split(batch, accumulation))
        history.append(jax.device_get(metrics))
    return state, history


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)


def test_accumulation_does_not_change_the_update_or_delta(models):
    batches = [make_batch(s, pad_rows=1 if s == 2 else 0) for s in range(3)]
    whole, h1 = run(models, batches, accumulation=1)
    split4, h4 = run(models, batches, accumulation=4)
    # Adam divides by sqrt(v): a gradient entry near 0 turns float32 summation-order noise into an
    # update of up to ~lr. 3 steps at lr 1e-3 move a weight by <= 3e-3; allow 0.2% of that.
    assert_trees_close(whole.params, split4.params, rtol=1e-5, atol=6e-6)
    assert_trees_close(whole.reward_shift, split4.reward_shift)
    for a, b in zip(h1, h4):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["delta"], b["delta"], rtol=1e-5, atol=1e-7)
        assert a["count/chosen"] + a["count/rejected"] == b["count/chosen"] + b["count/rejected"]
    # delta moved, and the padding row of the last batch was not counted.
    assert float(L.reward_shift_delta(whole.reward_shift)) != 0.0
    assert h1[2]["count/chosen"] + h1[2]["count/rejected"] == B - 1


def test_completion_capacity_changes_no_number(models):
    # Scored tokens are positions 4 .. 11 of 12: a capacity of 8 runs the LM head on 8 positions per row.
    graphdef, params, ref = models
    batch = split(make_batch(7, pad_rows=1), 2)
    step = jitted_step(graphdef, BCO)  # the shape is pytree metadata: one compilation per shape
    state = init_state(params, OPTIMIZER, L.reward_shift_init("ema", 0.5), 0)
    full, m_full = step(state, ref, batch.replace(shape=BatchShape(None)))
    slim, m_slim = step(state, ref, batch.replace(shape=BatchShape(8)))
    for key in ("loss", "grad_norm", "rewards_sum/chosen", "logps_sum/rejected"):
        np.testing.assert_allclose(m_slim[key], m_full[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert_trees_close(slim.params, full.params, rtol=1e-5, atol=1e-6)


def test_trl_mode_moves_delta_per_micro_batch_like_trl(models):
    graphdef, params, ref = models
    batch = make_batch(7)
    _, hist = run(models, [batch], accumulation=2, shift_mode="trl")
    # Re-derive TRL's order by hand: update with micro-batch 1, loss; update with micro-batch 2, loss.
    model, ref_model = nnx.merge(graphdef, params), nnx.merge(graphdef, ref)
    shift = L.reward_shift_init("trl")
    total, deltas = 0.0, []
    for mb in range(2):
        rows = slice(mb * B // 2, (mb + 1) * B // 2)
        args = seq_args(batch.main, rows)
        pol, ref_lp = sequence_logps(model, *args)[0], sequence_logps(ref_model, *args)[0]
        shift = L.reward_shift_update(shift, 0.1 * (pol - ref_lp), batch.labels[rows])
        deltas.append(float(L.reward_shift_delta(shift)))
        total += float(jnp.sum(L.bco_loss(pol, ref_lp, batch.labels[rows],
                                          L.reward_shift_delta(shift))[0]))
    np.testing.assert_allclose(hist[0]["loss"], total / B, rtol=1e-5)
    # TRL logs the mean of its micro-batches' deltas.
    np.testing.assert_allclose(hist[0]["delta"], np.mean(deltas), rtol=1e-5)
    assert deltas[0] != deltas[1]


def test_precomputed_reference_equals_live_reference(models):
    graphdef, _, ref = models
    ref_model = nnx.merge(graphdef, ref)

    def precompute(batch):  # [E, 1]: one column, the main sequences'
        return sequence_logps(ref_model, *seq_args(batch.main))[0][:, None]

    batches = [make_batch(s) for s in range(2)]
    live, h_live = run(models, batches, cfg=LossOptions())
    pre, h_pre = run(models, batches, precomputed=precompute)
    assert_trees_close(live.params, pre.params)
    for a, b in zip(h_live, h_pre):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)


def test_nonfinite_step_is_skipped_and_counted(models):
    graphdef, params, _ = models
    def bad(batch):
        return np.full((B, 1), np.nan, np.float32)
    state, hist = run(models, [make_batch(0)], precomputed=bad)
    assert hist[0]["skipped"] == 1
    assert int(state.nonfinite_in_row) == 1 and int(state.skipped_steps) == 1 and int(state.step) == 1
    assert_trees_close(state.params, params, rtol=0, atol=0)
    assert float(L.reward_shift_delta(state.reward_shift)) == 0.0


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "nca"])
def test_paired_losses_train_and_match_the_loss_function(models, loss_type):
    graphdef, params, ref = models
    batch = make_batch(3, paired=True)
    _, hist = run(models, [batch], cfg=LossOptions(loss_type=loss_type), accumulation=2)
    model, ref_model = nnx.merge(graphdef, params), nnx.merge(graphdef, ref)
    lp = {}
    for side in ("chosen", "rejected"):
        args = seq_args(getattr(batch, side))
        (p, n), r = sequence_logps(model, *args), sequence_logps(ref_model, *args)[0]
        if loss_type == "ipo":
            p, r = p / n, r / n
        lp[side] = (p, r)
    fn = {"dpo": L.dpo_loss, "ipo": L.ipo_loss, "nca": L.nca_loss}[loss_type]
    want = fn(lp["chosen"][0], lp["rejected"][0], lp["chosen"][1], lp["rejected"][1])[0]
    np.testing.assert_allclose(hist[0]["loss"], float(jnp.mean(want)), rtol=1e-5)
    assert hist[0]["count/chosen"] == B and hist[0]["count/rejected"] == B


def test_kto_step_uses_mismatched_kl_pairs(models):
    batch = make_batch(4)
    kl = sequences(40)
    _, hist = run(models, [batch.replace(kl=kl)], cfg=LossOptions(loss_type="kto"))
    # TRL's KTO by hand in float64: z0 = max(mean over rows of the KL pairs' log-ratio, 0), then
    # 1 - sigmoid(beta (r - z0)) for thumbs-up and 1 - sigmoid(beta (z0 - r)) for thumbs-down.
    graphdef, params, ref = models
    model, ref_model = nnx.merge(graphdef, params), nnx.merge(graphdef, ref)

    def logratio(seqs):
        args = seq_args(seqs)
        return np.float64(sequence_logps(model, *args)[0]) - np.float64(sequence_logps(ref_model, *args)[0])

    z0 = max(float(np.mean(logratio(kl))), 0.0)
    r, up = logratio(batch.main), batch.labels
    def sigmoid(x):
        return 1 / (1 + np.exp(-x))
    losses = np.where(up, 1 - sigmoid(0.1 * (r - z0)), 1 - sigmoid(0.1 * (z0 - r)))
    np.testing.assert_allclose(hist[0]["delta"], z0, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(hist[0]["loss"], losses.mean(), rtol=1e-5)


def test_eval_step_does_not_move_trl_running_mean(models):
    graphdef, params, ref = models
    shift = L.reward_shift_update(L.reward_shift_init("trl"), jnp.array([0.3]), jnp.array([True]))
    batch = jax.tree.map(jnp.asarray, make_batch(5))
    out = eval_step(params, ref, batch, shift, graphdefs=(graphdef, graphdef), cfg=LossOptions())
    # The loss used the state's delta (0.3) as it was, not one moved by this batch's rewards.
    args = seq_args(batch.main)
    pol = sequence_logps(nnx.merge(graphdef, params), *args)[0]
    ref_lp = sequence_logps(nnx.merge(graphdef, ref), *args)[0]
    want = jnp.sum(L.bco_loss(pol, ref_lp, batch.labels, 0.3)[0])
    np.testing.assert_allclose(out["loss_sum"], want, rtol=1e-5)


def test_schedule_matches_transformers_linear_warmup():
    sched = learning_rate_schedule(1.0, total_steps=10, warmup_ratio=0.2, kind="linear")
    # transformers: lr_lambda(s) = s / warmup for s < warmup, then (total - s) / (total - warmup).
    want = [s / 2 if s < 2 else (10 - s) / 8 for s in range(10)]
    np.testing.assert_allclose([float(sched(s)) for s in range(10)], want, rtol=1e-6)
    cos = learning_rate_schedule(1.0, 10, 0.0, "cosine")
    assert float(cos(0)) == pytest.approx(1.0) and float(cos(5)) == pytest.approx(0.5)
    assert float(learning_rate_schedule(2.0, 10, 0.1, "constant_with_warmup")(7)) == pytest.approx(2.0)
    assert float(learning_rate_schedule(2.0, 10, 0.5, "constant_with_warmup")(0)) == 0.0
    assert float(learning_rate_schedule(2.0, 10, 0.5, "constant")(0)) == pytest.approx(2.0)  # no warmup


@pytest.mark.parametrize("loss_type, beta", [("grpo", 0.0), ("dapo", 0.04)])
def test_grpo_step_is_grpo_loss_over_the_whole_step_at_any_accumulation(models, loss_type, beta):
    # The step's loss and gradient are `losses_online.grpo_loss` on the whole batch's per-token log-probs
    # (TRL's aggregation over the step, checked against TRL itself in test_losses_online.py), also with
    # the batch cut into 2 micro-batches; a padding row counts for nothing.
    from bco_jax import losses_online as LO
    from bco_jax.models.logprobs import token_logps

    graphdef, params, ref = models
    cfg = LossOptions(loss_type=loss_type, beta=beta)
    advantages = np.random.default_rng(3).normal(size=B).astype(np.float32)
    batch = make_batch(5, pad_rows=1).replace(weights=advantages)

    def direct(p):
        args = seq_args(batch.main)
        logps, w, _ = token_logps(nnx.merge(graphdef, p), *args)
        ref_lp = token_logps(nnx.merge(graphdef, ref), *args)[0]
        mask = (w > 0) & batch.example_mask[:, None]
        keep = batch.example_mask
        return LO.grpo_loss(logps[keep], None, ref_lp[keep], advantages[keep], mask[keep], beta=beta,
                            loss_type=loss_type)[0]

    expected, grads = jax.value_and_grad(direct)(params)
    optimizer = optax.sgd(1.0)  # the update is minus the gradient
    for a in (1, 2) if loss_type == "dapo" else (2,):  # grpo: its per-answer means summed over micro-batches
        step = jax.jit(functools.partial(train_step, graphdefs=(graphdef, graphdef), cfg=cfg, optimizer=optimizer,
                                         schedule=SCHEDULE))
        state = init_state(params, optimizer, L.reward_shift_init("ema", 0.5), 0)
        new, metrics = step(state, ref, split(batch, a))
        np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5, err_msg=f"accumulation {a}")
        moved = jax.tree.map(lambda old, n: old - n, params, new.params)
        assert_trees_close(moved, grads, rtol=2e-4, atol=1e-7)


def test_fixed_shift_at_zero_trains_as_bce_and_elsewhere_shifts_every_reward(models):
    """reward_shift=fixed through the jitted step: at 0 the update is BCE's bit for bit; at 0.3 the loss
    is the BCO loss of the step's rewards around 0.3 (float64 by hand), and delta never moves."""
    graphdef, params, ref = models
    batches = [make_batch(s) for s in (3, 4)]
    bce_state, bce_hist = run(models, batches, cfg=LossOptions(loss_type="bce"), shift_mode="none")
    zero_state, zero_hist = run(models, batches, shift_mode="fixed")  # value 0.0
    for a, b in zip(jax.tree.leaves(bce_state.params), jax.tree.leaves(zero_state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [h["loss"] for h in bce_hist] == [h["loss"] for h in zero_hist]

    state = init_state(params, OPTIMIZER, L.reward_shift_init("fixed", value=0.3), 0)
    state, metrics = jitted_step(graphdef, BCO)(state, ref, split(batches[0], 1))
    args = seq_args(batches[0].main)
    pol = np.asarray(sequence_logps(nnx.merge(graphdef, params), *args)[0], np.float64)
    ref_lp = np.asarray(sequence_logps(nnx.merge(graphdef, ref), *args)[0], np.float64)
    logits = 0.1 * (pol - ref_lp) - 0.3
    y = np.asarray(batches[0].labels)
    expected = np.mean(np.where(y, np.logaddexp(0, -logits), np.logaddexp(0, logits)))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert float(metrics["delta"]) == np.float32(0.3)
    assert float(L.reward_shift_delta(state.reward_shift)) == np.float32(0.3)
