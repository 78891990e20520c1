"""Raw rows -> checked records: unpaired {prompt, completion, label} or paired {prompt, chosen, rejected}.

Accepted row shapes (column names are DataConfig options):
  unpaired  {prompt, completion, label}            label: true/false or 0/1
  rated     {prompt, completion, rating}           thumbs-up iff rating >= rating_threshold
  paired    {prompt, chosen, rejected}             -> chosen thumbs-up, rejected thumbs-down
  implicit  {chosen, rejected}                     prompt = their shared prefix (TRL's extract_prompt)
Each text field may instead be a list of chat messages {role, content}; tokenize.py renders them.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .config import DataConfig
from .errors import DataError, Issues
from .sources import Row, read_rows

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# TRL unpairs with `datasets.map(batched=True)` whose default batch is 1000 rows: each block of 1000
# pairs becomes 1000 chosen rows then 1000 rejected rows. Keeping that order lets shuffle=false
# reproduce TRL's (unshuffled) example order exactly.
TRL_UNPAIR_BLOCK = 1000

Text = str | list  # plain text or a list of chat messages


@dataclass(frozen=True)
class Example:
    prompt: Text
    completion: Text
    label: bool
    where: str


@dataclass(frozen=True)
class Pair:
    prompt: Text
    chosen: Text
    rejected: Text
    where: str


def load_records(spec: str, cfg: DataConfig, split: str, issues: Issues) -> list:
    """All valid records of one source: Examples, or Pairs when cfg.paired."""
    pairs, examples = [], []
    for row, where in read_rows(spec, split, issues, cfg.tfds_data_dir):
        rec = parse_row(row, where, cfg, issues)
        if isinstance(rec, Pair):
            pairs.append(rec)
        elif rec is not None:
            examples.append(rec)
    if cfg.paired:
        if examples:
            raise DataError(f"{examples[0].where}: paired=true needs {cfg.chosen_column}/"
                            f"{cfg.rejected_column} columns, but this record is unpaired")
        records = pairs
    else:
        records = examples + unpair(pairs)
    if not records:
        raise DataError(f"{spec}: the dataset is empty (no valid records"
                        f"{', ' + str(len(issues.found)) + ' skipped as invalid' if issues.found else ''})")
    return records


def unpair(pairs: list[Pair]) -> list[Example]:
    out = []
    for start in range(0, len(pairs), TRL_UNPAIR_BLOCK):
        block = pairs[start:start + TRL_UNPAIR_BLOCK]
        out += [Example(p.prompt, p.chosen, True, p.where + " (chosen)") for p in block]
        out += [Example(p.prompt, p.rejected, False, p.where + " (rejected)") for p in block]
    return out


def parse_row(row: Row, where: str, cfg: DataConfig, issues: Issues) -> Example | Pair | None:
    """One checked record, or None after reporting why the row is unusable."""
    try:
        if cfg.chosen_column in row or cfg.rejected_column in row:
            return _parse_pair(row, where, cfg)
        return _parse_unpaired(row, where, cfg)
    except _Bad as e:
        issues.bad(where, str(e))
        return None


class _Bad(Exception):
    pass


def _field(row: Row, name: str) -> Any:
    if name not in row:
        raise _Bad(f"missing field {name!r} (has {sorted(row)})")
    return row[name]


def _parse_unpaired(row: Row, where: str, cfg: DataConfig) -> Example:
    if cfg.completion_column not in row:
        raise _Bad(f"missing field {cfg.completion_column!r}, or {cfg.chosen_column!r} and "
                   f"{cfg.rejected_column!r} (has {sorted(row)})")
    prompt = check_text(_field(row, cfg.prompt_column), cfg.prompt_column, allow_empty=True)
    completion = check_text(row[cfg.completion_column], cfg.completion_column)
    _same_kind(prompt, completion, cfg.prompt_column, cfg.completion_column)
    if cfg.rating_threshold is not None:
        label = check_rating(_field(row, cfg.rating_column), cfg) >= cfg.rating_threshold
    else:
        label = check_label(_field(row, cfg.label_column), cfg.label_column)
    return Example(prompt, completion, label, where)


def _parse_pair(row: Row, where: str, cfg: DataConfig) -> Pair:
    chosen = check_text(_field(row, cfg.chosen_column), cfg.chosen_column)
    rejected = check_text(_field(row, cfg.rejected_column), cfg.rejected_column)
    _same_kind(chosen, rejected, cfg.chosen_column, cfg.rejected_column)
    prompt = row.get(cfg.prompt_column)
    # TRL keeps an explicit prompt only when it is of the same kind (text/chat) as the answers;
    # otherwise the prompt is the shared prefix inside chosen and rejected.
    if prompt is not None and isinstance(prompt, list) == isinstance(chosen, list):
        prompt = check_text(prompt, cfg.prompt_column, allow_empty=True)
    else:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if not chosen or not rejected:
            raise _Bad("chosen and rejected are identical after their shared prompt")
    return Pair(prompt, chosen, rejected, where)


def extract_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Split off the longest shared prefix (characters or messages) as TRL's extract_prompt does."""
    n = min(len(chosen), len(rejected))
    idx = n - 1  # TRL's loop variable when no position differs
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i  # the space stays with the answers
            break
    idx = max(idx, 0)
    return chosen[:idx], chosen[idx:], rejected[idx:]


def check_text(value: Any, name: str, allow_empty: bool = False) -> Text:
    if isinstance(value, str):
        if not value and not allow_empty:
            raise _Bad(f"empty {name}")
        return value
    if isinstance(value, list):
        if not value:
            raise _Bad(f"empty {name} (no messages)")
        for i, msg in enumerate(value):
            check_message(msg, f"{name} message {i}")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise _Bad(f"field {name!r} must be text or a list of chat messages, got {type(value).__name__}")


def check_message(msg: Any, what: str) -> None:
    if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
        raise _Bad(f"{what} must be an object with 'role' and 'content'")
    if msg["role"] not in CHAT_ROLES:
        raise _Bad(f"unknown chat role {msg['role']!r} in {what} (expected one of {', '.join(CHAT_ROLES)})")
    if not isinstance(msg["content"], str):
        raise _Bad(f"{what} content must be text, got {type(msg['content']).__name__}")


def _same_kind(a: Text, b: Text, name_a: str, name_b: str) -> None:
    if isinstance(a, list) != isinstance(b, list):
        kinds = ["chat messages" if isinstance(x, list) else "text" for x in (a, b)]
        raise _Bad(f"{name_a} is {kinds[0]} but {name_b} is {kinds[1]}; both must be the same kind")


def check_label(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise _Bad(f"label {name!r} must be true/false or 0/1, got {value!r}")


def check_rating(value: Any, cfg: DataConfig) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad(f"rating {cfg.rating_column!r} must be a number, got {value!r}")
    if cfg.rating_range and not cfg.rating_range[0] <= value <= cfg.rating_range[1]:
        raise _Bad(f"rating {value!r} outside the declared range {list(cfg.rating_range)}")
    return float(value)


def records_from_rows(rows: Iterable[dict], cfg: DataConfig, name: str = "<rows>") -> list:
    """Records from in-memory rows (for tests and programmatic use), checked like file rows."""
    issues = Issues(cfg.skip_invalid)
    out = [parse_row(r, f"{name} row {i}", cfg, issues) for i, r in enumerate(rows)]
    out = [r for r in out if r is not None]
    if cfg.paired:
        return [r for r in out if isinstance(r, Pair)]
    return [r for r in out if isinstance(r, Example)] + unpair([r for r in out if isinstance(r, Pair)])
