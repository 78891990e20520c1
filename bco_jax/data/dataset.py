"""Sources -> one tokenized dataset in memory (NumPy), with a report of what was cut or skipped.

`load_dataset` reads every source of a config, checks and tokenizes its records (or takes them
from the cache), concatenates the sources (remembering which example came from which, for
mixing) and refuses datasets that cannot train: empty, or a single class for unpaired feedback.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np

from . import cache
from .config import DataConfig
from .errors import DataError, Issues
from .formats import load_records
from .sources import fingerprint
from .tokenize import Sequences, TruncationStats, pad_token_id, tokenize_examples, tokenize_paired

log = logging.getLogger("bco_jax.data")
_REPORT_LIMIT = 100  # records listed by name in a report; the counts are always complete


@dataclass
class TokenizedDataset:
    """Token ids of every example; `seqs` has "completion" (unpaired) or "chosen"/"rejected" (paired)."""

    seqs: dict[str, Sequences]
    labels: np.ndarray | None  # bool [n], thumbs-up; None when paired
    source_ids: np.ndarray  # int32 [n]: which train_data entry each example came from
    pad_id: int
    report: dict = field(default_factory=dict)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def paired(self) -> bool:
        return self.labels is None

    def __len__(self) -> int:
        return len(self.source_ids)

    def lengths(self) -> dict[str, np.ndarray]:
        return {k: s.lengths() for k, s in self.seqs.items()}

    def fingerprint(self) -> str:
        """Hash of every token, split and label: keys caches derived from it (reference log-probs) and
        the resume check. Computed once (a dataset is not changed after it loads)."""
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        for name, s in sorted(self.seqs.items()):
            for arr in (s.tokens, s.offsets, s.prompt_lens):
                h.update(name.encode() + np.ascontiguousarray(arr).tobytes())
        if self.labels is not None:
            h.update(self.labels.tobytes())
        self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint


def load_dataset(specs: list[str], tokenizer, cfg: DataConfig, split: str | None = None,
                 require_both_classes: bool = True) -> TokenizedDataset:
    """Tokenized examples of all `specs` (train_data or eval_data of `cfg`)."""
    if not specs:
        raise DataError("no data given: set train_data (files, folders, globs, HF or TFDS datasets)")
    split = split or cfg.split
    parts = [_load_one(spec, tokenizer, cfg, split) for spec in specs]
    ds = _concat(parts, pad_token_id(tokenizer))
    _check_usable(ds, specs, require_both_classes)
    log.info("data: %s", format_report(ds.report))
    if ds.report["dropped_too_long"]:
        log.warning("data: %d examples do not fit max_length=%d and were dropped, e.g. %s",
                    ds.report["dropped_too_long"], cfg.max_length, ds.report["dropped_records"][:3])
    return ds


def _load_one(spec: str, tokenizer, cfg: DataConfig, split: str) -> TokenizedDataset:
    key = None
    if cfg.cache_dir:
        options = dict(cfg.tokenization_options(), split=split)
        key = cache.cache_key(fingerprint(spec, cfg.tfds_data_dir), cache.tokenizer_fingerprint(tokenizer), options)
        hit = cache.load(cfg.cache_dir, key)
        if hit is not None:
            log.info("data: %s tokenized examples from cache %s", spec, key)
            return _from_arrays(*hit)
    ds = _tokenize_source(spec, tokenizer, cfg, split)
    if key is not None:
        cache.save(cfg.cache_dir, key, *_to_arrays(ds))
    return ds


def _tokenize_source(spec: str, tokenizer, cfg: DataConfig, split: str) -> TokenizedDataset:
    issues, stats = Issues(cfg.skip_invalid), TruncationStats()
    records = load_records(spec, cfg, split, issues)
    if cfg.paired:
        chosen, rejected, keep = tokenize_paired(tokenizer, records, cfg, issues, stats)
        seqs, labels = {"chosen": chosen, "rejected": rejected}, None
    else:
        completion, labels, keep = tokenize_examples(tokenizer, records, cfg, issues, stats)
        seqs = {"completion": completion}
    if len(keep) == 0:
        raise DataError(f"{spec}: no example fits max_length={cfg.max_length} "
                        f"({stats.dropped_too_long} too long, {len(issues.found)} invalid)")
    report = {
        "sources": [spec], "records": len(records), "examples": len(keep),
        "prompt_truncated": stats.prompt_truncated, "completion_truncated": stats.completion_truncated,
        "dropped_too_long": stats.dropped_too_long, "invalid": len(issues.found),
        "invalid_records": issues.found[:_REPORT_LIMIT], "dropped_records": stats.dropped[:_REPORT_LIMIT],
    }
    if issues.found:
        log.warning("data: %s: %s", spec, issues.summary())
    return TokenizedDataset(seqs, labels, np.zeros(len(keep), np.int32), pad_token_id(tokenizer), report)


def _concat(parts: list[TokenizedDataset], pad_id: int) -> TokenizedDataset:
    names = parts[0].seqs.keys()
    seqs = {k: _concat_seqs([p.seqs[k] for p in parts]) for k in names}
    labels = None if parts[0].paired else np.concatenate([p.labels for p in parts])
    source_ids = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(parts)])
    report = {"sources": [s for p in parts for s in p.report["sources"]]}
    for key in ("records", "examples", "prompt_truncated", "completion_truncated", "dropped_too_long",
                "invalid", "invalid_records", "dropped_records"):
        report[key] = sum((p.report[key] for p in parts), [] if key.endswith("_records") else 0)
    report["from_cache"] = all(p.report.get("from_cache", False) for p in parts)
    if labels is not None:
        report["thumbs_up"], report["thumbs_down"] = int(labels.sum()), int((~labels).sum())
    return TokenizedDataset(seqs, labels, source_ids, pad_id, report)


def _concat_seqs(parts: list[Sequences]) -> Sequences:
    shifts = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]])
    offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, shifts)])
    return Sequences(np.concatenate([p.tokens for p in parts]), offsets,
                     np.concatenate([p.prompt_lens for p in parts]))


def _check_usable(ds: TokenizedDataset, specs: list[str], require_both_classes: bool) -> None:
    if ds.paired or not require_both_classes:
        return
    if ds.report["thumbs_down"] == 0 or ds.report["thumbs_up"] == 0:
        only = "thumbs-up" if ds.report["thumbs_down"] == 0 else "thumbs-down"
        raise DataError(f"{', '.join(specs)}: all {len(ds)} examples are {only}; binary feedback needs "
                        "both classes (check label_column / rating_threshold)")


def format_report(report: dict) -> str:
    parts = [f"{report['examples']} examples from {report['records']} records"]
    if "thumbs_up" in report:
        parts.append(f"{report['thumbs_up']} thumbs-up / {report['thumbs_down']} thumbs-down")
    for key in ("prompt_truncated", "completion_truncated", "dropped_too_long", "invalid"):
        if report.get(key):
            parts.append(f"{report[key]} {key.replace('_', ' ')}")
    return ", ".join(parts)


def _to_arrays(ds: TokenizedDataset) -> tuple[dict, dict]:
    arrays = {}
    for name, s in ds.seqs.items():
        arrays.update({f"{name}.tokens": s.tokens, f"{name}.offsets": s.offsets,
                       f"{name}.prompt_lens": s.prompt_lens})
    if ds.labels is not None:
        arrays["labels"] = ds.labels
    return arrays, {"pad_id": ds.pad_id, "report": ds.report, "seqs": list(ds.seqs)}


def _from_arrays(arrays: dict, meta: dict) -> TokenizedDataset:
    seqs = {n: Sequences(arrays[f"{n}.tokens"], arrays[f"{n}.offsets"], arrays[f"{n}.prompt_lens"])
            for n in meta["seqs"]}
    n = len(next(iter(seqs.values())))
    report = dict(meta["report"], from_cache=True)
    report["invalid_records"] = [tuple(x) for x in report["invalid_records"]]
    report["dropped_records"] = [tuple(x) for x in report["dropped_records"]]
    return TokenizedDataset(seqs, arrays.get("labels"), np.zeros(n, np.int32), meta["pad_id"], report)
