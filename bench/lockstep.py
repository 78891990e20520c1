"""Two benchmark sides in two processes, stepped alternately so that load from other users of a shared
machine hits both alike.

The driver starts each side as `python -m <module> --_side <side> ...` (the module's CLI runs one
side and writes its result to a JSON file). With lock-step, two pipes per child carry one byte per
event: the child says "ready" once set up, then waits for a go before each step and says "done"
after it (`Gate` is the child's end, `Child` the driver's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from bench.fixtures import ROOT


class Gate:
    """A child's side of lock-step: say ready, then wait for a go before each step and say done after.
    Without a gate (sequential runs) every call returns at once."""

    def __init__(self, spec):
        self.go, self.done = (int(x) for x in spec.split(",")) if spec else (None, None)

    def signal(self):
        if self.done is not None:
            os.write(self.done, b"x")

    def wait(self):
        if self.go is not None and not os.read(self.go, 1):
            raise SystemExit("lock-step: the driver went away")


def child_env(args):
    """One CPU device for XLA; torch's threads as `--threads` and `--omp-wait-policy` say."""
    return dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
                XLA_FLAGS="--xla_force_host_platform_device_count=1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY=args.omp_wait_policy)


class Child:
    """One side in its own process (`python -m module`); with `lockstep`, steps only when told (see Gate)."""

    def __init__(self, module, side, args, work, lockstep):
        self.out = os.path.join(work["dir"], f"{side}.json")
        cmd = [sys.executable, "-m", module, "--_side", side, "--_work", json.dumps(work),
               "--_out", self.out, *args.passthrough]
        self.t0, fds = time.perf_counter(), ()
        if lockstep:
            go_r, self.go_w = os.pipe()
            self.done_r, done_w = os.pipe()
            cmd += ["--_gate", f"{go_r},{done_w}"]
            fds = (go_r, done_w)
        self.proc = subprocess.Popen(cmd, env=child_env(args), cwd=ROOT, pass_fds=fds)
        for fd in fds:
            os.close(fd)

    def wait_signal(self):
        if not os.read(self.done_r, 1):
            raise RuntimeError(f"{self.out}: the child exited early (code {self.proc.wait()})")

    def step(self):
        os.write(self.go_w, b"x")
        self.wait_signal()

    def release(self):
        """Let the child run the rest of its work without waiting for further steps."""
        os.write(self.go_w, b"x")

    def finish(self):
        if self.proc.wait():
            raise RuntimeError(f"{self.out}: the child failed (code {self.proc.returncode})")
        with open(self.out) as f:
            result = json.load(f)
        result["wall_s"] = time.perf_counter() - self.t0
        return result


def run_sides(module, args, work):
    """Sequential: one side after the other. Lock-step: both alive, TRL's step i then ours, so a
    change of load on a shared machine hits both alike; each side compiles / sets up alone first."""
    sides = ["ours", "trl"] if args.side == "both" else [args.side]
    if not args.lockstep or len(sides) == 1:
        return {side: Child(module, side, args, work, False).finish() for side in sides}
    ours = Child(module, "ours", args, work, True)
    ours.wait_signal()  # compiled, at its first step
    trl = Child(module, "trl", args, work, True)
    trl.wait_signal()
    for _ in range(args.warmup + args.steps):
        trl.step()
        ours.step()
    result = {"trl": trl.finish()}
    ours.release()  # its untimed extras (pipelined steps, parts) alone
    result["ours"] = ours.finish()
    return result
