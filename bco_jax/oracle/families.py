"""What every oracle task does the same way, given its prompts' families: the held-out split, the
stream of noisy demonstrations, and the cleaning of a generated answer before the oracle reads it."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


def split_prompts(all_prompts: Callable[[str], list[str]], families: tuple[str, ...], seed: int, n_eval: int,
                  n_heldout_feedback: int) -> dict[str, list[str]]:
    """Disjoint prompt sets, half of each family: `eval` (success rate, KL, samples),
    `heldout_feedback` (labelled held-out feedback) and `train` (SFT and training feedback).
    A pure function of the seed, so every script agrees on which prompts are held out."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[str]] = {"eval": [], "heldout_feedback": [], "train": []}
    for family in families:
        prompts = all_prompts(family)
        order = rng.permutation(len(prompts))
        ne, nh = n_eval // 2, n_heldout_feedback // 2
        splits["eval"] += [prompts[i] for i in order[:ne]]
        splits["heldout_feedback"] += [prompts[i] for i in order[ne:ne + nh]]
        splits["train"] += [prompts[i] for i in order[ne + nh:]]
    return splits


def demonstrations(prompts: list[str], rng: np.random.Generator, families: tuple[str, ...],
                   prompt_family: Callable[[str], str], noisy_answer: Callable) -> Iterator[tuple[str, str]]:
    """An endless stream of (prompt, noisy_answer(prompt, rng)): a family drawn uniformly, then one of
    its prompts, so every family is learned equally well whatever its size."""
    by_family = {f: [p for p in prompts if prompt_family(p) == f] for f in families}
    present = [f for f in families if by_family[f]]
    while True:
        family = present[int(rng.integers(len(present)))]
        prompt = by_family[family][int(rng.integers(len(by_family[family])))]
        yield prompt, noisy_answer(prompt, rng)


def clean(completion: str) -> str:
    """Generated text may end with the EOS string when decoded without skipping special tokens; an EOS
    inside the answer is junk and must not be scored right."""
    return completion.strip().removesuffix("<eos>").strip()
