"""Meshes over several granules (GPU nodes, TPU slices, CPU processes): `jax.make_mesh` refuses
devices of more than one slice, so `sharding.make_mesh` lays them out with
`create_hybrid_device_mesh`: the granule count goes on data, else fsdp; tensor stays inside one.
Stand-in devices play a 2-node x 8-GPU SLURM job and a 2-process CPU job."""
import jax
import numpy as np
import pytest

from bco_jax import sharding
from bco_jax.errors import ConfigError


class FakeDevice:
    """What mesh_utils reads of a device: id, process_index, platform, device_kind (slice_index
    where the platform has slices); GPUs are ordered by id inside a slice, CPUs as given."""

    def __init__(self, id, process_index, platform="gpu", slice_index=None):
        self.id, self.process_index, self.platform = id, process_index, platform
        self.device_kind = "NVIDIA H100 80GB HBM3" if platform == "gpu" else "cpu"
        if slice_index is not None:
            self.slice_index = slice_index

    def __repr__(self):
        return f"FakeDevice({self.id})"


def gpu_nodes(nodes=2, per_node=8, process_per_gpu=True):
    """`nodes` x `per_node` GPUs, slice_index = node; one process per GPU (or per node)."""
    return [FakeDevice(i, i if process_per_gpu else i // per_node, "gpu", slice_index=i // per_node)
            for i in range(nodes * per_node)]


def cpu_processes(processes=2, per_process=4, slice_index=0):
    """CPU devices: the process is the granule (a multi-process CPU job gives every device
    slice_index 0; one process alone gives none)."""
    return [FakeDevice(i, i // per_process, "cpu", slice_index) for i in range(processes * per_process)]


def ids(array):
    return np.vectorize(lambda d: d.id)(array)


@pytest.fixture
def no_make_mesh(monkeypatch):
    """jax.make_mesh refuses multi-slice devices: it must never see them."""
    def refuse(*args, **kwargs):
        raise AssertionError("jax.make_mesh received devices of several granules")
    monkeypatch.setattr(jax, "make_mesh", refuse)


def test_fsdp_spans_nodes_each_node_a_contiguous_half():
    array = sharding.hybrid_device_array([1, 16, 1], gpu_nodes())
    assert array.shape == (1, 16, 1)
    fsdp = ids(array)[0, :, 0]
    assert sorted(fsdp[:8]) == list(range(8)) and sorted(fsdp[8:]) == list(range(8, 16))
    assert [d.slice_index for d in array.flat] == [0] * 8 + [1] * 8


def test_data_is_the_nodes():
    array = sharding.hybrid_device_array([2, 8, 1], gpu_nodes())
    assert array.shape == (2, 8, 1)
    assert [{d.slice_index for d in row.flat} for row in array] == [{0}, {1}]
    np.testing.assert_array_equal(ids(array)[:, :, 0], np.arange(16).reshape(2, 8))


def test_granules_go_on_data_else_fsdp_never_tensor():
    assert sharding.split_mesh([2, 8, 1], 2) == ([1, 8, 1], [2, 1, 1])
    assert sharding.split_mesh([4, 2, 2], 2) == ([2, 2, 2], [2, 1, 1])
    assert sharding.split_mesh([1, 16, 1], 2) == ([1, 8, 1], [1, 2, 1])
    assert sharding.split_mesh([3, 8, 2], 4) == ([3, 2, 2], [1, 4, 1])
    assert sharding.split_mesh([1, 1, 16], 2) is None


def test_tensor_across_nodes_is_a_one_line_refusal(no_make_mesh):
    with pytest.raises(ConfigError) as err:
        sharding.make_mesh((1, 1, 16), gpu_nodes())
    assert str(err.value) == ("mesh: [1, 1, 16] over 2 nodes: tensor cannot span nodes; put the nodes on data "
                              "or fsdp (e.g. 2,1,8)")


def test_unequal_slices_are_refused():
    devices = gpu_nodes()[:12]  # node 0: 8 GPUs, node 1: 4
    with pytest.raises(ConfigError, match=r"^mesh: \[2, 6, 1\] over 2 nodes needs 6 devices in each, have 4/8$"):
        sharding.hybrid_device_array([2, 6, 1], devices)


def test_make_mesh_over_nodes_never_calls_jax_make_mesh(no_make_mesh):
    mesh = sharding.make_mesh("1,-1,1", gpu_nodes())
    assert dict(mesh.shape) == {"data": 1, "fsdp": 16, "tensor": 1}
    assert [d.slice_index for d in mesh.devices.flat] == [0] * 8 + [1] * 8


def test_build_mesh_smaller_than_the_machine_keeps_every_node_equal(monkeypatch, no_make_mesh):
    # 2 nodes, one process per node driving its 8 GPUs; a 1,8,1 mesh takes the first 4 of each.
    monkeypatch.setattr(jax, "devices", lambda: gpu_nodes(process_per_gpu=False))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    mesh = sharding.build_mesh((1, 8, 1))
    assert [d.id for d in mesh.devices.flat] == [0, 1, 2, 3, 8, 9, 10, 11]


def test_cpu_processes_are_the_granules():
    devices = cpu_processes()
    array = sharding.hybrid_device_array([4, 2, 1], devices)  # data across processes
    assert [{d.process_index for d in row.flat} for row in array] == [{0}, {0}, {1}, {1}]
    np.testing.assert_array_equal(ids(array)[:, :, 0], np.arange(8).reshape(4, 2))  # as jax.make_mesh
    array = sharding.hybrid_device_array([1, 8, 1], devices)  # fsdp across processes
    assert [d.process_index for d in array.flat] == [0] * 4 + [1] * 4
    # One host's processes with tensor across them: jax.make_mesh builds it, as before.
    assert sharding.hybrid_device_array([1, 1, 8], devices) is None
    assert sharding.hybrid_device_array([1, 1, 2], cpu_processes(2, 1)) is None
    bare = sharding.hybrid_device_array([4, 2, 1], cpu_processes(slice_index=None))  # no slice_index at all
    assert [{d.process_index for d in row.flat} for row in bare] == [{0}, {0}, {1}, {1}]


def test_one_granule_keeps_jax_make_mesh():
    assert sharding.hybrid_device_array([1, 8, 1], gpu_nodes(nodes=1)) is None
    assert sharding.hybrid_device_array([2, 2, 2], cpu_processes(1, 8)) is None
    assert sharding.hybrid_device_array([2, 2, 2], jax.devices()) is None
    assert sharding.hybrid_device_array([1, 16, 1], [FakeDevice(i, i // 8, "gpu") for i in range(16)]) is None
    real = sharding.make_mesh((2, 2, 2))
    assert [d.id for d in real.devices.flat] == [d.id for d in jax.devices()]
