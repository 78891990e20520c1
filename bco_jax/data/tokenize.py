"""Records -> token ids and the prompt/completion split, identical to TRL 1.13.0's BCOTrainer.

TRL's recipe, reproduced here from its behaviour (not its code):
  * chat records are rendered to text first: the prompt with the generation prompt (or continuing a
    final assistant message), the completion = render(prompt + completion) minus the rendered prompt,
    the prompt cut back to the prefix both renderings share;
  * prompt and prompt+completion are tokenized without special tokens; the completion ids are the
    full ids after the prompt's length, one earlier when the prompt's last token merged with the
    completion's first (then the prompt ids are the full ids before that point);
  * BOS is prepended when the tokenizer has one and the prompt does not start with it, EOS is
    appended when the completion does not end with it; prompt tokens are out of the loss.
Truncation differs only where TRL breaks: TRL cuts the completion to fit max_length, which goes
negative when the prompt alone is too long. Here such prompts lose their start (keep the end, as
TRL once did) so that min_completion_length completion tokens fit; what cannot fit is dropped and
counted. One slot is kept for BOS even on tokenizers without one, as TRL does, so ids match.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import takewhile

import numpy as np

from .config import DataConfig
from .errors import DataError, Issues
from .formats import Example, Pair, Text

log = logging.getLogger("bco_jax.data")
_TOKENIZE_CHUNK = 1000
_warned_pad: set[int] = set()


@dataclass
class Sequences:
    """Variable-length token sequences stored flat: ids of example i are tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # int32 [total]
    offsets: np.ndarray  # int64 [n + 1]
    prompt_lens: np.ndarray  # int32 [n]: the first prompt_lens[i] ids are prompt (BOS included)

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def ids(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self, which: np.ndarray | None = None) -> np.ndarray:
        """Lengths of all examples, or of the examples `which` (without touching the others)."""
        if which is None:
            return np.diff(self.offsets)
        return self.offsets[which + 1] - self.offsets[which]

    @staticmethod
    def build(seqs: list[list[int]], prompt_lens: list[int]) -> Sequences:
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
        return Sequences(tokens, offsets, np.asarray(prompt_lens, dtype=np.int32))


@dataclass
class TruncationStats:
    prompt_truncated: int = 0
    completion_truncated: int = 0
    dropped_too_long: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)


def pad_token_id(tokenizer) -> int:
    """The pad id; tokenizers without one pad with EOS (always masked out), said once in the log."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    if id(tokenizer) not in _warned_pad:
        _warned_pad.add(id(tokenizer))
        log.warning("tokenizer has no pad token: padding with EOS (id %d); padded positions are masked out",
                    tokenizer.eos_token_id)
    return int(tokenizer.eos_token_id)


def decode_answer(tokenizer, ids, eos_ids) -> str:
    """A sampled answer's text, without its final end token (any of `eos_ids`). Any other special
    token, and an id past the tokenizer's vocabulary (a model's spare embedding rows, as unk), stays
    visible: a judge or an oracle must not score "1<bos>2" as "12"."""
    ids = [int(t) for t in ids]
    if ids and ids[-1] in eos_ids:
        ids = ids[:-1]
    return tokenizer.decode([t if t < len(tokenizer) else tokenizer.unk_token_id for t in ids],
                            skip_special_tokens=False)


def render_chat(tokenizer, prompt: list, completion: list) -> tuple[str, str]:
    """(prompt text, completion text) of a chat record, rendered as TRL's apply_chat_template does."""
    last_role = prompt[-1]["role"] if prompt else "user"
    if last_role not in ("user", "tool", "assistant"):
        raise DataError(f"the prompt's last message has role {last_role!r}; it must be user, tool or assistant")
    cont = last_role == "assistant"
    prompt_text = tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    # Some templates add text after the generation prompt that the full rendering lacks; keep the
    # shared prefix as the prompt, as TRL does.
    prompt_text = "".join(a for a, _ in takewhile(lambda ab: ab[0] == ab[1], zip(prompt_text, full)))
    return prompt_text, full[len(prompt_text):]


def as_text(tokenizer, prompt: Text, completion: Text) -> tuple[str, str]:
    if isinstance(completion, list):
        return render_chat(tokenizer, prompt, completion)
    return prompt, completion


