"""`python -m bco_jax.online` keeping only the newest KEEP checkpoints (the loop keeps every round's;
a full fine-tune of 135M parameters writes 1.6 GB of state per round, which 40 rounds x 2 methods
would not leave room for on the GPU machine's 64 GiB disk).

    python -m experiments.real.keep_checkpoints [online keys ...]
"""
import functools
import sys

from bco_jax import checkpoint, online

KEEP = 2

if __name__ == "__main__":
    checkpoint.Checkpointer.__init__ = functools.partialmethod(checkpoint.Checkpointer.__init__,
                                                               save_total_limit=KEEP)
    sys.exit(online.main(sys.argv[1:]))
