"""The planner's simulated devices, set up before jax is imported (this module imports nothing of it):
how many the command asks for, and the XLA flags that make them. `python -m bco_jax.plan` calls
`simulate_devices(device_count(argv))` first; its argument parser is a `OneLineParser` too."""
from __future__ import annotations

import argparse
import math
import os
import re

from bco_jax.argv import parse_mesh  # imports nothing of jax
from bco_jax.errors import ConfigError


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are ConfigErrors: `main` prints them as one line, exit 2."""

    def error(self, message):
        raise ConfigError(message)


def device_count(argv: list[str]) -> int:
    """--devices (> 0), else the product of a fully given --mesh; read before jax is imported
    (`bco_jax.argv` imports nothing of it)."""
    pre = OneLineParser(add_help=False)
    pre.add_argument("--mesh", default="1,-1,1")
    pre.add_argument("--devices", type=int, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.devices is not None and known.devices < 1:
        raise ConfigError(f"devices: must be > 0 (got {known.devices})")
    if known.devices or {"-h", "--help"} & set(argv):
        return known.devices or 1
    mesh = parse_mesh(known.mesh)
    if -1 in mesh:
        raise ConfigError("mesh: has a -1: give --devices N (how many devices to plan for)")
    return math.prod(mesh)


def simulate_devices(n: int) -> None:
    """N host CPU devices for the compile. Only effective before jax is imported."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    # XLA CPU has no bfloat16 matmul: it converts the weights to float32, and loop-invariant code
    # motion lifts that conversion out of the layer scan, a float32 copy of every layer's weights at
    # once that a GPU / TPU compile never holds (Llama-3.2-1B LoRA: 6.24 GiB of temporaries with it,
    # 2.34 without; 2.42 at --dtype float32, where nothing is converted). The plan compiles without it.
    if "--xla_disable_hlo_passes" not in flags:
        flags += " --xla_disable_hlo_passes=while-loop-invariant-code-motion"
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ warnings (SPMD remarks) off unless asked
