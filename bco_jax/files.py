"""Atomic file writes: the one tmp-then-rename helper of the package.

A reader (a resumed run, another process, `python -m bco_jax.evaluate`) sees the old file or the
new one, never half of one, even when the writer is killed mid-write.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import IO


def atomic_write(path: str, write: Callable[[IO[bytes]], object]) -> None:
    """Call `write(f)` on a temporary file beside `path` (binary mode), then rename it onto `path`.
    The temporary name is unique, so processes racing to fill the same path never share one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str, obj, **dump_kw) -> None:
    atomic_write_text(path, json.dumps(obj, **dump_kw))
