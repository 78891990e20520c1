"""One-pass work before training: the reference log-prob table and the UDM fit, and the host-side
lookup that attaches their per-example values to each batch (by `example_index`).

Both passes run the frozen reference once over the data. The log-prob table is cached under
`output_dir` by a key of the reference weights and the tokenized examples, so a resumed run reuses it;
the step then reads reference log-probs from the batch and the reference weights can be freed.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bco_jax import udm
from bco_jax.data import ordered_batches, prompt_batches
from bco_jax.errors import log
from bco_jax.files import atomic_write
from bco_jax.sharding import host_gather, put_batch
from bco_jax.step import PAIR_SIDES, batch_logps


def reference_table(data, data_cfg, batch_size: int, graphdef, ref_params, mesh, cache_path) -> np.ndarray:
    """Reference log-probs of every example ([n] unpaired, [n, 2] chosen/rejected), one pass in
    order, cached at `cache_path` (written atomically)."""
    if os.path.exists(cache_path):
        log.info("reference log-probs: reusing %s", cache_path)
        return np.load(cache_path)
    prefixes = [f"{side}_" for side in PAIR_SIDES] if data.paired else [""]

    @jax.jit
    def logps_fn(params, batch):  # every prefix of a [1, b, ...] batch: the step's own helper
        mb = {k: v[0] for k, v in batch.items()}
        return jnp.stack([batch_logps(graphdef, params, mb, prefix)[0] for prefix in prefixes], axis=-1)

    table = np.zeros((len(data), len(prefixes)), np.float32)
    for batch in ordered_batches(data, data_cfg, batch_size, jax.process_index(), jax.process_count()):
        index = batch.pop("example_index")
        arrays = put_batch(batch, mesh)
        idx = host_gather(put_batch({"i": index}, mesh)["i"]).reshape(-1)  # the whole global batch
        values = host_gather(logps_fn(ref_params, arrays))
        table[idx[idx >= 0]] = values[idx >= 0]
    table = table if data.paired else table[:, 0]
    atomic_write(cache_path, lambda f: np.save(f, table))
    return table


def fit_udm(data, data_cfg, loss_cfg, batch_size: int, seed: int, graphdef, ref_params, restored=None):
    """UDM: the prompt classifier (fit, or `restored` from a checkpoint) and every example's weight.
    Returns (classifier params, weights [n], metrics to log)."""
    embed = jax.jit(lambda p, ids, mask: udm.mean_pool(nnx.merge(graphdef, p).hidden_states(ids, mask), mask))
    emb = np.zeros((len(data), 0), np.float32)
    for thumbs_up in (True, False):
        for batch in prompt_batches(data, data_cfg, thumbs_up, batch_size):
            e = np.asarray(embed(ref_params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])))
            if emb.shape[1] == 0:
                emb = np.zeros((len(data), e.shape[1]), np.float32)
            keep = batch["example_index"] >= 0
            emb[batch["example_index"][keep]] = e[keep]
    labels = data.labels
    if restored is None:
        sample = udm.sample_per_class(labels, loss_cfg.prompt_sample_size, seed)
        up, down = sample[labels[sample]], sample[~labels[sample]]
        params = udm.fit_prompt_classifier(emb[up], emb[down])
        acc_up, acc_down = udm.classifier_accuracy(params, emb[up], emb[down])
        log.info("UDM classifier: training accuracy %.3f thumbs-up, %.3f thumbs-down", acc_up, acc_down)
    else:
        params, acc_up, acc_down = restored, math.nan, math.nan
    weights = np.asarray(udm.density_ratio_weights(params, emb, labels, min_density_ratio=loss_cfg.min_density_ratio,
                                                   max_density_ratio=loss_cfg.max_density_ratio))
    return params, weights, {"udm/accuracy_chosen": acc_up, "udm/accuracy_rejected": acc_down}


def attach_tables(batch: dict, ref_table=None, weights=None) -> dict:
    """The batch with its per-example table values added and `example_index` removed: precomputed
    reference log-probs and UDM weights, looked up on the host."""
    batch = dict(batch)
    idx = np.maximum(batch.pop("example_index"), 0)
    if ref_table is not None:
        if ref_table.ndim == 2:
            for j, side in enumerate(PAIR_SIDES):
                batch[f"{side}_reference_logps"] = ref_table[idx, j]
        else:
            batch["reference_logps"] = ref_table[idx]
    if weights is not None:
        batch["weights"] = weights[idx]
    return batch
