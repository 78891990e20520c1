"""Judges: what says thumbs-up or thumbs-down to each answer the online loop samples.

A judge is any callable with the signature of a TRL reward function,

    judge(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns) -> [bool | float | None]

one entry per answer: prompts are repeated per answer, text as strings and conversations as message
lists (the answer then is `[{"role": "assistant", "content": text}]`), and `columns` holds the prompt
records' other columns as lists aligned with the answers (a verifier reads its answer key there). A
float is a thumbs-up when >= the threshold; None leaves the answer unjudged (it is not trained on).

`--judge` names a built-in (`BUILT_IN`) or any `module:function` importable from the PYTHONPATH.
Whatever a judge does wrong (raises, returns another length, a NaN, a string, runs past
`judge_timeout`) ends the run with one line naming the judge, and where in the user's code it raised.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import signal
import traceback

import numpy as np

from bco_jax.errors import ConfigError, TrainError, clip, first_line, short

UNJUDGED = -1  # the label code of an answer the judge left out (None); 1 thumbs-up, 0 thumbs-down


class JudgeError(TrainError):
    """The judge failed on a round's answers; the message names it (exit 2, the round's answers kept)."""


def _oracle(task_name: str):
    def judge(prompts, completions, **_):
        task = importlib.import_module(f"bco_jax.oracle.{task_name}")
        return [task.reward(p, c) for p, c in zip(prompts, completions)]
    judge.__name__ = f"{task_name}_oracle"
    return judge


def _instructions(**kwargs):
    from bco_jax.judges import instructions

    return instructions.judge(**kwargs)


BUILT_IN = {"arithmetic": _oracle("task"), "interval": _oracle("interval"), "instructions": _instructions}


def load_judge(spec: str):
    """The judge `spec` names: a built-in, or `module:function`; ConfigError naming --judge otherwise."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    return import_callable(spec, "judge", f"neither a built-in ({', '.join(BUILT_IN)}) nor module:function")


def import_callable(spec: str, key: str, expected: str = "expected module:function"):
    """The callable `module:function` names (a judge, evaluate's --reward_fn); a ConfigError naming
    `key` when it is malformed, does not import (whatever the user's module raises) or is not callable."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"{key}: {short(spec)} is {expected}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as err:  # an ImportError, or whatever the user's module raises while importing
        why = f"{type(err).__name__}: {clip(first_line(err))}"
        raise ConfigError(f"{key}: cannot import {short(spec)}: {why}") from None
    if not callable(fn):
        raise ConfigError(f"{key}: {short(spec)} is not callable")
    return fn


def _user_frame(err: BaseException) -> str:
    """' (at file:line in function)': the innermost frame outside this package, where the user's code raised."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not os.path.abspath(f.filename).startswith(package)]
    return f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""


class _PastDeadline(BaseException):
    """Raised inside the judge when `judge_timeout` passes: a BaseException, so that the judge's own
    `except Exception` does not swallow it."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Interrupt the block after `seconds` (0: never) with _PastDeadline. A SIGALRM timer in the main
    thread, where the loop runs: the judge itself stays in the main thread (a judge that uses signals
    works; one that sets its own SIGALRM timer replaces this one while it runs)."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise _PastDeadline

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_judge(judge, name: str, threshold: float, *, prompts: list, completions: list, completion_ids: list,
              columns: dict[str, list], timeout: float = 0.0) -> np.ndarray:
    """int8 [n] labels of n answers: 1 thumbs-up, 0 thumbs-down, UNJUDGED. JudgeError on anything else,
    and when the call runs longer than `timeout` seconds (0: no limit)."""
    n = len(completions)
    try:
        with _deadline(timeout):
            scores = judge(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except _PastDeadline:
        raise JudgeError(f"judge {name} ran past judge_timeout={timeout:g} s on {n} answers; the round's answers "
                         "are not saved: raise judge_timeout or fix the judge, and rerun to resume") from None
    except Exception as err:
        raise JudgeError(f"judge {name} raised {type(err).__name__}: {clip(first_line(err))}{_user_frame(err)}; "
                         "the round's answers are kept: fix the judge and rerun to resume") from None
    try:
        scores = list(scores)
    except TypeError:
        raise JudgeError(f"judge {name} returned {short(scores)}, not a list of {n} scores") from None
    if len(scores) != n:
        raise JudgeError(f"judge {name} returned {len(scores)} scores for {n} answers")
    labels = np.empty(n, np.int8)
    for i, score in enumerate(scores):
        if score is None:
            labels[i] = UNJUDGED
        elif isinstance(score, (bool, np.bool_)):
            labels[i] = int(score)
        elif isinstance(score, (int, float, np.integer, np.floating)) and math.isfinite(float(score)):
            labels[i] = int(float(score) >= threshold)
        else:
            raise JudgeError(f"judge {name} returned {short(score)} for answer {i}: expected a bool, a finite "
                             "number or None")
    return labels
