"""Reading raw rows from where users keep feedback: JSON Lines, JSON, Parquet, HF save_to_disk, TFDS.

Each reader yields (row, where) with `where` naming the file and line or row, so later validation
can point at the exact record. No `datasets` import at run time: HF save_to_disk folders are Arrow
stream files read with pyarrow. TFDS is read through `tfds.data_source` (array_record, no TensorFlow).
"""
from __future__ import annotations

import glob as globlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from .errors import DataError, Issues

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
Row = dict[str, Any]


def resolve(spec: str) -> tuple[str, list[str]]:
    """Classify a source spec: ("tfds", [name]), ("tfds_dir", [dir]), ("hf", [dir]) or ("files", paths)."""
    if spec.startswith("tfds:"):
        return "tfds", [spec[len("tfds:"):]]
    if os.path.isdir(spec):
        if os.path.exists(os.path.join(spec, "features.json")):
            return "tfds_dir", [spec]
        if os.path.exists(os.path.join(spec, "state.json")) or os.path.exists(
                os.path.join(spec, "dataset_dict.json")):
            return "hf", [spec]
        files = sorted(
            os.path.join(root, f) for root, _, names in os.walk(spec) for f in names
            if f.endswith(FILE_SUFFIXES))
        if not files:
            raise DataError(f"{spec}: folder holds no .jsonl, .json or .parquet files")
        return "files", files
    if any(c in spec for c in "*?["):
        files = sorted(f for f in globlib.glob(spec, recursive=True) if f.endswith(FILE_SUFFIXES))
        if not files:
            raise DataError(f"{spec}: no .jsonl, .json or .parquet file matches this pattern")
        return "files", files
    if not os.path.exists(spec):
        raise DataError(f"{spec}: no such file or folder")
    if not spec.endswith(FILE_SUFFIXES):
        raise DataError(f"{spec}: unsupported file type (expected .jsonl, .json or .parquet)")
    return "files", [spec]


def fingerprint(spec: str, tfds_data_dir: str | None = None) -> list:
    """What identifies the bytes of a source for the cache key: path, size and mtime of each file
    (for tfds:NAME, the files of the prepared version it resolves to, so a re-prepare invalidates)."""
    kind, paths = resolve(spec)
    if kind == "tfds":
        import tensorflow_datasets as tfds

        try:
            paths = [str(tfds.builder(paths[0], data_dir=tfds_data_dir).data_dir)]
        except Exception:
            return [spec]
    out = []
    for p in paths:
        walk = [p] if os.path.isfile(p) else sorted(
            os.path.join(r, f) for r, _, names in os.walk(p) for f in names)
        for f in walk:
            st = os.stat(f)
            out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return out


def read_rows(spec: str, split: str, issues: Issues, tfds_data_dir: str | None = None) -> Iterator[tuple[Row, str]]:
    kind, paths = resolve(spec)
    if kind == "tfds":
        yield from _read_tfds(paths[0], split, tfds_data_dir)
    elif kind == "tfds_dir":
        yield from _read_tfds_dir(paths[0], split)
    elif kind == "hf":
        yield from _read_hf(paths[0], split)
    else:
        for path in paths:
            yield from _read_file(path, issues)


def _read_file(path: str, issues: Issues) -> Iterator[tuple[Row, str]]:
    if path.endswith(".parquet"):
        yield from _read_parquet(path)
        return
    try:
        with open(path, encoding="utf-8-sig") as f:  # tolerate a byte-order mark
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read file: {e}") from e
    if path.endswith(".json"):
        yield from _read_json(path, text, issues)
    else:
        yield from _read_jsonl(path, text, issues)


def _read_jsonl(path: str, text: str, issues: Issues) -> Iterator[tuple[Row, str]]:
    # Only \n ends a JSON Lines record: str.splitlines would also split on U+2028 / U+2029 / U+0085,
    # which JSON allows raw inside strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            issues.bad(where, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(row, dict):
            issues.bad(where, f"expected a JSON object, got {type(row).__name__}")
            continue
        yield row, where


