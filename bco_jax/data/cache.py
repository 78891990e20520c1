"""On-disk cache of tokenized datasets, keyed by what produced them, so a second run starts at once.

The key hashes the source files (path, size, mtime), the tokenizer (its full serialized form and
chat template) and the options that change tokens. A changed file, tokenizer or option is a new key;
stale entries are never reused. Writes are atomic (temp file + rename), so a killed run leaves no
half-written entry and several processes may race to fill the same key.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from bco_jax.files import atomic_write

CACHE_VERSION = 2  # bump when the tokenized layout or tokenization rules change


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: the vocabulary is what we can see
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    import tokenizers
    import transformers

    # Options of slow tokenizers (legacy, add_prefix_space, ...) and library versions change ids too.
    extra = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
             tokenizer.pad_token_id, getattr(tokenizer, "chat_template", None),
             _plain_options(tokenizer), transformers.__version__, tokenizers.__version__]
    h.update(json.dumps(extra, default=str).encode())
    return h.hexdigest()


def _plain_options(tokenizer) -> list:
    # Plain values only: objects would hash by address, and file paths say where, not what.
    return sorted((k, v) for k, v in getattr(tokenizer, "init_kwargs", {}).items()
                  if isinstance(v, (str, int, float, bool, type(None))) and "file" not in k
                  and k != "name_or_path")


def cache_key(source_fingerprint, tokenizer_fp: str, options: dict) -> str:
    blob = json.dumps([CACHE_VERSION, source_fingerprint, tokenizer_fp, options], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load(cache_dir: str, key: str) -> tuple[dict, dict] | None:
    """(arrays, meta) of a cached entry, or None when absent or unreadable."""
    path = os.path.join(cache_dir, key)
    try:
        with open(path + ".json") as f:
            meta = json.load(f)
        with np.load(path + ".npz") as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    return arrays, meta


def save(cache_dir: str, key: str, arrays: dict, meta: dict) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, key)
    # The arrays land first; the .json written last marks the entry complete.
    atomic_write(path + ".npz", lambda f: np.savez(f, **arrays))
    atomic_write(path + ".json", lambda f: f.write(json.dumps(meta, default=str).encode()))

