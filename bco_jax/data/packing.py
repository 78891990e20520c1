"""Sequence packing (`packing: true`): several unpaired examples per row, so a step's tokens are
mostly real instead of mostly padding.

A step's global batch of E examples (`batch_size`, still counted in examples) is cut into equal
groups, one per (data shard, micro-batch, data device of the shard): exactly the examples that
device would hold unpacked. Each group is packed into rows of length T (the length bucket of the
batch's longest example) by first-fit decreasing, and every group is padded to the same row count,
taken from a small fixed ladder (`row_buckets`): every process computes the packing of every group
from lengths alone, so all agree on the shape, and shapes repeat (a step compiles once per shape).

Per row: `segment_ids` (0 = padding, 1, 2, ... = the row's examples), `positions` restarting at 0
per segment, and `row_first_example`: segment s of row r is example `row_first_example[r] + s - 1`
of the micro-batch (all processes' examples of that micro-batch, in order), so the step sums
per-token log-probs per example (`models.example_logps`). The per-example arrays (`labels`,
`example_mask`, `example_index`) keep their [E] axis, ordered as packed; padding examples (index
-1) come last in their group and sit in no row. KTO's KL rows stay one example per row, padded.
"""
from __future__ import annotations

import numpy as np

from .batch import Batch, BatchShape, Sequences
from .errors import ConfigError


def row_buckets(n: int) -> list[int]:
    """Row counts a group may be padded to, ascending, the last `n` (one example per row always fits):
    2^k x {1, 1.25, 1.5, 1.75}, so at most ~20% of a group's rows are padding rows."""
    sizes = {n}
    k = 1
    while k <= n:
        sizes.update(s for s in (k, k * 5 // 4, k * 3 // 2, k * 7 // 4) if s <= n)
        k *= 2
    return sorted(sizes)


def capacity_buckets(T: int) -> list[int]:
    """Scored tokens a packed row may hold, from eighths of T: a packed row holds the completions of
    several examples, so the unpacked ladder (T/4, T/2, T) would run the LM head on up to twice the
    slots it needs."""
    return sorted({max(T * k // 8, 1) for k in range(1, 9)})


def first_fit_decreasing(lengths: np.ndarray, T: int) -> list[list[int]]:
    """Rows of indices into `lengths` (each <= T), longest first into the first row with room.
    Deterministic: ties keep index order."""
    rows, room = [], []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        r = next((r for r, free in enumerate(room) if free >= n), None)
        if r is None:
            rows.append([]), room.append(T)
            r = len(rows) - 1
        rows[r].append(int(i))
        room[r] -= n
    return rows


def pack_groups(seqs, global_ids: np.ndarray, groups: int, T: int) -> list[list[list[int]]]:
    """Per group of `global_ids` (`groups` equal slices): its rows, each a list of positions in
    `global_ids` (positions, not ids: an oversampled example may appear twice in a batch)."""
    packed = []
    for start, ids in zip(range(0, len(global_ids), len(global_ids) // groups), np.split(global_ids, groups)):
        at = np.flatnonzero(ids >= 0)
        packed.append([[start + int(at[i]) for i in row] for row in first_fit_decreasing(seqs.lengths(ids[at]), T)])
    return packed


def assemble_packed(data, global_ids: np.ndarray, process_index: int, process_count: int, accumulation: int,
                    shard_devices: int, T: int) -> tuple[Batch, np.ndarray]:
    """This process's packed rows and per-example arrays of the global batch `global_ids` (-1 =
    padding), see the module doc, and the position in `global_ids` of each of its examples (-1 on
    padding). Shapes: rows [accumulation x shard_devices x R, T] with R from `row_buckets`,
    examples [len(global_ids) / process_count]."""
    seqs = data.seqs["completion"]
    per_process = accumulation * shard_devices
    n_groups = process_count * per_process
    if len(global_ids) % n_groups:
        raise ConfigError(f"packing: a batch of {len(global_ids)} examples does not split into {process_count} "
                          f"processes x {accumulation} micro-batches x {shard_devices} devices")
    per_group = len(global_ids) // n_groups
    groups = pack_groups(seqs, global_ids, n_groups, T)
    R = next(r for r in row_buckets(per_group) if r >= max(len(g) for g in groups))
    rows = per_process * R
    input_ids = np.full((rows, T), data.pad_id, np.int32)
    segment_ids, positions, loss_mask = (np.zeros((rows, T), np.int32) for _ in range(3))
    first_example = np.zeros(rows, np.int32)
    where = np.full(per_process * per_group, -1, np.int64)
    for j in range(per_process):  # this process's groups: micro-batch j // shard_devices, device j % ...
        # Where the group's examples start among all processes' examples of its micro-batch.
        offset = (process_index * shard_devices + j % shard_devices) * per_group
        slot = 0
        for r, row in enumerate(groups[process_index * per_process + j]):
            at, t = j * R + r, 0
            first_example[at] = offset + slot
            for s, position in enumerate(row, start=1):
                i = int(global_ids[position])
                ids, plen = seqs.ids(i), int(seqs.prompt_lens[i])
                n = len(ids)
                input_ids[at, t:t + n], segment_ids[at, t:t + n] = ids, s
                positions[at, t:t + n] = np.arange(n)
                loss_mask[at, t + plen:t + n] = 1
                t += n
                where[j * per_group + slot] = position
                slot += 1
    valid = where >= 0
    example_index = np.where(valid, global_ids[where], -1)
    # Every group's rows, not only this process's: the capacity (a static shape) must agree everywhere.
    ids = np.maximum(global_ids, 0)
    completion = seqs.lengths(ids) - seqs.prompt_lens[ids]
    longest = max((int(completion[row].sum()) for g in groups for row in g), default=1)
    capacity = next(c for c in capacity_buckets(T) if c >= min(longest, T))
    main = Sequences(input_ids, (segment_ids > 0).astype(np.int32), loss_mask, segment_ids, positions, first_example)
    return Batch(example_mask=valid, main=main, example_index=example_index, shape=BatchShape(capacity),
                 labels=np.where(valid, data.labels[np.maximum(example_index, 0)], False)), where