def _read_json(path: str, text: str, issues: Issues) -> Iterator[tuple[Row, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several objects, one per line: JSON Lines under a .json name
            yield from _read_jsonl(path, text, issues)
            return
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        n = len(next(iter(data.values())))
        if any(len(v) != n for v in data.values()):
            raise DataError(f"{path}: columns have different lengths")
        data = [{k: v[i] for k, v in data.items()} for i in range(n)]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects or an object of columns")
    for i, row in enumerate(data):
        where = f"{path} item {i}"
        if not isinstance(row, dict):
            issues.bad(where, f"expected a JSON object, got {type(row).__name__}")
            continue
        yield row, where


def _read_parquet(path: str) -> Iterator[tuple[Row, str]]:
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        batches = list(pf.iter_batches(batch_size=4096))
    except Exception as e:
        raise DataError(f"{path}: cannot read Parquet file: {e}") from e
    row = 0
    for batch in batches:
        for rec in batch.to_pylist():
            yield rec, f"{path} row {row}"
            row += 1


def _read_hf(path: str, split: str) -> Iterator[tuple[Row, str]]:
    """A `datasets.save_to_disk` folder (Dataset or DatasetDict), read as Arrow streams."""
    import pyarrow as pa
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        if split not in splits:
            raise DataError(f"{path}: no split {split!r} in this DatasetDict (has {splits})")
        path = os.path.join(path, split)
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        files = [os.path.join(path, d["filename"]) for d in state["_data_files"]]
        row = 0
        for fname in files:
            with pa.memory_map(fname) as source:
                table = pa.ipc.open_stream(source).read_all()
            for rec in table.to_pylist():
                yield rec, f"{path} row {row}"
                row += 1
    except (OSError, KeyError, pa.ArrowInvalid, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read HF save_to_disk dataset: {e}") from e


def _read_tfds(name: str, split: str, data_dir: str | None) -> Iterator[tuple[Row, str]]:
    import tensorflow_datasets as tfds
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:
        raise DataError(f"tfds:{name}: cannot find this TFDS dataset: {e}") from e
    yield from _read_tfds_builder(builder, split, f"tfds:{name}")


def _read_tfds_dir(path: str, split: str) -> Iterator[tuple[Row, str]]:
    import tensorflow_datasets as tfds
    try:
        builder = tfds.builder_from_directory(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read TFDS dataset folder: {e}") from e
    yield from _read_tfds_builder(builder, split, path)


def _read_tfds_builder(builder, split: str, label: str) -> Iterator[tuple[Row, str]]:
    fmt = str(getattr(builder.info, "file_format", "") or "")
    if "array_record" not in fmt.lower():
        raise DataError(
            f"{label}: stored as {fmt or 'TFRecord'}, which needs TensorFlow to read; install tensorflow "
            "or convert it to array_record (e.g. `tfds build --file_format=array_record`)")
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:
        raise DataError(f"{label}: cannot open split {split!r}: {e}") from e
    for i in range(len(source)):
        yield _from_numpy(source[i]), f"{label}[{split}] row {i}"


def _from_numpy(value):
    """TFDS gives bytes and NumPy values; turn them into the str/list/bool/number JSON would give."""
    if isinstance(value, dict):
        out = {k: _from_numpy(v) for k, v in value.items()}
        # A TFDS Sequence of dicts arrives as a dict of equal-length lists: chat messages.
        lists = [v for v in out.values() if isinstance(v, list)]
        if lists and len(lists) == len(out) and len({len(v) for v in lists}) == 1 and "role" in out:
            return [dict(zip(out, vals)) for vals in zip(*out.values())]
        return out
    if isinstance(value, (list, tuple)):
        return [_from_numpy(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_from_numpy(v) for v in value.tolist()]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value
