"""The grain pipeline: determinism, resume, per-process slices, buckets, mixing, oversampling, KL."""
import itertools
import json

import jax
import numpy as np
import pytest
from test_data_fixtures import make_tokenizer, unpaired_rows, write_jsonl

from bco_jax.data import BatchIterator, DataConfig, class_prompts, load_dataset, ordered_batches, prompt_batches


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    big = [dict(r, completion=r["completion"] + " The sea is blue too." * (i % 7)) for i, r in
           enumerate(unpaired_rows(37))]
    return {"big": write_jsonl(d / "big.jsonl", big),
            "small": write_jsonl(d / "small.jsonl", unpaired_rows(9, 100)),
            "pairs": write_jsonl(d / "pairs.jsonl", [
                {"prompt": f"Question {i}?", "chosen": " blue" * (1 + i % 3), "rejected": " green."}
                for i in range(11)])}


def data_for(specs, **kw):
    cfg = DataConfig(**{"max_length": 256, "length_buckets": [16, 32, 64], **kw})
    return load_dataset(specs, make_tokenizer(), cfg), cfg


def take(it, n):
    return list(itertools.islice(it, n))


def same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)  # the same fields and static shape
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_batch_contract(files):
    data, cfg = data_for([files["big"]], kl_pairs=True)
    b = next(BatchIterator(data, cfg, seed=0, global_batch_size=8, prefetch=0))
    T = b.main.input_ids.shape[1]
    assert T in cfg.buckets()
    for kind in ("main", "kl"):
        for k in ("input_ids", "attention_mask", "loss_mask"):
            x = getattr(getattr(b, kind), k)
            assert x.dtype == np.int32 and x.shape == (8, T), (kind, k)
    assert b.labels.dtype == bool and b.example_mask.dtype == bool and b.example_index.dtype == np.int64
    assert np.all(b.main.loss_mask <= b.main.attention_mask) and np.all(b.main.loss_mask[:, 0] == 0)
    for r, i in enumerate(b.example_index):
        seq = data.seqs["completion"]
        n = len(seq.ids(i))
        np.testing.assert_array_equal(b.main.input_ids[r, :n], seq.ids(i))
        assert b.main.loss_mask[r].sum() == n - seq.prompt_lens[i] and b.labels[r] == data.labels[i]
        # KL row: this prompt, the previous row's completion.
        j = b.example_index[r - 1]
        prompt = seq.ids(i)[:seq.prompt_lens[i]]
        kl = b.kl.input_ids[r, :b.kl.attention_mask[r].sum()]
        np.testing.assert_array_equal(kl, np.concatenate([prompt, seq.ids(j)[seq.prompt_lens[j]:]]))
        assert b.kl.loss_mask[r].sum() == len(kl) - len(prompt)


def test_deterministic_and_reshuffled_per_epoch(files):
    data, cfg = data_for([files["big"]])
    def mk(seed):
        return BatchIterator(data, cfg, seed=seed, global_batch_size=37, prefetch=0)
    a, b = take(mk(3), 2), take(mk(3), 2)
    for x, y in zip(a, b):
        same(x, y)
    assert sorted(a[0].example_index) == list(range(37)) == sorted(a[1].example_index)
    assert list(a[0].example_index) != list(a[1].example_index)  # a new order each epoch
    assert list(take(mk(4), 1)[0].example_index) != list(a[0].example_index)


def test_no_shuffle_keeps_file_order_and_pads_last_batch(files):
    data, cfg = data_for([files["big"]], shuffle=False)
    batches = list(BatchIterator(data, cfg, seed=0, global_batch_size=8, num_epochs=1, prefetch=0))
    assert len(batches) == 5
    idx = np.concatenate([b.example_index for b in batches])
    assert list(idx[:37]) == list(range(37)) and list(idx[37:]) == [-1] * 3
    last = batches[-1]
    assert list(last.example_mask) == [True] * 5 + [False] * 3
    assert last.main.attention_mask[5:].sum() == 0 and last.main.loss_mask[5:].sum() == 0


@pytest.mark.parametrize("new_count", [1, 2, 4])
def test_resume_exactly_even_with_another_process_count(files, new_count):
    data, cfg = data_for([files["big"]])
    full = take(BatchIterator(data, cfg, seed=7, global_batch_size=8, process_count=1, prefetch=0), 12)
    it = BatchIterator(data, cfg, seed=7, global_batch_size=8, process_count=2, process_index=0)
    take(it, 5)
    state = json.loads(json.dumps(it.state()))
    assert state["position"] == 40
    parts = []
    for p in range(new_count):
        resumed = BatchIterator(data, cfg, seed=7, global_batch_size=8, process_count=new_count, process_index=p)
        resumed.restore(state)
        parts.append(take(resumed, 7))
    for step in range(7):
        # tree.map needs every process's batch to have the same fields and static shape
        joined = jax.tree.map(lambda *xs: np.concatenate(xs), *(parts[p][step] for p in range(new_count)))
        same(joined, full[5 + step])


