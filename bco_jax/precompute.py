"""One-pass work before training: the reference log-prob table and the UDM fit, and the host-side
lookup that attaches their per-example values to each batch (by `example_index`).

Both passes run the frozen reference over the data as global batches on the mesh, every process
feeding its own rows, and bring back only per-example numbers (log-probs, weights): nothing of size
examples x hidden is ever held. The log-prob table is cached under `output_dir` by a key of the
reference weights, the dtypes and the tokenized examples, written once (by process 0), so a resumed
run reuses it; the step then reads reference log-probs from the batch and the weights can be freed.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from bco_jax import udm
from bco_jax.data import ordered_batches, prompt_batches
from bco_jax.data.batch import Batch
from bco_jax.errors import log
from bco_jax.files import atomic_write
from bco_jax.sharding import data_shard, host_gather, put_batch, shard_devices
from bco_jax.step import scored_logps


def reference_table(data, data_cfg, batch_size: int, graphdef, ref_params, mesh, cache_path) -> np.ndarray:
    """Reference log-probs of every example ([n] unpaired, [n, 2] chosen/rejected), one pass in
    order, cached at `cache_path` (process 0 writes it, atomically; every process gets the table)."""
    if os.path.exists(cache_path):
        log.info("reference log-probs: reusing %s", cache_path)
        return np.load(cache_path)

    @jax.jit
    def logps_fn(params, batch):  # [E, S] of a [1, ...] batch: the step's own helper
        return scored_logps(graphdef, params, jax.tree.map(lambda x: x[0], batch))

    table = np.zeros((len(data), 2 if data.paired else 1), np.float32)
    shard, shards = data_shard(mesh)
    # Packed rows give one value per entry of the example axis, as unpacked rows do per row.
    for batch in ordered_batches(data, data_cfg, batch_size, shard, shards, shard_devices(mesh)):
        idx = host_gather(put_batch(batch.example_index.astype(np.int32), mesh)).reshape(-1)  # whole global batch
        values = host_gather(logps_fn(ref_params, put_batch(batch.replace(example_index=None), mesh)))
        values = values.reshape(len(idx), -1)
        table[idx[idx >= 0]] = values[idx >= 0]
    table = table if data.paired else table[:, 0]
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        atomic_write(cache_path, lambda f: np.save(f, table))
    return table


def _embeddings(data, data_cfg, indices, batch_size: int, graphdef, ref_params, mesh, classifier=None):
    """Mean-pooled reference embeddings of the prompts of `indices` ([len, D]); or, given a UDM
    `classifier`, only their density-ratio weights ([len]) computed on the devices."""

    @jax.jit
    def embed(params, prompts, classifier):
        ids, mask = prompts.input_ids[0], prompts.attention_mask[0]
        emb_BxD = udm.mean_pool(nnx.merge(graphdef, params).hidden_states(ids, attention_mask=mask), mask)
        return emb_BxD if classifier is None else udm.log_density_ratio(classifier, emb_BxD)

    shard, shards = data_shard(mesh)
    out = []
    for batch in prompt_batches(data, data_cfg, indices, batch_size, shard, shards):
        index = host_gather(put_batch(batch.example_index.astype(np.int32), mesh)).reshape(-1)
        values = host_gather(embed(ref_params, put_batch(batch.main, mesh), classifier))
        out.append(values.reshape(len(index), *values.shape[1:])[index >= 0])
    return np.concatenate(out)


def fit_udm(data, data_cfg, loss_cfg, batch_size: int, seed: int, graphdef, ref_params, mesh):
    """UDM: fit the prompt classifier on a sample of prompts per class, then weigh every thumbs-down
    example by its clipped density ratio. Returns ({"classifier", "weights" [n]}, metrics to log)."""
    labels = data.labels
    sample = udm.sample_per_class(labels, loss_cfg.prompt_sample_size, seed)
    emb_SxD = _embeddings(data, data_cfg, sample, batch_size, graphdef, ref_params, mesh)
    up = labels[sample]
    classifier = udm.fit_prompt_classifier(emb_SxD[up], emb_SxD[~up])
    if jax.process_count() > 1:  # every process must weigh with the same classifier: process 0's
        classifier = multihost_utils.broadcast_one_to_all(classifier)
    acc_up, acc_down = udm.classifier_accuracy(classifier, emb_SxD[up], emb_SxD[~up])
    log.info("UDM classifier: training accuracy %.3f thumbs-up, %.3f thumbs-down", acc_up, acc_down)
    down = np.flatnonzero(~labels)
    logits = _embeddings(data, data_cfg, down, batch_size, graphdef, ref_params, mesh, classifier)
    weights = np.ones(len(data), np.float32)
    weights[down] = np.asarray(udm.ratio_from_logit(logits, loss_cfg.min_density_ratio,
                                                    loss_cfg.max_density_ratio))
    state = {"classifier": jax.tree.map(np.asarray, classifier), "weights": weights}
    return state, {"udm/accuracy_chosen": acc_up, "udm/accuracy_rejected": acc_down}


def attach_tables(batch: Batch, ref_table=None, weights=None) -> Batch:
    """The batch with its per-example table values added and `example_index` removed (it stays on
    the host): precomputed reference log-probs ([E, S], `Batch.reference_logps`) and UDM weights,
    looked up on the host."""
    idx = np.maximum(batch.example_index, 0)
    reference_logps = None if ref_table is None else ref_table.reshape(len(ref_table), -1)[idx]
    return batch.replace(example_index=None, reference_logps=reference_logps,
                         weights=None if weights is None else weights[idx])
