"""The online loop's data: the prompt set (`load_prompts`), which prompts a round asks
(`round_prompts`), and a round's judged answers as training examples (`round_dataset`): every judged
answer with its label for unpaired losses, each prompt's best and worst answer for paired ones."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from bco_jax.config import TrainConfig
from bco_jax.data.dataset import TokenizedDataset
from bco_jax.data.errors import DataError, Issues
from bco_jax.data.sources import read_rows
from bco_jax.data.tokenize import Sequences
from bco_jax.errors import ConfigError, log
from bco_jax.judges import UNJUDGED
from bco_jax.losses_online import best_worst_pairs


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Every prompt of the `prompts` sources: as written (text or messages), as token ids (BOS and the
    chat template's generation prompt included, as training tokenizes a prompt), and the records'
    other columns, which the judge receives."""
    texts: list
    ids: list[np.ndarray]
    columns: dict[str, list]
    fingerprint: str


def prompt_ids(tokenizer, prompt) -> list[int]:
    text = prompt
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def load_prompts(cfg: TrainConfig, tokenizer) -> Prompts:
    """The prompts that fit max_length with max_completion_length tokens after them; DataError naming
    the file and row of a bad record, or when none fits."""
    column, room = cfg.data.prompt_column, cfg.data.max_length - cfg.online.max_completion_length
    if room < 1:
        raise ConfigError(f"max_completion_length: {cfg.online.max_completion_length} leaves no room for a prompt "
                          f"in max_length={cfg.data.max_length}")
    texts, ids, rows, issues, too_long = [], [], [], Issues(cfg.data.skip_invalid), 0
    for spec in cfg.online.prompts:
        for row, where in read_rows(spec, cfg.data.split, issues, cfg.data.tfds_data_dir):
            prompt = row.get(column)
            ok = (isinstance(prompt, str) and prompt) or (isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt))
            if not ok:
                issues.bad(where, f"field {column!r} must be non-empty text or a list of chat messages")
                continue
            if isinstance(prompt, list) and not getattr(tokenizer, "chat_template", None):
                raise DataError(f"{where}: a conversational prompt, but the model's tokenizer has no chat template")
            row_ids = prompt_ids(tokenizer, prompt)
            if len(row_ids) > room:
                too_long += 1
                continue
            texts.append(prompt), ids.append(np.asarray(row_ids, np.int32)), rows.append(row)
    if too_long:
        log.warning("prompts: %d prompts longer than max_length - max_completion_length = %d tokens were dropped",
                    too_long, room)
    if not texts:
        raise DataError(f"{', '.join(cfg.online.prompts)}: no usable prompt ({too_long} too long for max_length)")
    names = sorted({k for r in rows for k in r} - {column})
    digest = hashlib.sha256(b"".join(x.tobytes() + b"|" for x in ids)).hexdigest()[:32]
    return Prompts(texts, ids, {k: [r.get(k) for r in rows] for k in names}, digest)


def round_prompts(n: int, per_round: int, seed: int, r: int) -> np.ndarray:
    """The prompt indices of round r: consecutive positions of a stream that visits every prompt once
    per epoch, in an order drawn per (seed, epoch)."""
    positions = r * per_round + np.arange(per_round)
    orders = {e: np.random.default_rng([seed, e]).permutation(n) for e in np.unique(positions // n)}
    return np.array([orders[p // n][p % n] for p in positions], np.int64)


def _sequences(prompts: Prompts, answers: dict, rows) -> Sequences:
    """Answers `rows` as prompt ids + the sampled tokens, exactly as sampled."""
    ids = [np.concatenate([prompts.ids[answers["prompt"][j]], answers["tokens"][j][answers["mask"][j] > 0]])
           for j in rows]
    return Sequences(np.concatenate(ids).astype(np.int32), np.cumsum([0] + [len(x) for x in ids]).astype(np.int64),
                     np.array([len(prompts.ids[answers["prompt"][j]]) for j in rows], np.int32))


def round_dataset(prompts: Prompts, answers: dict, pad_id: int, K: int, paired: bool) -> TokenizedDataset | None:
    """The judged answers of a round as training examples; None when there is nothing to learn from.
    Unpaired losses: every judged answer, with its label (the unjudged left out). Paired losses (online
    DPO): per prompt, its first thumbs-up answer as chosen and its first thumbs-down as rejected
    (`losses_online.best_worst_pairs`); a prompt whose judged answers all agree gives no pair."""
    labels = answers["labels"]
    if paired:
        scores_PxK = np.where(labels == UNJUDGED, np.nan, labels).astype(np.float32).reshape(-1, K)
        chosen, rejected, valid = (np.asarray(x) for x in best_worst_pairs(scores_PxK))
        first = np.arange(len(scores_PxK))[valid] * K
        if not len(first):
            return None
        seqs = {"chosen": _sequences(prompts, answers, first + chosen[valid]),
                "rejected": _sequences(prompts, answers, first + rejected[valid])}
        return TokenizedDataset(seqs, None, np.zeros(len(first), np.int32), pad_id, {"examples": len(first)})
    keep = np.flatnonzero(labels != UNJUDGED)
    if not len(keep):
        return None
    up = labels[keep] == 1
    report = {"examples": len(keep), "thumbs_up": int(up.sum()), "thumbs_down": int((~up).sum())}
    return TokenizedDataset({"completion": _sequences(prompts, answers, keep)}, up, np.zeros(len(keep), np.int32),
                            pad_id, report)
