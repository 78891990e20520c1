"""Device mesh and the logical-axis rules table.

Models name their axes logically ("vocab", "embed", "q_heads", ...); one table maps those names to
mesh axes ("data", "fsdp", "tensor"). Data parallel, FSDP or tensor parallel is a choice of mesh shape
(and, if needed, of table), never a change to the model.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


def make_mesh(shape=(-1, 1, 1), devices=None) -> jax.sharding.Mesh:
    """Mesh over ("data", "fsdp", "tensor"); one entry may be -1 to take the remaining devices."""
    devices = devices if devices is not None else jax.devices()
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def mesh_spec(logical_spec, mesh, rules=None, shape=None) -> PartitionSpec:
    """Mesh PartitionSpec for one logical spec. Mesh axes that do not divide a dimension (when
    `shape` is given), or that an earlier dimension already uses, are dropped (replicated)."""
    table = dict(LOGICAL_RULES if rules is None else rules)
    used, out = set(), []
    for dim, name in enumerate(logical_spec):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for axis in axes:
            size = mesh.shape[axis]
            divides = shape is None or shape[dim] % (size * int(np.prod([mesh.shape[a] for a in kept]))) == 0
            if axis not in used and divides:
                kept.append(axis)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def _spec_of(leaf):
    if isinstance(leaf, nnx.Variable):
        leaf = leaf.get_value()
    return PartitionSpec() if leaf is None else leaf


def logical_sharding(tree, mesh, rules=None, shapes=None):
    """Tree of logical PartitionSpecs (e.g. `nnx.get_partition_spec(state)`, whose leaves are
    Variables holding specs) -> same tree of NamedShardings. `shapes` (a matching tree of arrays or
    ShapeDtypeStructs) lets non-dividing mesh axes fall back to replication."""
    is_leaf = lambda x: isinstance(x, (PartitionSpec, nnx.Variable))  # noqa: E731
    if shapes is None:
        return jax.tree.map(lambda s: NamedSharding(mesh, mesh_spec(_spec_of(s), mesh, rules)),
                            tree, is_leaf=is_leaf)
    return jax.tree.map(
        lambda s, x: NamedSharding(mesh, mesh_spec(_spec_of(s), mesh, rules, getattr(x, "shape", None))),
        tree, shapes, is_leaf=is_leaf)


def model_shardings(state, mesh, rules=None):
    """NamedShardings for an NNX state (from `nnx.split(model)`), shape-aware."""
    return logical_sharding(nnx.get_partition_spec(state), mesh, rules, shapes=state)
