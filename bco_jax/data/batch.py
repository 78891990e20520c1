"""The step's input contract: a typed batch (a pytree of arrays) and its static shape.

    Batch(example_mask=[E], main=Sequences(...), labels=[E])              unpaired (BCO, BCE, KTO)
    Batch(example_mask=[E], chosen=Sequences(...), rejected=Sequences(...))  paired (DPO, IPO, NCA)

`Sequences` are token rows [R, T] (one example per row, or several per packed row with
`segment_ids`); the per-example arrays have the example axis [E] (E = R unpacked). KTO adds `kl`: one
mismatched completion per example, always padded. On the host the arrays are NumPy and hold this
process's rows; `sharding.put_batch` turns them into global [A, ...] jax.Arrays, one slice per
micro-batch. `BatchShape` holds the batch's static facts (how many scored tokens a row may hold);
it is pytree metadata: jit compiles once per shape and it never goes to a device.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

PAIR_SIDES = ("chosen", "rejected")  # the scored sequences of a paired batch, in the table's column order


def _pytree(*, meta: tuple[str, ...] = ()):
    def register(cls):
        fields = [f.name for f in dataclasses.fields(cls)]
        return jax.tree_util.register_dataclass(cls, data_fields=[f for f in fields if f not in meta],
                                                meta_fields=list(meta))
    return register


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """Scored (completion) tokens a row may hold: the LM head runs on that many positions per row
    (None: on all of them). `kl_capacity`: KTO's KL rows' (they are padded when the main rows are packed)."""
    capacity: int | None = None
    kl_capacity: int | None = None


@_pytree()
@dataclasses.dataclass(frozen=True)
class Sequences:
    """Token rows [..., R, T]. Packed rows add `segment_ids` (0 padding, 1, 2, ... the row's examples),
    `positions` restarting per example, and `row_first_example` [..., R]: segment s of row r is example
    `row_first_example[r] + s - 1` of the micro-batch (see `bco_jax.data.packing`)."""
    input_ids: Any
    attention_mask: Any
    loss_mask: Any
    segment_ids: Any = None
    positions: Any = None
    row_first_example: Any = None

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None


@_pytree(meta=("shape",))
@dataclasses.dataclass(frozen=True)
class Batch:
    """One global batch's rows (host: this process's; device: [A, ...] micro-batched)."""
    example_mask: Any  # [E] bool: real examples (False: padding of a partial last batch)
    main: Sequences | None = None  # unpaired: the prompt + completion rows
    chosen: Sequences | None = None  # paired
    rejected: Sequences | None = None
    kl: Sequences | None = None  # KTO: prompt i + completion of example i - 1
    labels: Any = None  # [E] bool: thumbs-up (unpaired)
    example_index: Any = None  # [E] int64, -1 on padding; host only (`precompute.attach_tables` drops it)
    reference_logps: Any = None  # [E, S] precomputed, one column per scored sequence (`scored`)
    weights: Any = None  # [E] UDM density-ratio weights
    shape: BatchShape = BatchShape()

    @property
    def paired(self) -> bool:
        return self.chosen is not None

    def scored(self) -> tuple[Sequences, ...]:
        """The sequences whose log-probs the loss reads: (main,) or (chosen, rejected); the column
        order of `reference_logps`."""
        return (self.chosen, self.rejected) if self.paired else (self.main,)

    @property
    def num_examples(self) -> int:
        return int(np.shape(self.example_mask)[-1])

    def replace(self, **changes) -> Batch:
        return dataclasses.replace(self, **changes)

    @classmethod
    def abstract(cls, accumulation: int, rows: int, length: int, *, precomputed: bool = False,
                 capacity: int | None = None, sharding=None) -> Batch:
        """ShapeDtypeStructs of an unpaired [A, rows, T] batch, as the planner and benchmarks compile
        the step for; `sharding(ndim)`: where an array of that rank lives (None: unplaced)."""
        def spec(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=None if sharding is None else sharding(len(shape)))

        tokens, examples = (accumulation, rows, length), (accumulation, rows)
        main = Sequences(*(spec(tokens, np.int32) for _ in range(3)))
        return cls(example_mask=spec(examples, np.bool_), main=main, labels=spec(examples, np.bool_),
                   reference_logps=spec((*examples, 1), np.float32) if precomputed else None,
                   shape=BatchShape(capacity))
