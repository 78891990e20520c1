"""What every module may raise or log. At the bottom of the package (it imports nothing of ours), so
any module can use it without an import circle."""
from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("bco_jax")


class ConfigError(ValueError):
    """A bad key or value; the message names the key."""


class DataError(ValueError):
    """A dataset cannot be used as given; the message names the file and row and the reason."""


class TrainError(RuntimeError):
    """A run that cannot go on; the message says why, the last good checkpoint is kept."""


_PASSES: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named point where tests inject a crash: with BCO_JAX_FAULT=<name>:<n> in the environment the
    process SIGKILLs itself the n-th time it passes `name` (no cleanup, as a preempted VM or the OOM
    killer would). Points: "step" (a step dispatched), "checkpoint" (a save in flight), "export"
    (the final state written, the HF export not yet). A no-op otherwise."""
    spec = os.environ.get("BCO_JAX_FAULT")
    if not spec or spec.partition(":")[0] != name:
        return
    _PASSES[name] = _PASSES.get(name, 0) + 1
    if _PASSES[name] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# What the CLIs report as one line `error: ...` and exit 2: the project's own user errors, and a
# missing file. Anything else (a bare ValueError included) is a bug: its traceback, exit 1.
USER_ERRORS = (ConfigError, DataError, TrainError, FileNotFoundError)

__all__ = ["USER_ERRORS", "ConfigError", "DataError", "TrainError", "log"]
