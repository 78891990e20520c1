"""Sequence packing changes no number: a packed row's per-example log-probs are each example's alone,
the pipeline's packed rows hold every example once where the device would hold it unpacked, the step
and a training run's first step give the same losses packed and unpacked, and so does evaluate."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_data_fixtures import make_tokenizer, unpaired_rows, write_jsonl
from train_fixtures import feedback_file, read_metrics, tiny_model_dir

from bco_jax import evaluate, train
from bco_jax import losses as L
from bco_jax.config import ConfigError, LossOptions, parse_args
from bco_jax.data import DataConfig, assemble, load_dataset
from bco_jax.data.packing import first_fit_decreasing, row_buckets
from bco_jax.models import Decoder, ModelConfig, example_logps, sequence_logps
from bco_jax.precompute import attach_tables
from bco_jax.step import eval_step

CFG = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)


@pytest.mark.parametrize("window", [None, 3])
def test_packed_row_logps_equal_each_example_alone(window):
    # window 3 < every example: Mistral's sliding window inside a packed row, as alone.
    model = Decoder(ModelConfig(**{**CFG.__dict__, "sliding_window": window}), rngs=nnx.Rngs(0), dtype=jnp.float32)
    rng = np.random.default_rng(0)
    rows = [[(7, 3), (5, 2), (9, 4)], [(11, 1), (6, 5)]]  # (length, prompt length) per segment
    T, E = 24, 5
    ids, seg, pos, loss = (np.zeros((2, T), np.int32) for _ in range(4))
    alone = [np.zeros((E, T), np.int32) for _ in range(3)]  # each example alone in its own row
    first, e = np.array([0, 3], np.int32), 0
    for r, row in enumerate(rows):
        t = 0
        for s, (n, p) in enumerate(row, start=1):
            x = rng.integers(3, CFG.vocab_size, n).astype(np.int32)
            ids[r, t:t + n], seg[r, t:t + n], pos[r, t:t + n], loss[r, t + p:t + n] = x, s, np.arange(n), 1
            alone[0][e, :n], alone[1][e, :n], alone[2][e, p:n] = x, 1, 1
            t, e = t + n, e + 1
    got, counts = jax.jit(lambda *a: example_logps(model, *a, E, completion_capacity=12))(
        ids, (seg > 0).astype(np.int32), loss, seg, pos, first)
    want, want_counts = jax.jit(lambda *a: sequence_logps(model, *a))(*alone)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(counts, want_counts)
    assert np.all(np.asarray(want_counts) > 0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [dict(r, completion=r["completion"] + " The sea is blue too." * (i % 5), prompt=r["prompt"] * (1 + i % 3))
            for i, r in enumerate(unpaired_rows(40))]
    path = write_jsonl(tmp_path_factory.mktemp("packing-data") / "rows.jsonl", rows)
    cfg = DataConfig(max_length=64, length_buckets=[16, 32, 64], kl_pairs=True, packing=True)
    return load_dataset([path], make_tokenizer(), cfg), cfg


def unpacked(cfg):
    return DataConfig(**{**cfg.__dict__, "packing": False})


def test_packed_batches_hold_each_example_once_where_its_device_would(data):
    data, cfg = data
    seqs = data.seqs["completion"]
    global_ids = np.concatenate([np.random.default_rng(0).permutation(40)[:14], [-1, -1]])
    P, A, D = 2, 2, 2  # processes x micro-batches x data devices per process: 8 groups of 2 examples
    parts = [assemble(data, cfg, global_ids, p, P, cfg.buckets(), A, D) for p in range(P)]
    plain = [assemble(data, unpacked(cfg), global_ids, p, P, cfg.buckets(), A, D) for p in range(P)]
    assert parts[0].main.input_ids.shape == parts[1].main.input_ids.shape  # every process agrees
    assert parts[0].shape == parts[1].shape
    rows, T = parts[0].main.input_ids.shape
    assert rows % (A * D) == 0 and rows // (A * D) in row_buckets(2) and T in cfg.buckets()

    def micro(batch, a):  # put_batch's layout: [A, rows / A] per process, processes concatenated
        return jax.tree.map(lambda *xs: np.concatenate([np.reshape(x, (A, -1, *x.shape[1:]))[a] for x in xs]), *batch)

    for a in range(A):
        mb, ref = micro(parts, a), micro(plain, a)
        # The micro-batch holds the examples it holds unpacked.
        assert sorted(mb.example_index.tolist()) == sorted(ref.example_index.tolist())
        seen, main = [], mb.main
        for r in range(len(main.input_ids)):
            for s in range(1, main.segment_ids[r].max() + 1):
                slot = main.row_first_example[r] + s - 1
                i = mb.example_index[slot]
                at = main.segment_ids[r] == s
                np.testing.assert_array_equal(main.input_ids[r][at], seqs.ids(i))
                np.testing.assert_array_equal(main.positions[r][at], np.arange(at.sum()))
                assert main.loss_mask[r][at].sum() == len(seqs.ids(i)) - seqs.prompt_lens[i]
                assert mb.labels[slot] == data.labels[i] and mb.example_mask[slot]
                # KTO's KL row of this example is its unpacked KL row.
                k = list(ref.example_index).index(i)
                np.testing.assert_array_equal(mb.kl.input_ids[slot], ref.kl.input_ids[k])
                seen.append(slot)
        assert sorted(seen) == np.flatnonzero(mb.example_mask).tolist()  # each real example once
    assert first_fit_decreasing(np.array([5, 9, 3, 4]), 10) == [[1], [0, 3], [2]]


def test_kto_eval_step_same_packed_and_unpacked(data):
    # KTO's KL rows stay padded and must follow the examples into their packed order.
    data, cfg = data
    graphdef, params = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32))
    params = nnx.to_pure_dict(params)
    ref = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
    shift = L.reward_shift_init("ema", 0.5)
    # The batch's static shape (LM-head capacities) is pytree metadata: one compilation per shape.
    fn = jax.jit(lambda p, r, b: eval_step(p, r, b, shift, graphdefs=(graphdef, graphdef),
                                           cfg=LossOptions(loss_type="kto")))
    out, shapes = {}, {}
    for packing in (True, False):
        batch = assemble(data, cfg if packing else unpacked(cfg), np.arange(10, 26), 0, 1, cfg.buckets())
        index = batch.example_index
        res = fn(params, ref, attach_tables(batch))
        out[packing] = (float(res["loss_sum"]), np.asarray(res["rewards"])[np.argsort(index)])
        shapes[packing] = batch.shape
    # unpacked: one capacity (the KL rows' is the main rows'); packed: a pair (KL rows stay padded)
    assert isinstance(shapes[False].capacity, int) and shapes[False].kl_capacity is None
    assert isinstance(shapes[True].capacity, int) and isinstance(shapes[True].kl_capacity, int)
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-5)
    np.testing.assert_allclose(out[True][1], out[False][1], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    return {"model": tiny_model_dir(root / "model"), "ref": tiny_model_dir(root / "ref", seed=1),
            "train": feedback_file(root / "train.jsonl", 64)}


def test_first_step_of_a_run_is_the_same_packed_and_unpacked(assets, tmp_path):
    # A reference unlike the policy (else the first loss is log 2 whatever the log-probs), several
    # devices and micro-batches (rows packed per device); packed, the reference log-probs are
    # precomputed by a packed pass, unpacked they are live.
    def first(out, *extra):
        train.fit(parse_args(["--model", assets["model"], "--ref_model", assets["ref"], "--train_data",
                              assets["train"], "--output_dir", str(tmp_path / out), "--batch_size", "16",
                              "--max_steps", "1", "--logging_steps", "1", "--max_length", "16",
                              "--length_buckets", "16", "--tensorboard", "false", "--export_hf", "false",
                              "--save_reference", "false", *extra]))
        return next(r for r in read_metrics(tmp_path / out) if "loss" in r)

    packed = first("packed", "--packing", "true", "--mesh", "2,1,1", "--gradient_accumulation_steps", "2",
                   "--precompute_ref_log_probs", "true")
    plain = first("plain")
    for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen", "count/chosen"):
        np.testing.assert_allclose(packed[key], plain[key], rtol=1e-5, err_msg=key)
    assert abs(plain["loss"] - np.log(2)) > 1e-4


def test_evaluate_reward_metrics_same_packed_and_unpacked(assets, tmp_path):
    reports = {}
    for packing in ("true", "false"):
        out = tmp_path / f"eval-{packing}.json"
        evaluate.run(evaluate.parse(["--model", assets["model"], "--ref_model", assets["ref"], "--data",
                                     assets["train"], "--num_samples", "1", "--max_new_tokens", "1",
                                     "--batch_size", "16", "--max_length", "16", "--packing", packing,
                                     "--output", str(out)]))
        reports[packing] = json.loads(out.read_text())
    for key in ("reward_accuracy", "reward_auc", "rewards/chosen", "rewards/rejected", "count/chosen"):
        np.testing.assert_allclose(reports["true"][key], reports["false"][key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("flags, says", [(["--loss_type", "dpo"], "dpo keeps one pair per row"),
                                         (["--attn_implementation", "cudnn"], "takes no segment ids")])
def test_packing_refuses_what_it_does_not_cover(flags, says):
    with pytest.raises(ConfigError, match=f"^packing: .*{says}"):
        parse_args(["--packing", "true", *flags])
