"""Binary-feedback datasets: formats, TRL-identical tokenization, a resumable grain pipeline.

    cfg = DataConfig(train_data=["feedback/*.jsonl"], max_length=1024)
    data = load_dataset(cfg.train_data, tokenizer, cfg)
    batches = BatchIterator(data, cfg, seed=0, global_batch_size=64,
                            process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(batches); saved = batches.state(); batches.restore(saved)
"""
from .config import DataConfig
from .dataset import TokenizedDataset, format_report, load_dataset
from .errors import DataError
from .formats import Example, Pair, records_from_rows
from .pipeline import BatchIterator, assemble, class_prompts, ordered_batches, prompt_batches
from .tokenize import Sequences, pad_token_id

__all__ = [
    "BatchIterator", "DataConfig", "DataError", "Example", "Pair", "Sequences", "TokenizedDataset",
    "assemble", "class_prompts", "format_report", "load_dataset", "ordered_batches", "pad_token_id",
    "prompt_batches", "records_from_rows",
]
