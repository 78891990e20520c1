"""Steady-state training throughput: our BCO train step against TRL 1.13.0's BCOTrainer, one CPU run.

Both sides start from one random LlamaForCausalLM folder written by transformers (with a word-level
tokenizer whose vocabulary is exactly the model's), read the same unpaired feedback rows in file order
(every row exactly `--seq` tokens: BOS + prompt, completion + EOS, no padding), and take the same AdamW
steps in float32 with a live reference model and no activation checkpointing:

  ours  the jitted `bco_jax.step.train_step` as `bco_jax.build.build` makes it (mesh 1,1,1, one CPU device,
        reward_shift=ema, state donated), timed per step from the host batch to the finished step:
        `put_batch` (host -> device) + the step + block_until_ready. Compilation (trace + XLA
        compile, done ahead of time) is timed separately and XLA's memory analysis is reported.
  trl   BCOTrainer (torch CPU float32, bf16 off, activation_checkpointing off, optim adamw_torch),
        timed by a TrainerCallback from on_step_begin to on_step_end: forward of policy and
        reference, backward, clipping, optimizer and scheduler step. The Trainer fetches and collates
        the step's batch before on_step_begin, so data loading is outside the timed window.

Each side runs in its own subprocess (clean peak RSS, no shared thread pools), one after the other;
both get the same number of intra-op threads (`--threads`, default: the CPUs this process may use).
Throughput is the median over `--steps` timed steps after `--warmup` untimed ones. Because the CPUs
may be shared, the meaningful number is the ratio ours / TRL measured in the same run.

    .venv/bin/python bench/bench_train_step.py                 # defaults: 4 layers, hidden 256, batch 8, seq 128
    .venv/bin/python bench/bench_train_step.py --layers 2 --steps 10 --no-save

Writes bench/results/train_step-<UTC time>.json and .md (and prints the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


# ------------------------------------------------------------------------------------ shared inputs


def build_model_dir(path, args):
    """A random Llama saved by transformers + a word-level tokenizer with exactly `vocab` ids."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"w{i}": len(SPECIAL) + i for i in range(args.vocab - len(SPECIAL))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                     eos_token="</s>", unk_token="<unk>")
    hf_tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(2 * args.seq, 256),
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def write_rows(path, args, n_rows):
    """Unpaired rows, both classes in every batch; prompt + completion = seq tokens with BOS/EOS."""
    import numpy as np

    rng = np.random.default_rng(0)
    n_prompt = args.seq // 2 - 1  # + BOS
    n_completion = args.seq - args.seq // 2 - 1  # + EOS
    def words(n):
        return " ".join(f"w{i}" for i in rng.integers(0, args.vocab - len(SPECIAL), n))
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_rows):
            f.write(json.dumps({"prompt": words(n_prompt), "completion": " " + words(n_completion),
                                "label": bool(i % 2 == 0)}) + "\n")


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _summary(times, args, extra):
    median = statistics.median(times)
    return {"step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
            "step_s_all": times, "examples_per_s": args.batch / median,
            "tokens_per_s": args.batch * args.seq / median, **extra}


# --------------------------------------------------------------------------------------- our side


def setup_ours(args, work):
    """Our run as `python -m bco_jax.train` builds it (`bco_jax.build.build`), and its host batches."""
    import jax

    from bco_jax.build import build, initial_state, precompute
    from bco_jax.config import parse_args
    from bco_jax.precompute import attach_tables

    total = args.warmup + args.steps
    cfg = parse_args([
        "--model", work["model"], "--train_data", work["data"], "--batch_size", str(args.batch),
        "--max_steps", str(total), "--learning_rate", str(args.lr), "--warmup_ratio", "0",
        "--max_grad_norm", "1.0", "--loss_type", "bco", "--reward_shift", "ema", "--shuffle", "false",
        "--mesh", "1,1,1", "--dtype", "float32", "--ref_dtype", "float32", "--remat", args.remat,
        "--max_length", str(args.seq), "--length_buckets", str(args.seq),
        "--precompute_ref_log_probs", str(args.precompute).lower()])
    run = build(cfg, output_dir=os.path.join(work["dir"], "ours"))
    tables = precompute(run)  # with --precompute: one reference pass, outside the timed steps
    if tables.ref_table is not None:
        run = dataclasses.replace(run, reference=None)
    # Host batches made up front: the pipeline is not what is measured.
    batches = [attach_tables(next(run.iterator), tables.ref_table) for _ in range(total)]
    first = batches[0]
    assert first["input_ids"].shape == (args.batch, args.seq), first["input_ids"].shape
    assert int(first["attention_mask"].sum()) == args.batch * args.seq, "rows must fill seq exactly"
    state = initial_state(run)
    jax.block_until_ready((state, run.reference))
    return run, state, batches


