"""Options of the data pipeline: where feedback comes from, how it is read, cut and batched.

One dataclass, one field per option, each with its default and a one-line help. The training config
embeds it; the seed is a training key and is passed to the pipeline as an argument.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError


def _opt(default, help_text: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help_text}, **kw)
    return field(default=default, metadata={"help": help_text}, **kw)


@dataclass
class DataConfig:
    # Sources.
    train_data: list[str] = _opt(
        [], "datasets to train on: each a file, glob, folder, HF save_to_disk dir, TFDS dir or tfds:NAME")
    eval_data: list[str] = _opt([], "datasets to evaluate on, same forms as train_data")
    mixture_weights: list[float] = _opt([], "sampling weight of each train_data entry (empty: by size)")
    split: str = _opt("train", "split to read from HF DatasetDict and TFDS sources")
    eval_split: str = _opt("test", "split to read for eval_data from HF DatasetDict and TFDS sources")
    tfds_data_dir: str | None = _opt(None, "data_dir for tfds:NAME sources (None: TFDS default)")

    # Columns and formats.
    prompt_column: str = _opt("prompt", "column holding the prompt (text or chat messages)")
    completion_column: str = _opt("completion", "column holding the completion of unpaired/rated data")
    label_column: str = _opt("label", "column holding the thumbs-up (true/1) / thumbs-down (false/0) label")
    chosen_column: str = _opt("chosen", "column holding the preferred completion of paired data")
    rejected_column: str = _opt("rejected", "column holding the dispreferred completion of paired data")
    rating_column: str = _opt("rating", "column holding a numeric rating (used when rating_threshold is set)")
    rating_threshold: float | None = _opt(None, "a rating >= this is a thumbs-up (e.g. 4 for HelpSteer2)")
    rating_range: list[float] = _opt([], "[low, high] allowed ratings; outside is a bad record (empty: any)")
    paired: bool = _opt(False, "keep chosen/rejected pairs together (DPO, IPO, NCA) instead of unpairing")
    skip_invalid: bool = _opt(False, "skip malformed records (counted and listed) instead of stopping")

    # Lengths.
    max_length: int = _opt(1024, "longest prompt + completion in tokens, BOS/EOS included (TRL default)")
    max_prompt_length: int | None = _opt(
        None, "cap on prompt tokens (BOS included) when an example is too long; the end is kept")
    min_completion_length: int = _opt(
        1, "a too-long example keeps this many completion tokens (EOS included), cutting the prompt's start")
    length_buckets: list[int] = _opt([], "padded lengths to choose from (empty: powers of 2 from 64, max_length)")

    # Sampling.
    shuffle: bool = _opt(True, "shuffle examples, differently every epoch (false: file order, as TRL)")
    thumbs_up_fraction: float | None = _opt(
        None, "oversample thumbs-up to this fraction of examples (paper: 0.3865 on HelpSteer2)")
    both_classes_per_batch: bool = _opt(False, "interleave classes so every batch holds both")
    kl_pairs: bool = _opt(False, "add KTO's KL arrays: prompt i with the completion of another example")
    packing: bool = _opt(False, "pack several examples per row (unpaired losses; batch_size still counts "
                                "examples): fewer padding tokens, the same numbers")

    # Cache.
    cache_dir: str | None = _opt(None, "folder for tokenized datasets keyed by hash (None: no cache)")

    def __post_init__(self):
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {self.max_length}")
        if self.min_completion_length < 1:
            raise ConfigError(f"min_completion_length must be >= 1, got {self.min_completion_length}")
        if self.thumbs_up_fraction is not None and not 0.0 < self.thumbs_up_fraction < 1.0:
            raise ConfigError(f"thumbs_up_fraction must be in (0, 1), got {self.thumbs_up_fraction}")
        if self.mixture_weights and any(w <= 0 for w in self.mixture_weights):
            raise ConfigError(f"mixture_weights must be positive, got {self.mixture_weights}")
        if self.rating_range and len(self.rating_range) != 2:
            raise ConfigError(f"rating_range must be [low, high], got {self.rating_range}")

    def buckets(self) -> list[int]:
        """The padded lengths a batch may take, ascending, the last one max_length."""
        if self.length_buckets:
            return sorted({int(b) for b in self.length_buckets} | {self.max_length})
        sizes, b = [], 64
        while b < self.max_length:
            sizes.append(b)
            b *= 2
        return sizes + [self.max_length]

    def tokenization_options(self) -> dict:
        """The options that change tokenized examples (part of the cache key)."""
        keys = ("prompt_column", "completion_column", "label_column", "chosen_column", "rejected_column",
                "rating_column", "rating_threshold", "rating_range", "paired", "skip_invalid",
                "max_length", "max_prompt_length", "min_completion_length", "tfds_data_dir")
        return {k: getattr(self, k) for k in keys}

