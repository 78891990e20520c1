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


def clip(text: str, limit: int = 200, keep_end: bool = False) -> str:
    """`text` cut to `limit` characters: a message never prints a whole (maybe huge) value.
    `keep_end`: cut from the middle (an error whose cause is said last, after long paths)."""
    if len(text) <= limit:
        return text
    if keep_end:
        return text[:limit // 2 - 3] + " ... " + text[-(limit // 2 - 2):]
    return text[:limit - 4] + " ..."


def short(value, limit: int = 80) -> str:
    """`value`'s repr cut to `limit` characters (`clip`)."""
    return clip(repr(value), limit)


def first_line(err: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


_PASSES: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named point where tests inject a crash: with BCO_JAX_FAULT=<name>:<n> in the environment the
    process SIGKILLs itself the n-th time it passes `name` (no cleanup, as a preempted VM or the OOM
    killer would). Points: "step" (a step dispatched), "checkpoint" (a save in flight), "export"
    (the final state written, the HF export not yet). With BCO_JAX_FILE_LIMIT=<name>:<n>:<bytes> the
    n-th pass instead limits every file the process writes from then on to `bytes` (RLIMIT_FSIZE,
    SIGXFSZ ignored): writes fail as on a full disk. A no-op otherwise."""
    kill, limit = os.environ.get("BCO_JAX_FAULT", ""), os.environ.get("BCO_JAX_FILE_LIMIT", "")
    if name not in (kill.partition(":")[0], limit.partition(":")[0]):
        return
    _PASSES[name] = _PASSES.get(name, 0) + 1
    if kill.partition(":")[0] == name and _PASSES[name] == int(kill.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)
    point, n, size = (limit.split(":") + ["", ""])[:3]
    if point == name and _PASSES[name] == int(n or 1):
        import resource  # a full disk, as the process sees it: writes past `size` bytes fail (EFBIG)

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(size or 0), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


# What the CLIs report as one line `error: ...` and exit 2: the project's own user errors, and a
# missing file. Anything else (a bare ValueError included) is a bug: its traceback, exit 1.
USER_ERRORS = (ConfigError, DataError, TrainError, FileNotFoundError)

__all__ = ["USER_ERRORS", "ConfigError", "DataError", "TrainError", "clip", "first_line", "log", "short"]
