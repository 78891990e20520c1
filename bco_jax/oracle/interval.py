"""The interval task: a second oracle task, where many answers are right and each is individually unlikely.

A prompt is an open interval of integers `(a b)` such as "(12 57)" (0 <= a, b <= 99, b - a >= 2); a
completion is any integer strictly inside it ("30"), written in plain decimal without leading zeros.
The oracle (`reward`) checks a < x < b exactly.

The reward structure is the opposite of the arithmetic task's (`bco_jax.oracle.task`), where one
answer is right and the mistakes are spread out: here the right answers are many, so under the SFT
model each of them is unlikely (the demonstrations draw one uniformly from the interior), while the
mistakes are few and concentrated: the two boundaries (the closed-interval slip, `x == a` or
`x == b`) and a handful of numbers just outside. A policy's single most likely answer can then be wrong
even when half of its samples are right; feedback has to move mass from a few wrong answers onto many
right ones.

Families: `narrow` (b - a <= NARROW_MAX_WIDTH) and `wide`. The threshold splits the 4,851 intervals
about evenly (2,436 narrow, 2,415 wide), so each family has well over the 1,500 training prompts the
feedback sets draw from it after the held-out prompts are set aside.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from bco_jax.oracle import families

FAMILIES = ("narrow", "wide")
NARROW_MAX_WIDTH = 30  # b - a <= 30 is `narrow`: 1 to 29 right answers; `wide` has 30 to 98
MIN_WIDTH = 2  # b - a >= 2, so at least one integer lies strictly inside
NEAR_DISTANCE = 5  # "just outside": 1..5 below a or above b; rating 3 is "within 5 of the interval"
_PROMPT_RE = re.compile(r"^\((0|[1-9]\d?) (0|[1-9]\d?)\)$")
_NUMBER_RE = re.compile(r"^(0|[1-9]\d*)$")  # leading zeros and signs are malformed

# Likert scale of `rating`; `rating >= SUCCESS_RATING` is exactly `reward == 1`.
MIN_RATING, MAX_RATING, SUCCESS_RATING = 1, 5, 5


# ---------------------------------------------------------------------------- prompts


def make_prompt(a: int, b: int) -> str:
    if not (a >= 0 and b <= 99 and b - a >= MIN_WIDTH):
        raise ValueError(f"not an interval of the task: ({a} {b})")
    return f"({a} {b})"


def parse_prompt(prompt: str) -> tuple[int, int, str]:
    """(a, b, family) of an interval; ValueError if it is not one of the task's prompts."""
    m = _PROMPT_RE.match(prompt)
    if m is None:
        raise ValueError(f"not an interval-task prompt: {prompt!r}")
    a, b = int(m.group(1)), int(m.group(2))
    if b - a < MIN_WIDTH:
        raise ValueError(f"not an interval-task prompt (needs b - a >= {MIN_WIDTH}): {prompt!r}")
    return a, b, "narrow" if b - a <= NARROW_MAX_WIDTH else "wide"


def prompt_family(prompt: str) -> str:
    return parse_prompt(prompt)[2]


def interior(prompt: str) -> range:
    """The right answers: every integer strictly inside the interval."""
    a, b, _ = parse_prompt(prompt)
    return range(a + 1, b)


