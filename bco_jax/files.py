"""Atomic file and folder writes: the tmp-then-rename helpers of the package.

A reader (a resumed run, another process, `python -m bco_jax.evaluate`) sees the old file or the
new one, never half of one, even when the writer is killed mid-write.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def atomic_folder(path: str, write: bool = True) -> Iterator[str]:
    """Yields a temporary folder beside `path` to fill; when the block ends without an error it
    replaces `path` (an older `path` is removed only after the new one is in place), else it is
    removed. `write=False` (another process of a job, which writes nothing): yields `path`."""
    if not write:
        yield path
        return
    parent, name = os.path.split(os.path.abspath(path))
    tmp, old = (os.path.join(parent, f".{name}.{what}-{os.getpid()}") for what in ("tmp", "old"))
    for stale in (tmp, old):  # left by a killed process that had this pid
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(tmp)  # the user's umask, as the folder it becomes
    try:
        yield tmp
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
