"""The oracle task's character-level tokenizer, as an ordinary HF tokenizer folder.

One token per character keeps tokenization trivially consistent: tokenizing prompt + completion gives
the prompt's tokens followed by the completion's, so TRL-style tokenization (prompt and prompt+completion
tokenized separately) never merges across the boundary, and every answer has a single spelling.
"""
from __future__ import annotations

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Digits and operators are all the task needs; the space is there so a stray space in user data
# tokenizes to itself rather than to <unk>.
CHARACTERS = tuple("0123456789+-*=() ")
VOCAB = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}

# The conversation is the concatenation of the messages' contents: a user message is the question,
# an assistant message the answer. BOS / EOS are left to the tokenizer and the trainer, as with
# plain-text examples, so chat and plain-text data give the same token ids.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer: one id per character, BOS prepended like Llama's, no EOS added."""
    core = tokenizers.Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    # Split into single characters; "isolated" keeps every character (spaces included) as a token.
    core.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join back without separators
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, VOCAB[BOS])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=64, padding_side="left", chat_template=CHAT_TEMPLATE)
    return tok


def save_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Writes the tokenizer folder; the chat template goes inside tokenizer_config.json (no .jinja
    file) so the folder is made only of file types the package ships."""
    tok = build_tokenizer()
    tok.save_pretrained(path, save_jinja_files=False)
    return tok


if __name__ == "__main__":
    import sys
    save_tokenizer(sys.argv[1] if len(sys.argv) > 1 else "bco_jax/assets/oracle/tokenizer")
