"""Device mesh, the logical-axis rules table, and moving data between hosts and the mesh.

Models name their axes logically ("vocab", "embed", "q_heads", ...); one table maps those names to
mesh axes ("data", "fsdp", "tensor"). Data parallel, FSDP or tensor parallel is a choice of mesh shape
(and, if needed, of table), never a change to the model. Batches are sharded along the mesh axes of
the "batch" rule; `put_batch` assembles them from every process's rows, `host_gather` brings a global
array back to every host.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import threading

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from bco_jax.argv import MESH_AXES, parse_mesh
from bco_jax.errors import ConfigError, TrainError, first_line

log = logging.getLogger("bco_jax.sharding")

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
    ("bias", None),
)


# Schedulers that tell each process how many there are, as JAX's own detection reads them:
# name -> (variables that must all be set, the variable holding the process count).
_CLUSTER_ENVIRONMENTS = {
    "SLURM": (("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
              "SLURM_NTASKS"),
    "Open MPI": (("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE"),
}
_TPU_HOSTS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")  # a multi-host TPU slice's workers (GKE)
# A Cloud TPU VM names its slice's workers in its metadata (where JAX's own detection reads them).
_TPU_DEVICES = ("/dev/accel0", "/dev/vfio/0")
_TPU_METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/worker-network-endpoints"


def _cloud_tpu_workers() -> int:
    """Workers of this Cloud TPU VM's slice from its metadata server; 0 off a TPU VM or unreadable."""
    if not any(os.path.exists(d) for d in _TPU_DEVICES):
        return 0
    import urllib.request

    try:
        request = urllib.request.Request(_TPU_METADATA, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            return len([w for w in answer.read().decode().split(",") if w.strip()])
    except (OSError, ValueError):
        return 0


def detected_cluster() -> str | None:
    """The name of the cluster environment this process runs in when it has more than one process
    (SLURM, Open MPI, a TPU slice naming its workers in the environment or, on a Cloud TPU VM, in
    its metadata), which `jax.distributed.initialize()` then joins on its own; else None. Starts
    nothing. Other clusters (Kubernetes jobs, ...) are joined with coordinator_address."""
    for name, (variables, count) in _CLUSTER_ENVIRONMENTS.items():
        if all(v in os.environ for v in variables):
            try:
                return name if int(os.environ[count]) > 1 else None
            except ValueError:  # a half-set environment: let an explicit address decide
                return None
    hosts = next((os.environ[v] for v in _TPU_HOSTS if v in os.environ), "")
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "TPU slice"
    return "Cloud TPU VM slice" if _cloud_tpu_workers() > 1 else None


def initialize_distributed(launch) -> bool:
    """Join the multi-process job this process belongs to, if any (`launch`: the config's launch
    section: coordinator_address, num_processes, process_id, distributed_timeout); returns whether
    this is one. Call before anything touches a JAX device.

    There is a job when `coordinator_address` (or JAX_COORDINATOR_ADDRESS) is given, or JAX detects a
    cluster of several processes. Then `jax.distributed.initialize` connects every process to the
    coordinator (process 0); a peer missing after `timeout_s` seconds, or one that stops sending
    heartbeats later, ends the others with an error instead of a hang. CPU processes exchange
    collectives through gloo. Any other failure to join is a TrainError of one line. A launch key
    that cannot take effect (num_processes / process_id with nothing to join, an address without
    them and no cluster to supply them) is a ConfigError: alone, every host would train by itself.
    """
    timeout_s = launch.distributed_timeout
    address = launch.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    given = launch.num_processes is not None or launch.process_id is not None
    cluster = None if address and given else detected_cluster()
    if not address and cluster is None:
        if given:  # alone, each host of a job would train by itself and write the same output_dir
            raise ConfigError("num_processes / process_id: given without coordinator_address, and no cluster "
                              "(SLURM, Open MPI, a TPU slice) was detected to join: add --coordinator_address "
                              "HOST:PORT of process 0, or drop them to run as one process")
        return False
    if address and cluster is None and not given:
        raise ConfigError(f"coordinator_address: {address} given without num_processes and process_id, and no "
                          "cluster was detected to supply them: give all three")
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used on the CPU backend
    # A peer that never comes makes JAX abort the process from C++ (a page of stack trace): a watchdog
    # ends it a little earlier with one line instead.
    where = address or f"the {cluster} coordinator"
    watchdog = threading.Timer(timeout_s, _give_up, args=(
        f"error: could not join the multi-process job within distributed_timeout={timeout_s}s: "
        f"no answer from every peer via {where} (is every process started, with the same address?)",))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(address, num_processes=launch.num_processes, process_id=launch.process_id,
                                   initialization_timeout=int(timeout_s) + 30)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:  # JaxRuntimeError is a RuntimeError
        first = first_line(err)
        raise TrainError(f"could not join the multi-process job within distributed_timeout={timeout_s}s "
                         f"(coordinator {where}): {first}") from None
    finally:
        watchdog.cancel()
    log.info("joined a %d-process job as process %d (%s)", jax.process_count(), jax.process_index(),
             address or cluster)
    return True


def _give_up(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(2)


def batch_axes(rules=None) -> tuple[str, ...]:
    """The mesh axes that the batch dimension is sharded over (the "batch" rule)."""
    axes = dict(LOGICAL_RULES if rules is None else rules).get("batch")
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _resolve_shape(shape, count: int) -> list[int]:
    """`shape` (three sizes, or the string "data,fsdp,tensor") with its -1 filled from `count`
    devices. ConfigError naming the mesh when the devices do not fit it."""
    shape = list(parse_mesh(shape))  # ConfigError naming the mesh: three entries, one -1 at most
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if count % known:
            raise ConfigError(f"mesh: {count} devices do not divide into mesh {shape}")
        shape[shape.index(-1)] = count // known
    if int(np.prod(shape)) != count:
        raise ConfigError(f"mesh: {shape} needs {int(np.prod(shape))} devices, have {count}")
    return shape


def device_granules(devices) -> tuple[bool, list[list]]:
    """The devices grouped by the units of the slow network between them (DCN), keyed as
    `create_hybrid_device_mesh` keys them: CPU devices by process (a multi-process CPU job gives
    every host slice_index 0), others by slice (`slice_index`: a GPU node, a TPU slice); devices of
    another platform without a slice_index are one group. Returns (whether the groups are
    processes, the groups in key order)."""
    by_process = len(devices) > 0 and devices[0].platform == "cpu"
    attr = "process_index" if by_process else "slice_index"
    if not by_process and not (devices and hasattr(devices[0], attr)):
        return False, [list(devices)]
    groups: dict[int, list] = {}
    for device in devices:
        groups.setdefault(getattr(device, attr), []).append(device)
    return by_process, [groups[key] for key in sorted(groups)]


def split_mesh(shape, granules: int) -> tuple[list[int], list[int]] | None:
    """(ICI, DCN): the sizes of a resolved mesh inside every granule and across granules (their
    product is `shape`). The granule count goes on the first of data, fsdp that it divides; tensor
    never spans granules. None when neither axis is divisible."""
    for axis in (0, 1):
        if shape[axis] % granules == 0:
            dcn = [granules if a == axis else 1 for a in range(len(shape))]
            return [s // d for s, d in zip(shape, dcn)], dcn
    return None


def hybrid_device_array(shape, devices) -> np.ndarray | None:
    """The device array of a resolved mesh `shape` over devices of several granules
    (`device_granules`), laid out by `create_hybrid_device_mesh` (`split_mesh` decides which axis
    crosses granules). None where `jax.make_mesh` builds the mesh: the devices are one granule, or
    CPU processes the mesh cannot split (one host's processes, one per device, with tensor across
    them). ConfigError of one line naming the mesh when slices cannot take it (tensor across them,
    or slices of unequal size)."""
    by_process, granules = device_granules(devices)
    if len(granules) <= 1:
        return None
    count, per_granule = len(granules), sorted({len(g) for g in granules})
    split = split_mesh(shape, count)
    fits = split is not None and per_granule == [int(np.prod(split[0]))]
    if by_process and not fits:
        return None
    unit = "processes" if by_process else "nodes" if devices[0].platform == "gpu" else "slices"
    where = f"mesh: {list(shape)} over {count} {unit}"
    if split is None:
        hint = (shape[0] * count, shape[1], shape[2] // count) if shape[2] % count == 0 else (
            count, int(np.prod(shape)) // count, 1)
        raise ConfigError(f"{where}: tensor cannot span {unit}; put the {unit} on data or fsdp "
                          f"(e.g. {','.join(map(str, hint))})")
    if not fits:
        raise ConfigError(f"{where} needs {int(np.prod(split[0]))} devices in each, have "
                          f"{'/'.join(map(str, per_granule))}")
    log.info("%s: %s inside each, %s across them (hybrid mesh)", where, split[0], split[1])
    return mesh_utils.create_hybrid_device_mesh(split[0], split[1], devices, process_is_granule=by_process)


def make_mesh(shape=(-1, 1, 1), devices=None) -> jax.sharding.Mesh:
    """Mesh over ("data", "fsdp", "tensor"); one entry may be -1 to take the remaining devices.
    `shape`: three sizes, or the config's string "data,fsdp,tensor". Devices of one granule (a
    host, a slice) go through `jax.make_mesh`; devices of several (GPU nodes, TPU slices, CPU
    processes) through the hybrid layout of `hybrid_device_array`, which `jax.make_mesh` refuses."""
    devices = devices if devices is not None else jax.devices()
    shape = _resolve_shape(shape, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    array = hybrid_device_array(shape, devices)
    if array is None:
        return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=axis_types, devices=devices)
    return jax.sharding.Mesh(array, MESH_AXES, axis_types=axis_types)


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
    def is_leaf(x):
        return isinstance(x, (PartitionSpec, nnx.Variable))
    if shapes is None:
        return jax.tree.map(lambda s: NamedSharding(mesh, mesh_spec(_spec_of(s), mesh, rules)),
                            tree, is_leaf=is_leaf)
    return jax.tree.map(
        lambda s, x: NamedSharding(mesh, mesh_spec(_spec_of(s), mesh, rules, getattr(x, "shape", None))),
        tree, shapes, is_leaf=is_leaf)


def model_shardings(state, mesh, rules=None):
    """NamedShardings for an NNX state (from `nnx.split(model)`), shape-aware."""
    return logical_sharding(nnx.get_partition_spec(state), mesh, rules, shapes=state)


def build_mesh(shape) -> jax.sharding.Mesh:
    """The configured mesh; a fully specified mesh smaller than the machine uses the first devices
    (of every process alike, so that no process is left without one, and every node or slice keeps
    as many as the others for the hybrid mesh). Raises ConfigError naming the shape when the devices
    do not fit it."""
    devices, processes = jax.devices(), jax.process_count()
    wanted = int(np.prod(shape))
    if -1 not in shape and 0 < wanted < len(devices):
        log.warning("mesh %s uses %d of %d devices", shape, wanted, len(devices))
        if wanted % processes:
            raise ConfigError(f"mesh: {list(shape)} needs {wanted} devices, which do not split evenly over "
                             f"{processes} processes")
        per_process = {}
        for d in devices:
            per_process.setdefault(d.process_index, []).append(d)
        devices = [d for p in sorted(per_process) for d in per_process[p][:wanted // processes]]
    return make_mesh(shape, devices)


def data_parallel_size(mesh) -> int:
    """How many ways the batch dimension is split on `mesh`."""
    return int(np.prod([mesh.shape[a] for a in batch_axes() if a in mesh.axis_names]))


@functools.cache  # asked at every step (put_batch); a mesh's answer never changes
def data_shard(mesh) -> tuple[int, int]:
    """(index, count): which block of every global batch's rows this process feeds, of how many.
    One block per process in a data-parallel job; processes whose devices hold the same rows (a
    tensor axis across hosts) feed the same block. Raises ConfigError when this process's devices
    do not hold one contiguous block of rows (reorder the mesh)."""
    n = data_parallel_size(mesh)
    probe = NamedSharding(mesh, PartitionSpec(batch_axes()))
    rows = sorted({index[0].start or 0 for index in probe.addressable_devices_indices_map((n,)).values()})
    block = len(rows)
    if rows != list(range(rows[0], rows[0] + block)) or n % block or rows[0] % block:
        raise ConfigError(f"mesh {dict(mesh.shape)}: the devices of process {jax.process_index()} hold batch "
                         f"rows {rows} of {n}, not one aligned block; give each host whole data/fsdp slices")
    return rows[0] // block, n // block


def shard_devices(mesh) -> int:
    """Data-parallel devices per data shard (process): packed rows are packed per device."""
    return data_parallel_size(mesh) // data_shard(mesh)[1]


def abstract_on(tree, shardings):
    """`tree`'s shapes and dtypes as ShapeDtypeStructs placed on `shardings` (a matching tree)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """[A, b, ...] micro-batched arrays: rows sharded over the batch axes, micro-batches not."""
    return NamedSharding(mesh, PartitionSpec(None, batch_axes(), *([None] * (ndim - 2))))


def put_batch(local, mesh, accumulation: int = 1):
    """This process's rows [b, ...] -> global [A, B/A, ...] jax.Arrays on the mesh (A = accumulation),
    for every array of `local` (a `bco_jax.data.batch.Batch` or any pytree of arrays). The rows are
    this process's block of the global batch (`data_shard`)."""
    _, blocks = data_shard(mesh)

    def put(value):
        value = np.asarray(value).reshape(accumulation, -1, *np.shape(value)[1:])
        global_shape = (accumulation, value.shape[1] * blocks, *value.shape[2:])
        return jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value, global_shape)

    return jax.tree.map(put, local)


def put_rows(local, mesh):
    """This process's rows [b, ...] -> global [B, ...] jax.Arrays with rows on the batch axes, for
    every array of `local` (any pytree): `put_batch` without the micro-batch axis."""
    _, blocks = data_shard(mesh)

    def put(value):
        value = np.asarray(value)
        sharding = NamedSharding(mesh, PartitionSpec(batch_axes(), *([None] * (value.ndim - 1))))
        return jax.make_array_from_process_local_data(sharding, value, (len(value) * blocks, *value.shape[1:]))

    return jax.tree.map(put, local)


def rounded_to_data(n: int, mesh) -> int:
    """`n` rounded up to a multiple of the data-parallel devices (a batch the mesh can split)."""
    return -(-n // data_parallel_size(mesh)) * data_parallel_size(mesh)


def row_block(n: int, mesh) -> slice:
    """This process's block of n global rows (its `data_shard`): the rows `put_rows` takes from it."""
    shard, shards = data_shard(mesh)
    return slice(shard * n // shards, (shard + 1) * n // shards)


def local_rows(x, mesh) -> np.ndarray:
    """This process's block of a global [B, ...] array's rows, as NumPy (the rows `put_rows` took
    from it): read from the shards this process holds, or gathered when it does not hold them all."""
    shard, blocks = data_shard(mesh)
    b = x.shape[0] // blocks
    first, out, covered = shard * b, np.empty((b, *x.shape[1:]), x.dtype), np.zeros(b, bool)
    for piece in x.addressable_shards:
        rows, rest = piece.index[0], piece.index[1:]
        r0, r1 = rows.start or 0, x.shape[0] if rows.stop is None else rows.stop
        lo, hi = max(r0, first), min(r1, first + b)
        if lo < hi:
            out[(slice(lo - first, hi - first), *rest)] = np.asarray(piece.data)[lo - r0:hi - r0]
            covered[lo - first:hi - first] = True
    return out if covered.all() else host_gather(x)[first:first + b]


def host_gather(x) -> np.ndarray:
    """A global jax.Array as one NumPy array on every process (its shards may live on other hosts)."""
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