def run_ours(args, work, gate):
    import jax

    from bco_jax.build import completion_capacity
    from bco_jax.sharding import put_batch

    run, state, batches = setup_ours(args, work)
    reference = run.reference
    rss_setup = _peak_rss_mib()

    example = put_batch(batches[0], run.mesh)
    t0 = time.perf_counter()
    lowered = run.step_fn.lower(state, reference, example, completion_capacity(batches[0]))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    memory = {k: int(getattr(mem, k, 0) or 0) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
        "generated_code_size_in_bytes")}
    memory["peak_estimate_bytes"] = memory["argument_size_in_bytes"] + memory["temp_size_in_bytes"]
    rss_compiled = _peak_rss_mib()

    times, losses = [], []
    gate.signal()  # ready
    for i, local in enumerate(batches):
        gate.wait()
        start = time.perf_counter()
        state, metrics = compiled(state, reference, put_batch(local, run.mesh))
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - start
        gate.signal()
        losses.append(float(metrics["loss"]))
        if i >= args.warmup:
            times.append(elapsed)
    gate.wait()  # the rest alone: TRL has finished
    # The trainer does not block per step (it reads step N-1's metrics while step N runs): the same
    # steps again, pipelined, as a second number.
    start = time.perf_counter()
    pending = None
    for local in batches[args.warmup:]:
        state, metrics = compiled(state, reference, put_batch(local, run.mesh))
        if pending is not None:
            float(pending["loss"])
        pending = metrics
    jax.block_until_ready((state, pending))
    pipelined = (time.perf_counter() - start) / args.steps

    parts = measure_parts(args, run.graphdef, run.ref_graphdef, state.params, reference,
                          put_batch(batches[0], run.mesh)) if args.parts and reference is not None else {}
    return _summary(times, args, {
        "compile_s": {"trace_lower": t1 - t0, "xla_compile": t2 - t1},
        "pipelined_step_s_mean": pipelined, "examples_per_s_pipelined": args.batch / pipelined,
        "xla_memory": memory, "peak_rss_mib": {"after_setup": rss_setup, "after_compile": rss_compiled,
                                               "end": _peak_rss_mib()},
        "losses": losses, "threads": {"xla_cpu_devices": len(jax.devices()),
                                      "cpus_allowed": len(os.sched_getaffinity(0))},
        "parts": parts, "devices": [str(d) for d in jax.devices()]})


def measure_parts(args, graphdef, ref_graphdef, params, reference, batch, repeats=5):
    """Where a step's time goes: jitted pieces of it on the same batch, median of `repeats`."""
    import jax
    from flax import nnx

    from bco_jax.models import sequence_logps

    mb = {k: v[0] for k, v in batch.items()}

    def logps(gd, p, chunk_tokens):
        out, _ = sequence_logps(nnx.merge(gd, p), mb["input_ids"], mb["attention_mask"], mb["loss_mask"],
                                chunk_tokens=chunk_tokens)
        return out.sum()

    whole = args.batch * args.seq  # one chunk: no rematerialised LM head
    fns = {
        "reference_forward": jax.jit(lambda p: logps(ref_graphdef, p, 512)),
        "policy_value_and_grad": jax.jit(jax.value_and_grad(lambda p: logps(graphdef, p, 512))),
        "policy_value_and_grad_one_chunk": jax.jit(jax.value_and_grad(lambda p: logps(graphdef, p, whole))),
    }
    inputs = {"reference_forward": reference}
    out = {}
    for name, fn in fns.items():
        x = inputs.get(name, params)
        jax.block_until_ready(fn(x))
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(x))
            ts.append(time.perf_counter() - t)
        out[name + "_s"] = statistics.median(ts)
    return out


