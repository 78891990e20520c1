"""One process of a 2-process CPU training run (launched by test_multiprocess.py).

argv: process_id port output_dir then trainer flags. 4 CPU devices per process, 8 in all.
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           initialization_timeout=120)

from bco_jax import train  # noqa: E402
from bco_jax.config import parse_args  # noqa: E402

train.run(parse_args(sys.argv[3:]))