def split_ids(prompt_ids: list[int], full_ids: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) from separately tokenized prompt and prompt+completion."""
    r = len(prompt_ids)
    if r > len(full_ids):
        r = len(full_ids)  # TRL raises here; the completion then has no tokens of its own
    elif full_ids[:r] != prompt_ids:
        # The prompt's last token merged with the completion's first: the merged token belongs to
        # the completion, as in TRL.
        r -= 1
    return full_ids[:r], full_ids[r:]


def fit(p: list[int], a: list[int], bos: int | None, eos: int, cfg: DataConfig,
        stats: TruncationStats) -> tuple[list[int], int] | None:
    """(ids, prompt length) with BOS/EOS and truncation applied, or None if it cannot fit."""
    if bos is not None and p and p[0] == bos:
        p = p[1:]  # re-added below: same ids and budget as TRL's "BOS already there" path
    if a and a[-1] == eos:
        a = a[:-1]
    if bos is None and not p:
        return None
    body = cfg.max_length - 2  # one slot for BOS (TRL keeps it even without BOS), one for EOS
    if len(p) + len(a) > body:
        need = min(len(a), cfg.min_completion_length - 1)  # min_completion_length counts EOS
        cap = body - need
        if cfg.max_prompt_length is not None:
            cap = min(cap, cfg.max_prompt_length - 1)
        if cap < (0 if bos is not None else 1):
            stats.dropped_too_long += 1
            return None
        if len(p) > cap:
            p = p[len(p) - cap:]
            stats.prompt_truncated += 1
        if len(p) + len(a) > body:
            a = a[:body - len(p)]
            stats.completion_truncated += 1
    head = [bos] if bos is not None else []
    return head + p + a + [eos], len(head) + len(p)


def tokenize_pairs(tokenizer, texts: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """TRL's _tokenize: [(prompt ids, completion ids)] for (prompt text, completion text)."""
    out = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = texts[start:start + _TOKENIZE_CHUNK]
        prompts = tokenizer([p for p, _ in chunk], add_special_tokens=False)["input_ids"]
        fulls = tokenizer([p + c for p, c in chunk], add_special_tokens=False)["input_ids"]
        out += [split_ids(list(p), list(f)) for p, f in zip(prompts, fulls)]
    return out


def encode(tokenizer, items: list[tuple[Text, Text, str]], cfg: DataConfig, issues: Issues,
           stats: TruncationStats) -> list[tuple[list[int], int] | None]:
    """Token ids and prompt length of each (prompt, completion, where); None where unusable."""
    chat = next((where for _, completion, where in items if isinstance(completion, list)), None)
    if chat is not None and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{chat}: conversational data needs a chat template, and the model's tokenizer has none "
                        "(e.g. a base model's GGUF file); give prompt and completion as plain text")
    texts, ok = [], []
    for prompt, completion, where in items:
        try:
            texts.append(as_text(tokenizer, prompt, completion))
            ok.append(True)
        except Exception as e:
            issues.bad(where, f"chat template failed: {e}")
            texts.append(("", "x"))
            ok.append(False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; completions must end with one")
    out = []
    for (p, a), good, (_, _, where) in zip(tokenize_pairs(tokenizer, texts), ok, items):
        if not good:
            out.append(None)
        elif bos is None and not p:
            issues.bad(where, "empty prompt (the tokenizer has no BOS to start the sequence)")
            out.append(None)
        else:
            res = fit(p, a, bos, eos, cfg, stats)
            if res is None:
                stats.dropped.append((where, f"does not fit max_length={cfg.max_length}"))
            out.append(res)
    return out


def tokenize_examples(tokenizer, records: list[Example], cfg: DataConfig, issues: Issues,
                      stats: TruncationStats) -> tuple[Sequences, np.ndarray, np.ndarray]:
    """(sequences, labels, kept record indices) of unpaired records."""
    enc = encode(tokenizer, [(r.prompt, r.completion, r.where) for r in records], cfg, issues, stats)
    keep = [i for i, e in enumerate(enc) if e is not None]
    seqs = Sequences.build([enc[i][0] for i in keep], [enc[i][1] for i in keep])
    labels = np.array([records[i].label for i in keep], dtype=bool)
    return seqs, labels, np.array(keep, dtype=np.int64)


def tokenize_paired(tokenizer, records: list[Pair], cfg: DataConfig, issues: Issues,
                    stats: TruncationStats) -> tuple[Sequences, Sequences, np.ndarray]:
    """(chosen, rejected, kept record indices) of paired records; a pair is kept only whole."""
    chosen = encode(tokenizer, [(r.prompt, r.chosen, r.where) for r in records], cfg, issues, stats)
    rejected = encode(tokenizer, [(r.prompt, r.rejected, r.where) for r in records], cfg, issues, stats)
    keep = [i for i in range(len(records)) if chosen[i] is not None and rejected[i] is not None]
    def build(enc):
        return Sequences.build([enc[i][0] for i in keep], [enc[i][1] for i in keep])
    return build(chosen), build(rejected), np.array(keep, dtype=np.int64)
