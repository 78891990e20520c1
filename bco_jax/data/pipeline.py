"""The training stream: a grain pipeline from (seed, global position) to this process's rows of a batch.

The example order is a grain MapDataset over global example ids: shuffled per (leaf, epoch) with
`MapDataset.shuffle(...).repeat()`, and interleaved with `MapDataset.mix` for dataset mixing
weights, thumbs-up oversampling and both-classes-per-batch. Position p of that order is a pure
function of (seed, p), so the iterator state is just p: every process computes the same global
batch (and its padded length), keeps its own rows, and a run resumes at the next example even
with another process count or batch size. Partial last batches are padded and masked, never dropped.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

import grain
import numpy as np

from .batch import PAIR_SIDES, Batch, BatchShape, Sequences
from .config import DataConfig
from .dataset import TokenizedDataset
from .errors import ConfigError, DataError
from .packing import assemble_packed

log = logging.getLogger("bco_jax.data")


def _derived_seed(seed: int, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{salt}".encode()).digest()[:4], "little")


def _leaf(indices: np.ndarray, shuffle: bool, seed: int, salt: str) -> grain.MapDataset:
    ds = grain.MapDataset.source(indices)
    if shuffle:
        ds = ds.shuffle(seed=_derived_seed(seed, salt))  # grain reseeds it every epoch
    return ds.repeat()


def _mix(parts: list[tuple[grain.MapDataset, float]]) -> grain.MapDataset:
    if len(parts) == 1:
        return parts[0][0]
    return grain.MapDataset.mix([p for p, _ in parts], [w for _, w in parts])


def build_order(data: TokenizedDataset, cfg: DataConfig, seed: int, shuffle: bool,
                sampling: bool = True) -> tuple[grain.MapDataset, int]:
    """(infinite grain MapDataset of example ids, examples per epoch).

    With `sampling` the config's mixture weights, oversampling and class interleaving apply; an
    epoch is then the positions until the most-sampled group (relative to its weight) has been
    seen once, as grain's mix defines it. Without, it is the plain dataset order.
    """
    n = len(data)
    ids = np.arange(n, dtype=np.int64)
    stratify = sampling and (cfg.thumbs_up_fraction is not None or cfg.both_classes_per_batch)
    weights = list(cfg.mixture_weights) if sampling else []
    n_sources = int(data.source_ids.max()) + 1
    if stratify and data.paired:
        raise ConfigError("thumbs_up_fraction / both_classes_per_batch apply to unpaired data only")
    if weights and len(weights) != n_sources:
        raise ConfigError(f"mixture_weights has {len(weights)} entries for {n_sources} train_data entries")
    if not stratify and not weights:
        return _leaf(ids, shuffle, seed, "all"), n
    if stratify and (data.labels.all() or not data.labels.any()):
        raise DataError("thumbs_up_fraction / both_classes_per_batch need both classes in the data")
    source_w = np.array(weights or np.bincount(data.source_ids, minlength=n_sources), float)
    groups = _weighted_leaves(data, source_w / source_w.sum(), stratify, shuffle, seed)
    class_w = [sum(w for _, w, _ in leaves) for leaves in groups]
    if stratify and cfg.thumbs_up_fraction is not None:
        class_w = [cfg.thumbs_up_fraction, 1.0 - cfg.thumbs_up_fraction]
    parts, epoch = [], float("inf")
    for leaves, cw in zip(groups, class_w):
        total = sum(w for _, w, _ in leaves)
        parts.append((_mix([(leaf, w / total) for leaf, w, _ in leaves]), cw))
        epoch = min([epoch] + [size / (cw * w / total) for _, w, size in leaves])
    order = _mix(parts)
    return order, max(int(epoch), 1)


def _weighted_leaves(data: TokenizedDataset, source_w: np.ndarray, stratify: bool, shuffle: bool,
                     seed: int) -> list[list[tuple[grain.MapDataset, float, int]]]:
    """Per class (or one group): [(leaf stream, its weight in the whole stream, its size)].

    A source keeps its share of the stream; within a source the classes keep their natural share.
    """
    n = len(data)
    ids = np.arange(n, dtype=np.int64)
    sizes = np.bincount(data.source_ids)
    classes = [("up", data.labels), ("down", ~data.labels)] if stratify else [("all", np.ones(n, bool))]
    groups = []
    for name, member in classes:
        leaves = []
        for s in range(len(source_w)):
            leaf_ids = ids[member & (data.source_ids == s)]
            if len(leaf_ids):
                leaves.append((_leaf(leaf_ids, shuffle, seed, f"{name}/{s}"),
                               source_w[s] * len(leaf_ids) / sizes[s], len(leaf_ids)))
        groups.append(leaves)
    return groups


class BatchIterator:
    """This process's rows of consecutive global batches; checkpoint with state() / restore()."""

    def __init__(self, data: TokenizedDataset, cfg: DataConfig, *, seed: int, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                 shuffle: bool | None = None, sampling: bool = True, prefetch: int = 2, accumulation: int = 1,
                 shard_devices: int = 1):
        """`accumulation`, `shard_devices` (with `cfg.packing`): the micro-batches per step and the
        data-parallel devices per process the rows are fed to (`sharding.put_batch`): examples are
        packed per micro-batch and device, exactly the examples that device would hold unpacked."""
        if global_batch_size % process_count:
            raise ConfigError(f"global_batch_size {global_batch_size} is not divisible by "
                             f"process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ConfigError(f"process_index {process_index} outside [0, {process_count})")
        self.data, self.cfg, self.seed = data, cfg, int(seed)
        self.global_batch_size, self.process_index, self.process_count = (
            global_batch_size, process_index, process_count)
        self.local_batch_size = global_batch_size // process_count
        if cfg.packing and data.paired:
            raise ConfigError("packing: paired data (chosen/rejected) is not packed; use packing false")
        self.layout = (accumulation, shard_devices)
        self.buckets = cfg.buckets()
        self._shuffle = cfg.shuffle if shuffle is None else shuffle
        self._order, self.epoch_length = build_order(data, cfg, self.seed, self._shuffle, sampling)
        self.num_examples = None if num_epochs is None else num_epochs * self.epoch_length
        self._prefetch = prefetch
        self._check_both_classes(sampling)
        self._start(0)

    def _check_both_classes(self, sampling: bool) -> None:
        if sampling and self.cfg.both_classes_per_batch and not self.data.paired:
            frac = self.cfg.thumbs_up_fraction or float(self.data.labels.mean())
            if self.global_batch_size * min(frac, 1 - frac) < 1:
                log.warning("both_classes_per_batch: a batch of %d cannot hold both classes at a "
                            "thumbs-up fraction of %.3f", self.global_batch_size, frac)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.epoch_length // self.global_batch_size)

    def _start(self, position: int) -> None:
        self.position = position
        ds = self._order.slice(slice(position, self.num_examples))
        ds = ds.batch(self.global_batch_size, drop_remainder=False).map(self._assemble)
        opts = grain.ReadOptions(num_threads=1 if self._prefetch else 0, prefetch_buffer_size=self._prefetch)
        self._it = iter(ds.to_iter_dataset(opts))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch, rows = next(self._it)  # StopIteration at the end of a finite run
        self.position += rows
        return batch

    def state(self) -> dict:
        """JSON-able position in the global stream; independent of process count and batch size."""
        return {"position": int(self.position), "seed": self.seed, "examples": len(self.data),
                "epoch_length": int(self.epoch_length)}

    def restore(self, state: dict) -> None:
        if int(state["seed"]) != self.seed or int(state["examples"]) != len(self.data):
            raise ConfigError(f"data iterator state {state} was saved for another seed or dataset "
                             f"(now seed={self.seed}, examples={len(self.data)})")
        if int(state.get("epoch_length", self.epoch_length)) != self.epoch_length:
            log.warning("data: sampling options changed since the state was saved (epoch of %s, now %d "
                        "examples); resuming at the same position of the new order",
                        state["epoch_length"], self.epoch_length)
        self._start(int(state["position"]))

    def _assemble(self, global_ids: np.ndarray) -> tuple[Batch, int]:
        rows = len(global_ids)
        ids = np.full(self.global_batch_size, -1, np.int64)
        ids[:rows] = global_ids
        batch = assemble(self.data, self.cfg, ids, self.process_index, self.process_count, self.buckets,
                         *self.layout)
        return batch, rows


def assemble(data: TokenizedDataset, cfg: DataConfig, global_ids: np.ndarray, process_index: int,
             process_count: int, buckets: list[int], accumulation: int = 1, shard_devices: int = 1) -> Batch:
    """This process's rows of the global batch `global_ids` (-1 = padding row), padded to a bucket
    (with `cfg.packing`: packed, see `bco_jax.data.packing`)."""
    b = len(global_ids) // process_count
    local = global_ids[process_index * b:(process_index + 1) * b]
    kl_partner = _kl_partners(global_ids) if cfg.kl_pairs and not data.paired else None
    if cfg.packing and not data.paired:
        return _assemble_packed(data, cfg, global_ids, process_index, process_count, buckets, accumulation,
                                shard_devices, kl_partner)
    T = _bucket(data, global_ids, kl_partner, buckets)
    valid = local >= 0
    shape = BatchShape(completion_capacity(data, global_ids, T))
    if data.paired:
        sides = {name: _pack(data.seqs[name], local, T, data.pad_id) for name in PAIR_SIDES}
        return Batch(example_mask=valid, example_index=local.copy(), shape=shape, **sides)
    seqs = data.seqs["completion"]
    kl = None
    if kl_partner is not None:
        partner = kl_partner[process_index * b:(process_index + 1) * b]
        kl = _pad_rows([_kl_ids(seqs, i, j, cfg.max_length) if i >= 0 else None for i, j in zip(local, partner)],
                       T, data.pad_id)
    return Batch(example_mask=valid, example_index=local.copy(), main=_pack(seqs, local, T, data.pad_id), kl=kl,
                 labels=np.where(valid, data.labels[np.maximum(local, 0)], False), shape=shape)


def _assemble_packed(data, cfg, global_ids, process_index, process_count, buckets, accumulation, shard_devices,
                     kl_partner) -> Batch:
    T = _bucket(data, global_ids, None, buckets)
    batch, where = assemble_packed(data, global_ids, process_index, process_count, accumulation, shard_devices, T)
    if kl_partner is None:
        return batch
    # KL rows stay one per example (padded), in the examples' packed order
    seqs = data.seqs["completion"]
    kl = [_kl_ids(seqs, global_ids[p], kl_partner[p], cfg.max_length) if p >= 0 else None for p in where]
    T_kl = _bucket(data, global_ids, kl_partner, buckets)
    shape = BatchShape(batch.shape.capacity, completion_capacity(data, global_ids, T_kl))
    return batch.replace(kl=_pad_rows(kl, T_kl, data.pad_id), shape=shape)


def _kl_partners(global_ids: np.ndarray) -> np.ndarray:
    """Row r's KL completion comes from valid row r-1 of the global batch (cyclically), as in KTO.

    Pairing over the global batch, not the local slice, keeps the KL arrays independent of the
    process count."""
    valid = np.flatnonzero(global_ids >= 0)
    partner = np.full(len(global_ids), -1, np.int64)
    partner[valid] = global_ids[np.roll(valid, 1)]
    return partner


def _kl_ids(seqs, i: int, j: int, max_length: int) -> tuple[list[int], int]:
    """Prompt of example i + completion of example j, cut to max_length keeping j's final EOS."""
    p_i, p_j = seqs.prompt_lens[i], seqs.prompt_lens[j]
    prompt, answer = seqs.ids(i)[:p_i], seqs.ids(j)[p_j:]
    room = max_length - len(prompt)
    if len(answer) > room:
        answer = np.concatenate([answer[:room - 1], answer[-1:]])
    return np.concatenate([prompt, answer]).tolist(), int(p_i)


def _bucket(data: TokenizedDataset, global_ids: np.ndarray, kl_partner, buckets: list[int]) -> int:
    """Smallest bucket holding every sequence of the global batch: the same on every process."""
    # Only this batch's lengths: the trainer calls this every step, the dataset may be millions long.
    ids = global_ids[global_ids >= 0]
    longest = max(int(s.lengths(ids).max()) for s in data.seqs.values()) if len(ids) else 1
    if kl_partner is not None and len(ids):
        seqs = data.seqs["completion"]
        plens = seqs.prompt_lens
        partners = kl_partner[global_ids >= 0]
        longest = max(longest, int((plens[ids] + seqs.lengths(partners) - plens[partners]).max()))
    return next((t for t in buckets if t >= longest), buckets[-1])


def completion_capacity(data: TokenizedDataset, global_ids: np.ndarray, T: int) -> int:
    """How many scored (completion) tokens a row of this global batch may hold, from {T/4, T/2, T}:
    the log-prob pass runs the LM head on that many positions per row instead of T. The same on
    every process; three values per length bucket keep compilations few. (KTO's KL rows hold other
    rows' completions, cut to fit: never longer.)"""
    ids = global_ids[global_ids >= 0]
    longest = max((int((s.lengths(ids) - s.prompt_lens[ids]).max()) for s in data.seqs.values()), default=1) \
        if len(ids) else 1
    return next(c for c in (max(T // 4, 1), max(T // 2, 1), T) if c >= min(longest, T))


def _pack(seqs, local: np.ndarray, T: int, pad_id: int) -> Sequences:
    rows = [(seqs.ids(i).tolist(), int(seqs.prompt_lens[i])) if i >= 0 else None for i in local]
    return _pad_rows(rows, T, pad_id)


def _pad_rows(rows: list, T: int, pad_id: int) -> Sequences:
    """Right-padded input_ids / attention_mask / loss_mask [b, T] from (ids, prompt length) rows."""
    input_ids = np.full((len(rows), T), pad_id, np.int32)
    attention = np.zeros((len(rows), T), np.int32)
    loss = np.zeros((len(rows), T), np.int32)
    for r, row in enumerate(rows):
        if row is None:
            continue
        ids, plen = row
        n = min(len(ids), T)
        input_ids[r, :n] = ids[:n]
        attention[r, :n] = 1
        loss[r, plen:n] = 1
    return Sequences(input_ids, attention, loss)


def ordered_batches(data: TokenizedDataset, cfg: DataConfig, batch_size: int, process_index: int = 0,
                    process_count: int = 1, shard_devices: int = 1) -> BatchIterator:
    """One pass over the whole dataset in stored order, in fixed-size global batches (last one
    padded): for precomputing reference log-probs (key them by example_index) and for evaluation.
    `shard_devices`: data-parallel devices per process (packed rows are packed per device)."""
    return BatchIterator(data, cfg, seed=0, global_batch_size=batch_size, process_index=process_index,
                         process_count=process_count, num_epochs=1, shuffle=False, sampling=False,
                         shard_devices=shard_devices)


def class_prompts(data: TokenizedDataset, thumbs_up: bool) -> tuple[list[np.ndarray], np.ndarray]:
    """(prompt token ids, example indices) of every example of one class, for the UDM classifier."""
    if data.paired:
        raise ValueError("class prompts need unpaired data (labels)")
    seqs = data.seqs["completion"]
    idx = np.flatnonzero(data.labels == thumbs_up)
    return [seqs.ids(i)[:seqs.prompt_lens[i]] for i in idx], idx


def prompt_batches(data: TokenizedDataset, cfg: DataConfig, indices, batch_size: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[Batch]:
    """The prompts of examples `indices`, in order, in global batches of `batch_size` (the last one
    padded with example_index -1): this process's rows of each, input_ids / attention_mask [b, T]
    and example_index [b]. T is the smallest bucket holding the whole global batch, the same on every
    process. For the UDM classifier and its per-example weights."""
    if data.paired:
        raise ValueError("prompt batches need unpaired data")
    seqs, buckets = data.seqs["completion"], cfg.buckets()
    indices = np.asarray(indices, np.int64)
    b = batch_size // process_count
    for start in range(0, len(indices), batch_size):
        global_ids = np.full(batch_size, -1, np.int64)
        global_ids[:len(indices[start:start + batch_size])] = indices[start:start + batch_size]
        longest = max(int(seqs.prompt_lens[i]) for i in global_ids if i >= 0)
        T = next((t for t in buckets if t >= longest), buckets[-1])
        local = global_ids[process_index * b:(process_index + 1) * b]
        rows = [(seqs.ids(i)[:seqs.prompt_lens[i]].tolist(), int(seqs.prompt_lens[i])) if i >= 0 else None
                for i in local]
        yield Batch(example_mask=local >= 0, main=_pad_rows(rows, T, data.pad_id), example_index=local)