def all_prompts(family: str) -> list[str]:
    """Every interval of a family in a fixed order: 2,436 narrow, 2,415 wide."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return [make_prompt(a, b) for a in range(100) for b in range(a + MIN_WIDTH, 100)
            if (b - a <= NARROW_MAX_WIDTH) == (family == "narrow")]


def split_prompts(seed: int = 0, n_eval: int = 300, n_heldout_feedback: int = 400
                  ) -> dict[str, list[str]]:
    """Disjoint `eval` / `heldout_feedback` / `train` prompt sets, half of each family
    (`families.split_prompts`)."""
    return families.split_prompts(all_prompts, FAMILIES, seed, n_eval, n_heldout_feedback)


# ---------------------------------------------------------------------------- the oracle


_clean = families.clean


def _number(completion: str) -> int | None:
    text = _clean(completion)
    return int(text) if _NUMBER_RE.match(text) else None


def reward(prompt: str, completion: str) -> float:
    """The oracle: 1.0 if the completion is an integer strictly inside the interval, else 0.0."""
    a, b, _ = parse_prompt(prompt)
    x = _number(completion)
    return 1.0 if x is not None and a < x < b else 0.0


def is_success(prompt: str, completion: str) -> bool:
    return reward(prompt, completion) == 1.0


def rating(prompt: str, completion: str) -> int:
    """Likert 1-5: 5 inside; 4 exactly on a boundary (the closed-interval mistake); 3 another number
    within NEAR_DISTANCE of the interval; 2 any other number; 1 not a number (empty, stray
    characters, signs, leading zeros)."""
    a, b, _ = parse_prompt(prompt)
    x = _number(completion)
    if x is None:
        return 1
    if a < x < b:
        return 5
    if x in (a, b):
        return 4
    if a - NEAR_DISTANCE <= x <= b + NEAR_DISTANCE:
        return 3
    return 2


def graded_reward(prompt: str, completion: str) -> float:
    """The Likert rating mapped onto [0, 1]: 1.0 exactly when `reward` is 1.0."""
    return (rating(prompt, completion) - MIN_RATING) / (MAX_RATING - MIN_RATING)


# ---------------------------------------------------------------------------- noisy demonstrations


def near_misses(prompt: str) -> list[int]:
    """The numbers just outside the interval (1..NEAR_DISTANCE below a or above b) within 0..99."""
    a, b, _ = parse_prompt(prompt)
    below = [a - d for d in range(1, NEAR_DISTANCE + 1) if a - d >= 0]
    above = [b + d for d in range(1, NEAR_DISTANCE + 1) if b + d <= 99]
    return below + above


def noisy_answer(prompt: str, rng: np.random.Generator, noise: float) -> str:
    """A demonstration: with probability 1 - noise a number drawn uniformly from the interior;
    otherwise half of the time a boundary (a or b, equally), else a number just outside, drawn
    uniformly from `near_misses` (those of the ten that lie within 0..99; `(0 99)` has none and gets a
    boundary instead).

    So each right answer has probability (1 - noise) / (b - a - 1), each boundary noise / 4 and each
    near miss noise / 20 (when all ten exist): with noise 0.5, a boundary is more likely than any
    right answer once the interval holds more than 4 integers, a near miss once it holds more than 20."""
    a, b, _ = parse_prompt(prompt)
    if rng.random() >= noise:
        return str(int(rng.integers(a + 1, b)))
    near = near_misses(prompt)
    if rng.random() < 0.5 or not near:
        return str(a if rng.random() < 0.5 else b)
    return str(near[int(rng.integers(len(near)))])


def answer_distribution(prompt: str, noise: float) -> dict[int, float]:
    """The exact distribution `noisy_answer` draws from: {number: probability}, summing to 1."""
    a, b, _ = parse_prompt(prompt)
    dist = dict.fromkeys(range(a + 1, b), (1.0 - noise) / (b - a - 1))
    near = near_misses(prompt)
    boundary = noise if not near else noise / 2
    dist[a], dist[b] = boundary / 2, boundary / 2
    for x in near:
        dist[x] = noise / 2 / len(near)
    return dist


def demonstrations(prompts: list[str], rng: np.random.Generator, noise: float
                   ) -> Iterator[tuple[str, str]]:
    """An endless stream of (prompt, noisy answer): a family drawn uniformly, then one of its prompts."""
    return families.demonstrations(prompts, rng, FAMILIES, prompt_family,
                                   lambda prompt, rng: noisy_answer(prompt, rng, noise))
