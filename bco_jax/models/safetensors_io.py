"""Minimal safetensors reader / writer on NumPy memory maps.

Our own because the safetensors NumPy backend cannot slice bfloat16 tensors (real checkpoints are
bfloat16) and its flax backend materialises whole tensors on a device. A memory map reads only the
pages a slice touches, which is what lazy, per-shard loading needs. Format:
8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, raw bytes.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from bco_jax.errors import ConfigError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsFile:
    """Lazy view of one .safetensors file: `tensor(name)` is a read-only memory map."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + header_len

    def names(self):
        return list(self.header)

    def shape(self, name):
        return tuple(self.header[name]["shape"])

    def tensor(self, name) -> np.ndarray:
        info = self.header[name]
        dtype_name = info["dtype"]
        if dtype_name not in DTYPES:
            raise ConfigError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype_name}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            return np.zeros(shape, DTYPES[dtype_name])
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start + start,
                        shape=(end - start,))
        return raw.view(DTYPES[dtype_name]).reshape(shape)


def write_file(path, tensors: dict[str, np.ndarray]):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, array in tensors.items():
        nbytes = array.nbytes
        header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data must start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def write_sharded(named_arrays, folder, max_shard_bytes: int):
    """Write (name, array) pairs as model.safetensors, or as model-0000k-of-0000n.safetensors plus
    model.safetensors.index.json once the total exceeds `max_shard_bytes`."""
    shards, current, current_bytes, total = [], {}, 0, 0
    for name, array in named_arrays:
        if current and current_bytes + array.nbytes > max_shard_bytes:
            shards.append(_flush(current, folder, len(shards)))
            current, current_bytes = {}, 0
        current[name] = array
        current_bytes += array.nbytes
        total += array.nbytes
    if current or not shards:
        shards.append(_flush(current, folder, len(shards)))
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        if os.path.exists(os.path.join(folder, stale)):
            os.remove(os.path.join(folder, stale))
    if len(shards) == 1:
        os.replace(shards[0][0], os.path.join(folder, "model.safetensors"))
        return
    weight_map = {}
    for k, (tmp, names) in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp, os.path.join(folder, final))
        weight_map.update(dict.fromkeys(names, final))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _flush(tensors, folder, k):
    # Temporary name: the final one needs the shard count, known only at the end.
    tmp = os.path.join(folder, f".shard-{k:05d}.safetensors.tmp")
    write_file(tmp, tensors)
    return tmp, list(tensors)