def test_two_processes_disjoint_complete_same_shape(files):
    data, cfg = data_for([files["big"]])
    its = [BatchIterator(data, cfg, seed=1, global_batch_size=6, process_index=p, process_count=2,
                         num_epochs=1, prefetch=0) for p in range(2)]
    seen = []
    for b0, b1 in zip(*its):
        assert b0.main.input_ids.shape == b1.main.input_ids.shape  # bucket chosen from the global batch
        assert b0.shape == b1.shape  # so is the LM-head capacity
        seen += [i for b in (b0, b1) for i in b.example_index if i >= 0]
    assert sorted(seen) == list(range(37))


def test_restore_rejects_other_seed(files):
    data, cfg = data_for([files["big"]])
    it = BatchIterator(data, cfg, seed=1, global_batch_size=4)
    with pytest.raises(ValueError, match="another seed or dataset"):
        it.restore(BatchIterator(data, cfg, seed=2, global_batch_size=4).state())


def test_mixture_weights(files):
    data, cfg = data_for([files["big"], files["small"]], mixture_weights=[1.0, 3.0])
    b = next(BatchIterator(data, cfg, seed=0, global_batch_size=400, prefetch=0))
    from_small = np.mean(data.source_ids[b.example_index] == 1)
    assert abs(from_small - 0.75) < 0.02


def test_thumbs_up_oversampling_and_both_classes(files):
    data, cfg = data_for([files["big"]], thumbs_up_fraction=0.3865)
    it = BatchIterator(data, cfg, seed=0, global_batch_size=1000, prefetch=0)
    assert abs(next(it).labels.mean() - 0.3865) < 0.01
    data, cfg = data_for([files["big"]], both_classes_per_batch=True)
    it = BatchIterator(data, cfg, seed=0, global_batch_size=4, prefetch=0)
    assert it.epoch_length == len(data)
    batches = take(it, 60)
    assert all(0 < b.labels.sum() < 4 for b in batches)
    shown = np.concatenate([b.labels for b in batches])
    assert abs(shown.mean() - data.labels.mean()) < 0.02  # interleaving keeps the natural fraction


def test_paired_batches(files):
    data, cfg = data_for([files["pairs"]], paired=True)
    b = next(BatchIterator(data, cfg, seed=0, global_batch_size=4, prefetch=0))
    for side in ("chosen", "rejected"):
        assert getattr(b, side).input_ids.shape == b.chosen.input_ids.shape
        assert (getattr(b, side).loss_mask.sum(1) > 0).all()
    assert b.labels is None and b.main is None


def test_ordered_batches_and_class_prompts(files):
    data, cfg = data_for([files["big"]], thumbs_up_fraction=0.9)
    idx = np.concatenate([b.example_index for b in ordered_batches(data, cfg, 16)])
    assert list(idx) == list(range(37)) + [-1] * 11  # oversampling does not apply to a full pass
    prompts, up = class_prompts(data, thumbs_up=True)
    assert list(up) == list(np.flatnonzero(data.labels))
    down = np.flatnonzero(~data.labels)
    batches = list(prompt_batches(data, cfg, down, batch_size=5))
    got = np.concatenate([b.example_index for b in batches])
    assert list(got[got >= 0]) == list(down)
    # Two processes split every global batch; the padded length is the same on both.
    halves = [list(prompt_batches(data, cfg, down, batch_size=6, process_index=p, process_count=2))
              for p in range(2)]
    for b0, b1 in zip(*halves):
        assert b0.main.input_ids.shape == b1.main.input_ids.shape and len(b0.example_index) == 3
    got = np.concatenate([np.concatenate([b0.example_index, b1.example_index]) for b0, b1 in zip(*halves)])
    assert list(got[got >= 0]) == list(down)
    b = batches[0]
    seq = data.seqs["completion"]
    i = b.example_index[0]
    np.testing.assert_array_equal(b.main.input_ids[0, :b.main.attention_mask[0].sum()], seq.ids(i)[:seq.prompt_lens[i]])


def test_put_batch_shards_batch_over_mesh(files):
    from bco_jax.sharding import make_mesh, put_batch

    data, cfg = data_for([files["big"]])
    b = next(BatchIterator(data, cfg, seed=0, global_batch_size=16, prefetch=0))
    g = put_batch(b, make_mesh(), accumulation=2)
    assert b.main.input_ids.shape[0] == 16
    assert g.main.input_ids.shape == (2, 8, *b.main.input_ids.shape[1:])
    assert len(g.labels.sharding.device_set) == jax.device_count()
    assert g.shape == b.shape  # static: it stays metadata
    np.testing.assert_array_equal(np.asarray(g.main.input_ids).reshape(b.main.input_ids.shape), b.main.input_ids)