# --------------------------------------------------------------------------------------- TRL side


def run_trl(args, work, gate):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.bco import BCOConfig, BCOTrainer

    torch.set_num_threads(args.threads)
    total = args.warmup + args.steps
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work["model"])
    bco_args = BCOConfig(
        output_dir=os.path.join(work["dir"], "trl"), per_device_train_batch_size=args.batch, max_steps=total,
        learning_rate=args.lr, logging_steps=1, bf16=False, fp16=False, use_cpu=True, report_to=[],
        save_strategy="no", warmup_steps=0, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", activation_checkpointing=False, gradient_accumulation_steps=1, beta=0.1,
        precompute_ref_log_probs=args.precompute,
        max_length=args.seq, seed=42, dataloader_num_workers=0, disable_tqdm=True)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t = [], None

        def on_step_begin(self, *a, **k):
            if not self.times:
                gate.signal()  # ready
            gate.wait()
            self._t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._t)
            gate.signal()

    timer = StepTimer()
    trainer = BCOTrainer(model=model, ref_model=ref_model, args=bco_args,
                         train_dataset=Dataset.from_list(read_rows(work["data"])), processing_class=tokenizer,
                         callbacks=[timer])
    lengths = {len(x) for x in trainer.train_dataset["completion_input_ids"]}
    assert lengths == {args.seq}, f"TRL sequences are {lengths} tokens, not {args.seq}"
    rss_setup = _peak_rss_mib()
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(timer.times) == total, len(timer.times)
    return _summary(timer.times[args.warmup:], args, {
        "first_step_s": timer.times[0], "losses": losses,
        "peak_rss_mib": {"after_setup": rss_setup, "end": _peak_rss_mib()},
        "threads": {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads()},
        "attn_implementation": model.config._attn_implementation})


# ------------------------------------------------------------------------------------- lock-step


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


# ------------------------------------------------------------------------------------------ driver


def machine_info():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"nproc": os.cpu_count(), "cpus_allowed": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "platform": platform.platform(), "python": platform.python_version()}


