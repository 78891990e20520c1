"""Command-line values that are read before anything heavy is imported: a negative value kept with
its flag, the mesh string "data,fsdp,tensor", a boolean.

It imports nothing of jax (nor of the models): `python -m bco_jax.plan` reads --mesh with it before it
chooses how many devices jax simulates. `bco_jax.config.parse` builds the one CLI / YAML parser on
it, and `bco_jax.sharding.make_mesh` checks its shapes with `parse_mesh`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from bco_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
MESH_HELP = "three integers data,fsdp,tensor (one may be -1)"
_NEGATIVE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)
_MESH = re.compile(r"\s*-?\d+\s*(,\s*-?\d+\s*){2}")


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """`--mesh -1,1,1` -> `--mesh=-1,1,1`: argparse would read a value starting with '-' as a flag."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def mesh_problem(shape: str | Sequence[int]) -> str | None:
    """Why `shape` (the string "data,fsdp,tensor" or a sequence of three ints) is not a mesh; None if it is."""
    if isinstance(shape, str):
        if _MESH.fullmatch(shape) is None:
            return f"must be {MESH_HELP}"
        shape = [int(x) for x in shape.split(",")]
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        return f"must be {MESH_HELP}"
    if any(n != -1 and n < 1 for n in shape):
        return "each entry must be > 0, or -1 for the remaining devices"
    if shape.count(-1) > 1:
        return "at most one entry may be -1"
    return None


def parse_mesh(shape: str | Sequence[int]) -> tuple[int, int, int]:
    """The mesh's (data, fsdp, tensor) sizes from "2,-1,1" or a sequence; -1 stays (it fills the
    remaining devices once they are known). ConfigError naming the mesh otherwise."""
    why = mesh_problem(shape)
    if why is not None:
        raise ConfigError(f"mesh: {why} (got {shape!r})")
    if isinstance(shape, str):
        shape = shape.split(",")
    return tuple(int(x) for x in shape)


def parse_bool(raw) -> bool:
    """true / false, 1 / 0, yes / no (any case); ValueError otherwise."""
    if isinstance(raw, bool):
        return raw
    if str(raw).lower() in ("true", "1", "yes"):
        return True
    if str(raw).lower() in ("false", "0", "no"):
        return False
    raise ValueError("expected true or false")
