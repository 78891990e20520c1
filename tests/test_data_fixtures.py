"""Shared helpers for the data tests: tiny tokenizers trained here and data files written here."""
from __future__ import annotations

import functools
import json
import os

SENTENCES = [
    "The sky is blue and the sea is blue too.",
    "The sun is in the sky, not in the sea.",
    "What color is the sky? It is blue.",
    "Grass is green, blood is red, the night is black.",
    "A good answer is short and true. A bad answer is long and wrong.",
    "blue blue blue bluebird blueberry sky sea sun",
    "Hello! How are you today? I am fine, thank you.",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.cache
def _backend():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 3, trainer)
    return tok.to_str()


@functools.cache
def make_tokenizer(bos: bool = True, pad: bool = True, chat: bool = True):
    """A small byte-level BPE tokenizer; variants without BOS or without a pad token."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    kw = {"eos_token": "</s>"}
    if bos:
        kw["bos_token"] = "<s>"
    if pad:
        kw["pad_token"] = "<pad>"
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_backend()), **kw)
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(path, rows) -> str:
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def unpaired_rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Question {i}: what color is the sky?", "completion": f" It is blue {i}.",
             "label": i % 3 != 0} for i in range(start, start + n)]