def versions():
    from importlib.metadata import version

    return {p: version(p) for p in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl", "numpy")}


def git_commit():
    try:
        rev = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD", "--", "bco_jax"], cwd=ROOT) != 0
        return rev + ("+dirty(bco_jax)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def child_env(args):
    return dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
                XLA_FLAGS="--xla_force_host_platform_device_count=1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY=args.omp_wait_policy)


class Child:
    """One side in its own process; with `lockstep`, steps only when told (see Gate)."""

    def __init__(self, side, args, work, lockstep):
        self.out = os.path.join(work["dir"], f"{side}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--_side", side, "--_work", json.dumps(work),
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

    def finish(self):
        if self.proc.wait():
            raise RuntimeError(f"{self.out}: the child failed (code {self.proc.returncode})")
        with open(self.out) as f:
            result = json.load(f)
        result["wall_s"] = time.perf_counter() - self.t0
        return result


def run_sides(args, work):
    """Sequential: one side after the other. Lock-step: both alive, TRL's step i then ours, so a
    change of load on a shared machine hits both alike; each side compiles / sets up alone first."""
    sides = ["ours", "trl"] if args.side == "both" else [args.side]
    if not args.lockstep or len(sides) == 1:
        return {side: Child(side, args, work, False).finish() for side in sides}
    ours = Child("ours", args, work, True)
    ours.wait_signal()  # compiled, at its first step
    trl = Child("trl", args, work, True)
    trl.wait_signal()
    for _ in range(args.warmup + args.steps):
        trl.step()
        ours.step()
    result = {"trl": trl.finish()}
    os.write(ours.go_w, b"x")  # its untimed extras (pipelined steps, parts) alone
    result["ours"] = ours.finish()
    return result


def markdown(rec):
    o, t, a = rec["ours"], rec["trl"], rec["args"]
    def mib(b):
        return f"{b / 2**20:.1f} MiB"
    lines = [
        f"# train step: bco-jax vs TRL {rec['versions']['trl']} BCOTrainer ({rec['time_utc']})", "",
        f"Llama {a['layers']} layers, hidden {a['hidden']}, {a['heads']} heads / {a['kv_heads']} kv, "
        f"intermediate {a['intermediate']}, vocab {a['vocab']}; batch {a['batch']} x {a['seq']} tokens; "
        f"float32, {'precomputed reference log-probs' if a.get('precompute') else 'live reference'}, "
        f"ours remat={a['remat']}, TRL activation checkpointing off; "
        f"median of {a['steps']} steps after {a['warmup']} warm-up; "
        + ("sides in lock-step (TRL's step i, then ours; each in its own process). " if a["lockstep"]
           else "sides one after the other. ")
        + f"Threads: {a['threads']} torch intra-op (OMP_WAIT_POLICY={a['omp_wait_policy']}); "
        f"XLA's CPU pool uses the {rec['machine']['cpus_allowed']} CPUs.",
        "",
        "| | step (median) | examples/s | tokens/s | min / max step | compile |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| ours (jax {rec['versions']['jax']}) | {o['step_s_median'] * 1e3:.1f} ms | {o['examples_per_s']:.2f} | "
        f"{o['tokens_per_s']:.0f} | {o['step_s_min'] * 1e3:.0f} / {o['step_s_max'] * 1e3:.0f} ms | "
        f"{o['compile_s']['trace_lower']:.2f} s trace + {o['compile_s']['xla_compile']:.2f} s XLA |",
        f"| TRL (torch {rec['versions']['torch']}) | {t['step_s_median'] * 1e3:.1f} ms | {t['examples_per_s']:.2f} | "
        f"{t['tokens_per_s']:.0f} | {t['step_s_min'] * 1e3:.0f} / {t['step_s_max'] * 1e3:.0f} ms | "
        f"none (first step {t['first_step_s'] * 1e3:.0f} ms) |",
        "",
        f"**ours / TRL, examples/s: {rec['ratio_examples_per_s']:.2f}x**"
        + (f" (median of {len(rec['ratio_by_round'])} rounds: " + ", ".join(f"{x:.2f}" for x in rec["ratio_by_round"])
           + "; the table shows round 1)" if len(rec["ratio_by_round"]) > 1 else "") + " "
        f"(ours pipelined as the trainer runs it, no per-step block: "
        f"{o['examples_per_s_pipelined']:.2f} examples/s, "
        f"{o['examples_per_s_pipelined'] / t['examples_per_s']:.2f}x).",
        "",
        f"Memory. Ours, XLA memory analysis of the compiled step: arguments "
        f"{mib(o['xla_memory']['argument_size_in_bytes'])}, temporaries {mib(o['xla_memory']['temp_size_in_bytes'])}, "
        f"outputs {mib(o['xla_memory']['output_size_in_bytes'])} "
        f"(aliased {mib(o['xla_memory']['alias_size_in_bytes'])}); "
        f"peak RSS {o['peak_rss_mib']['after_setup']:.0f} MiB after setup, {o['peak_rss_mib']['after_compile']:.0f} "
        f"after compile, {o['peak_rss_mib']['end']:.0f} at the end. "
        f"TRL: peak RSS {t['peak_rss_mib']['after_setup']:.0f} MiB after setup, {t['peak_rss_mib']['end']:.0f} "
        "at the end "
        f"(+{t['peak_rss_mib']['end'] - t['peak_rss_mib']['after_setup']:.0f} MiB while training).",
        "",
        f"Losses, first / last step: ours {o['losses'][0]:.4f} / {o['losses'][-1]:.4f}, "
        f"TRL {t['losses'][0]:.4f} / {t['losses'][-1]:.4f}.",
    ]
    if o.get("parts"):
        p = o["parts"]
        lines += ["", "Parts of our step on the same batch (separately jitted, median of 5): "
                  + ", ".join(f"{k[:-2]} {v * 1e3:.1f} ms" for k, v in p.items()) + "."]
    m = rec["machine"]
    lines += ["", f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['platform']}, Python {m['python']}. "
              f"Load average (1/5/15 min) before {rec['load_before']}, after {rec['load_after']}. "
              f"Commit {rec['git_commit']}. Command: `{rec['command']}`. Wall time {rec['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def add_model_args(p, vocab: int) -> None:
    """The bench model's shape options (`build_model_dir` reads them)."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None, help="default: round(hidden * 2.6875)")
    p.add_argument("--vocab", type=int, default=vocab)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p, vocab=4096)
    p.add_argument("--seq", type=int, default=128, help="tokens per row: prompt seq/2 (BOS incl.) + completion")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch intra-op threads (XLA's CPU pool uses every allowed CPU)")
    p.add_argument("--remat", default="none", choices=["none", "full", "save_dots"],
                   help="our rematerialisation (TRL's activation checkpointing stays off; none is the like-for-like)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"],
                   help="OpenMP wait policy of torch's threads; ACTIVE (spinning) collapses on a shared machine")
    p.add_argument("--parts", action=argparse.BooleanOptionalAction, default=True,
                   help="also time pieces of our step (reference forward, policy value_and_grad)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole comparison this many times; the ratio is the median over rounds")
    p.add_argument("--lockstep", action=argparse.BooleanOptionalAction, default=True,
                   help="alternate the sides step by step (TRL's step i, then ours) instead of one after the other")
    p.add_argument("--side", choices=["both", "ours", "trl"], default="both")
    p.add_argument("--precompute", action=argparse.BooleanOptionalAction, default=False,
                   help="both sides precompute reference log-probs before training (no reference in the step)")
    p.add_argument("--no-save", action="store_true", help="print only, write nothing to the results folder")
    p.add_argument("--results", default=RESULTS, help="folder for the JSON and Markdown results")
    p.add_argument("--_side", help=argparse.SUPPRESS)
    p.add_argument("--_work", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("--_gate", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.intermediate is None:
        args.intermediate = round(args.hidden * 2.6875)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args._side:  # a child: one side, result to a file
        work = json.loads(args._work)
        result = {"ours": run_ours, "trl": run_trl}[args._side](args, work, Gate(args._gate))
        with open(args._out, "w") as f:
            json.dump(result, f)
        return 0

    args.passthrough = argv  # the children read the model options; they save nothing
    start = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_train_step-") as tmp:
        work = {"dir": tmp, "model": os.path.join(tmp, "model"), "data": os.path.join(tmp, "train.jsonl")}
        build_model_dir(work["model"], args)
        write_rows(work["data"], args, args.batch * (args.warmup + args.steps))
        rounds = [run_sides(args, work) for _ in range(args.rounds)]
    results = rounds[0]
    load_after = os.getloadavg()
    now = datetime.datetime.now(datetime.timezone.utc)
    rec = {
        "time_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python", "bench/bench_train_step.py", *argv]),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("passthrough", "results")},
        "machine": machine_info(), "versions": versions(), "git_commit": git_commit(),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        **results, "wall_s": time.perf_counter() - start,
    }
    if "ours" in results and "trl" in results:
        ratios = [r["ours"]["examples_per_s"] / r["trl"]["examples_per_s"] for r in rounds]
        rec["ratio_examples_per_s"] = statistics.median(ratios)
        rec["ratio_by_round"] = ratios
        rec["later_rounds"] = [{side: {k: r[side][k] for k in ("step_s_median", "examples_per_s", "tokens_per_s")}
                                for side in r} for r in rounds[1:]]
        print(markdown(rec))
    else:
        print(json.dumps(rec, indent=1))
    if not args.no_save:
        os.makedirs(args.results, exist_ok=True)
        stem = os.path.join(args.results, "train_step-" + now.strftime("%Y%m%dT%H%M%SZ"))
        with open(stem + ".json", "w") as f:
            json.dump(rec, f, indent=1)
        if "ratio_examples_per_s" in rec:
            with open(stem + ".md", "w") as f:
                f.write(markdown(rec))
        print(f"wrote {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
