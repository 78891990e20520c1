"""What every module may raise or log. At the bottom of the package (it imports nothing of ours), so
any module can use it without an import circle."""
from __future__ import annotations

import logging

log = logging.getLogger("bco_jax")


class ConfigError(ValueError):
    """A bad key or value; the message names the key."""


class DataError(ValueError):
    """A dataset cannot be used as given; the message names the file and row and the reason."""


class TrainError(RuntimeError):
    """A run that cannot go on; the message says why, the last good checkpoint is kept."""


USER_ERRORS = (ConfigError, DataError, TrainError, ValueError, FileNotFoundError)

__all__ = ["USER_ERRORS", "ConfigError", "DataError", "TrainError", "log"]
