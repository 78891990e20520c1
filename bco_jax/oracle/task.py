"""The oracle task: two-digit arithmetic questions whose answers a program can check exactly.

A prompt is a question such as "17+25=" (family `add`) or "52-17=" (family `sub`, never negative); a
completion is the answer's decimal digits ("42"). The true reward is known, so a trained policy's
improvement can be measured rather than judged, and thumbs-up / thumbs-down feedback is simply whether
the answer is right.

The SFT model is trained on noisy demonstrations (`noisy_answer`): a fixed fraction of them carry the
mistakes people make on paper (a dropped carry or borrow, one slipped digit), so the model learns the
right answer as its most likely one but samples a wrong one a good part of the time. That is the
setting binary feedback is for: the model can already produce good answers, the feedback says which.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from bco_jax.oracle import families

FAMILIES = ("add", "sub")
_OPERATOR = {"add": "+", "sub": "-"}
_PROMPT_RE = re.compile(r"^(\d{1,2})([+-])(\d{1,2})=$")
_NUMBER_RE = re.compile(r"^(0|[1-9]\d*)$")  # leading zeros and signs are malformed

# Likert scale of `rating`; `rating >= SUCCESS_RATING` is exactly `reward == 1`.
MIN_RATING, MAX_RATING, SUCCESS_RATING = 1, 5, 5


# ---------------------------------------------------------------------------- questions


def make_prompt(a: int, b: int, family: str) -> str:
    if family == "sub" and a < b:
        raise ValueError(f"subtraction questions are never negative: {a}-{b}")
    return f"{a}{_OPERATOR[family]}{b}="


def parse_prompt(prompt: str) -> tuple[int, int, str]:
    """(a, b, family) of a question; ValueError if it is not one of the task's questions."""
    m = _PROMPT_RE.match(prompt)
    if m is None:
        raise ValueError(f"not an oracle-task prompt: {prompt!r}")
    family = "add" if m.group(2) == "+" else "sub"
    return int(m.group(1)), int(m.group(3)), family


def prompt_family(prompt: str) -> str:
    return parse_prompt(prompt)[2]


def answer(prompt: str) -> str:
    a, b, family = parse_prompt(prompt)
    return str(a + b if family == "add" else a - b)


def all_prompts(family: str) -> list[str]:
    """Every question of a family in a fixed order: 10,000 additions, 5,050 subtractions."""
    return [make_prompt(a, b, family) for a in range(100) for b in range(100)
            if family == "add" or a >= b]


def split_prompts(seed: int = 0, n_eval: int = 300, n_heldout_feedback: int = 400
                  ) -> dict[str, list[str]]:
    """Disjoint `eval` / `heldout_feedback` / `train` prompt sets, half of each family
    (`families.split_prompts`)."""
    return families.split_prompts(all_prompts, FAMILIES, seed, n_eval, n_heldout_feedback)


# ---------------------------------------------------------------------------- the oracle


_clean = families.clean


def reward(prompt: str, completion: str) -> float:
    """The oracle: 1.0 if the completion is exactly the right number, else 0.0."""
    return 1.0 if _clean(completion) == answer(prompt) else 0.0


def is_success(prompt: str, completion: str) -> bool:
    return reward(prompt, completion) == 1.0


def rating(prompt: str, completion: str) -> int:
    """Likert 1-5 from how close the answer is, as a grader marking by hand would:
    5 right; 4 one digit wrong (same number of digits); 3 another number within 10 of the truth;
    2 any other number; 1 not a number (empty, stray characters, leading zeros)."""
    text, truth = _clean(completion), answer(prompt)
    if text == truth:
        return 5
    if _NUMBER_RE.match(text) is None:
        return 1
    if len(text) == len(truth) and sum(x != y for x, y in zip(text, truth)) == 1:
        return 4
    if abs(int(text) - int(truth)) <= 10:
        return 3
    return 2


def graded_reward(prompt: str, completion: str) -> float:
    """The Likert rating mapped onto [0, 1]: 1.0 exactly when `reward` is 1.0."""
    return (rating(prompt, completion) - MIN_RATING) / (MAX_RATING - MIN_RATING)


# ---------------------------------------------------------------------------- noisy demonstrations


def _digits(n: int, width: int) -> list[int]:
    return [int(c) for c in str(n).zfill(width)]


def dropped_carry(prompt: str) -> str | None:
    """The answer with every carry (addition) or borrow (subtraction) forgotten, as a pupil who adds
    column by column would write it; None if the question needs no carry or borrow."""
    a, b, family = parse_prompt(prompt)
    da, db = _digits(a, 2), _digits(b, 2)
    if family == "add":
        cols = [(x + y) % 10 for x, y in zip(da, db)]
    else:  # the classic "smaller from larger" slip: each column subtracts its smaller digit
        cols = [abs(x - y) for x, y in zip(da, db)]
    wrong = str(int("".join(map(str, cols))))
    return None if wrong == answer(prompt) else wrong


def slipped_digit(prompt: str, rng: np.random.Generator) -> str:
    """The answer with one digit moved up or down by one (never creating a leading zero)."""
    digits = list(answer(prompt))
    while True:
        i = int(rng.integers(len(digits)))
        new = (int(digits[i]) + int(rng.choice([-1, 1]))) % 10
        if not (i == 0 and new == 0 and len(digits) > 1):
            digits[i] = str(new)
            return "".join(digits)


def noisy_answer(prompt: str, rng: np.random.Generator, noise: float) -> str:
    """A demonstration: right with probability 1 - noise; otherwise a dropped carry/borrow where the
    question has one (half of the mistakes), else a slipped digit."""
    if rng.random() >= noise:
        return answer(prompt)
    if rng.random() < 0.5:
        wrong = dropped_carry(prompt)
        if wrong is not None:
            return wrong
    return slipped_digit(prompt, rng)


def demonstrations(prompts: list[str], rng: np.random.Generator, noise: float
                   ) -> Iterator[tuple[str, str]]:
    """An endless stream of (prompt, noisy answer): a family drawn uniformly, then one of its prompts."""
    return families.demonstrations(prompts, rng, FAMILIES, prompt_family,
                                   lambda prompt, rng: noisy_answer(prompt, rng, noise))
