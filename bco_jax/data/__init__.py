"""Binary-feedback datasets: formats, TRL-identical tokenization, a resumable grain pipeline.

    cfg = DataConfig(train_data=["feedback/*.jsonl"], max_length=1024)
    data = load_dataset(cfg.train_data, tokenizer, cfg)
    batches = BatchIterator(data, cfg, seed=0, global_batch_size=64,
                            process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(batches); saved = batches.state(); batches.restore(saved)

Names are imported on first use: `bco_jax.data.config` (the options, needed by every config) does
not pull in grain, TFDS or pyarrow, which a machine that only trains from arrays may not have.
"""
import importlib

_WHERE = {
    "DataConfig": "config", "DataError": "errors",
    "TokenizedDataset": "dataset", "format_report": "dataset", "load_dataset": "dataset",
    "Example": "formats", "Pair": "formats", "records_from_rows": "formats",
    "BatchIterator": "pipeline", "assemble": "pipeline", "class_prompts": "pipeline",
    "ordered_batches": "pipeline", "prompt_batches": "pipeline",
    "Sequences": "tokenize", "pad_token_id": "tokenize",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'bco_jax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
