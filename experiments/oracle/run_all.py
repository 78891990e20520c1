"""The evidence runs: every method tuned on equal terms on an oracle task, then compared over seeds.

    .venv/bin/python -m experiments.oracle.run_all --task arithmetic   # the whole protocol (resumable)
    .venv/bin/python -m experiments.oracle.run_all --task interval
    .venv/bin/python -m experiments.oracle.run_all --task arithmetic --report   # tables, plots
    .venv/bin/python -m experiments.oracle.run_all --task arithmetic --check    # pinned verdicts still hold
    .venv/bin/python -m experiments.oracle.run_all --task arithmetic --quick    # smoke, under /tmp

The protocol, identical for every method (`protocol.py` has the settings):
1. grid: each base method (DPO, IPO, NCA on pairs; BCO on the pairs read unpaired; BCO, BCE, KTO on
   thumbs-up/down; BCO on Likert) at every learning rate of the grid, the same trials each, scored
   by oracle success on the VALIDATION prompts (the held-out-feedback prompts, disjoint from the test
   prompts and from training). A method whose best rate is at an edge of the grid gets the next rate
   beyond that edge, until its best is inside.
2. test: every method at its selected rate (variants at their base method's), seeds 0-4, scored on
   the TEST prompts (success, KL to SFT, held-out implicit-reward accuracy and AUC, training curve).
3. beta: BCO and BCE at beta 0.05 and 0.3 (0.1 is phase 2's), at their selected rates, seeds 0-2.
4. mismatch (arithmetic only): BCO with and without UDM at three prompt-mismatch strengths, at BCO's
   selected rate, seeds 0-4.
A seed fixes the data order and the scoring samples, so runs of one seed are paired (common random
numbers). Every run is one line of results.json; rerunning the command skips the finished ones.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

from experiments.oracle import protocol as P

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

log = logging.getLogger("run_all")


# ------------------------------------------------------------------------------------- training


def train_args(task: P.Task, run: dict, steps: int, run_dir: str) -> list[str]:
    method = task.methods[run["method"]]
    batch = P.SEQUENCES_PER_STEP // (2 if method.keys["loss_type"] in P.PAIRED_LOSSES else 1)
    values = {"model": task.model_dir, "train_data": os.path.join(task.feedback_dir, method.data),
              "output_dir": run_dir, "seed": run["seed"], "max_steps": steps, "batch_size": batch,
              "learning_rate": run["lr"], "beta": run["beta"], "warmup_ratio": P.WARMUP_RATIO,
              "lr_scheduler_type": P.SCHEDULE, "max_length": P.MAX_LENGTH, "logging_steps": 10,
              "tensorboard": False, "export_hf": True, "save_reference": False, **method.keys}
    return [x for k, v in values.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def read_curve(run_dir: str) -> list[dict]:
    from bco_jax.run_dir import RunDir

    rows = []
    with open(RunDir(run_dir).metrics, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                rows.append({"step": rec["step"], **{k: float(f"{rec[k]:.5g}") for k in P.CURVE_KEYS
                                                     if rec.get(k) is not None}})
    return rows


# -------------------------------------------------------------------------------------- scoring


class Scorer:
    """Everything a run is scored with, loaded once: tokenizer, reference, prompts and feedback."""

    def __init__(self, task: P.Task, work: str):
        from flax import nnx
        from transformers import AutoTokenizer

        from bco_jax.data import DataConfig, load_dataset
        from bco_jax.models import load_hf

        self.task, self.nnx, self.load_hf = task, nnx, load_hf
        self.tokenizer = AutoTokenizer.from_pretrained(task.model_dir)
        self.reference = nnx.split(load_hf(task.model_dir))
        splits = task.module.split_prompts()
        self.test_prompts, self.val_prompts = splits["eval"], splits["heldout_feedback"]
        self.cfg = DataConfig(max_length=P.MAX_LENGTH, shuffle=False)
        # scoring.sample_and_score reads its prompts from a labelled dataset: the test prompts with a
        # placeholder answer (labels are not used for sampling).
        prompt_file = os.path.join(work, f"{task.name}_test_prompts_as_feedback.jsonl")
        with open(prompt_file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"prompt": p, "completion": "0", "label": True}) + "\n" for p in self.test_prompts)
        self.prompt_data = load_dataset([prompt_file], self.tokenizer, self.cfg, require_both_classes=False)
        self.feedback = load_dataset([os.path.join(task.feedback_dir, "eval_binary.jsonl")], self.tokenizer,
                                     self.cfg, require_both_classes=False)

    def _success(self, model, prompts, seed: int, samples: int) -> dict:
        import jax

        from bco_jax.oracle import sampling

        rate = sampling.success_rate(model, self.tokenizer, prompts, jax.random.key(seed),
                                     samples_per_prompt=samples, task=self.task.module)
        return {k: v for k, v in rate.items() if k != "n"} | {"success_samples": rate["n"]}

    def validation(self, model_dir: str, seed: int) -> dict:
        """Oracle success on the validation prompts: the grid's selection score."""
        model = self.load_hf(model_dir)
        return {f"val_{k}": v for k, v in self._success(model, self.val_prompts, seed, P.VAL_SAMPLES).items()}

    def test(self, model_dir: str, seed: int, beta: float, delta: float) -> dict:
        return self.test_model(self.load_hf(model_dir), seed, beta, delta)

    def test_model(self, model, seed: int, beta: float, delta: float, heldout: bool = True) -> dict:
        """`test` of a model in memory; `heldout` False: success and KL only (a point of a curve)."""
        from bco_jax import scoring

        policy = self.nnx.split(model)
        out = self._success(model, self.test_prompts, seed, P.TEST_SAMPLES)
        kls, oracle_rewards, n = [], [], 0
        for k in range(P.TEST_SAMPLES):
            sampled, _ = scoring.sample_and_score(
                self.prompt_data, self.tokenizer, policy, self.reference, num_prompts=len(self.test_prompts),
                max_new_tokens=P.MAX_NEW_TOKENS, temperature=1.0, top_p=1.0,
                batch_size=len(self.test_prompts), seed=1000 * seed + k, reward_fn=self.task.module.reward,
                eos_ids=(self.tokenizer.eos_token_id,))
            kls.append(sampled["kl"] * sampled["samples"])
            oracle_rewards.append(sampled["oracle_reward"] * sampled["samples"])
            n += sampled["samples"]
        out.update(kl=sum(kls) / n, kl_samples=n, kl_sample_success=sum(oracle_rewards) / n)
        if not heldout:
            return out
        fb = scoring.feedback_metrics(self.feedback, self.cfg, policy, self.reference, beta, delta, 200)
        out.update({f"heldout_{k}": v for k, v in fb.items()})
        return out


# ----------------------------------------------------------------------------------------- runs


def environment(started: float) -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    import jax

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8")
                if line.startswith("model name")), platform.processor()) if os.path.exists("/proc/cpuinfo") else ""
    return {"commit": git("rev-parse", "HEAD"), "dirty_files": git("status", "--porcelain", "--", "bco_jax"),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "cpus": len(os.sched_getaffinity(0)), "cpu": cpu, "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}


def one_run(task: P.Task, run: dict, steps: int, scorer: Scorer, work: str) -> dict:
    from bco_jax import train
    from bco_jax.config import parse_args
    from bco_jax.run_dir import RunDir

    run_dir = os.path.join(work, f"{task.name}_{P.run_key(run)}".replace(" ", "_"))
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = train_args(task, run, steps, run_dir)
    record = dict(run, what=task.methods[run["method"]].what, argv=argv)
    try:
        t0 = time.perf_counter()
        final = train.fit(parse_args(argv))
        record["train_seconds"] = time.perf_counter() - t0
        with open(RunDir(run_dir).final_state, encoding="utf-8") as f:
            state = json.load(f)
        t0 = time.perf_counter()
        hf = RunDir(run_dir).hf
        if run["phase"] == "grid":
            record.update(scorer.validation(hf, run["seed"]))
        else:
            record.update(scorer.test(hf, run["seed"], state["beta"], state["delta"]))
        record["score_seconds"] = time.perf_counter() - t0
        record.update(delta=state["delta"], curve=read_curve(run_dir), status="ok",
                      final_train={k: v for k, v in final.items() if isinstance(v, (int, float))})
    except Exception as err:
        record.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        log.error("%s failed:\n%s", P.run_key(run), record["traceback"])
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return record


class Results:
    """results.json: settings, environment(s) and one record per finished run, written atomically after
    every run so that an interrupted protocol resumes where it stopped."""

    def __init__(self, path: str, settings: dict, fresh: bool):
        self.path, self.started = path, time.time()
        self.data = {"settings": settings, "environments": [], "runs": []}
        if os.path.exists(path) and not fresh:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if old.get("settings") != settings:
                raise SystemExit(f"error: {path} was made with other settings; pass --fresh to start over "
                                 f"(or --out elsewhere)")
            self.data["environments"] = old.get("environments", [])
            self.data["runs"] = [r for r in old["runs"] if r.get("status") == "ok"]
        self.data["environments"].append(environment(self.started))
        self.done = {P.run_key(r) for r in self.data["runs"]}

    def add(self, record: dict) -> None:
        self.data["runs"].append(record)
        if record.get("status") == "ok":
            self.done.add(P.run_key(record))
        self.save()

    def save(self) -> None:
        env = self.data["environments"][-1]
        env["wall_seconds"] = time.time() - self.started
        env["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        head = json.dumps({k: v for k, v in self.data.items() if k != "runs"}, indent=1)
        runs = ",\n".join(json.dumps(r, separators=(",", ":")) for r in self.data["runs"])  # a run per line
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            f.write(head[:-2] + ',\n "runs": [\n' + runs + "\n ]\n}\n")
        os.replace(self.path + ".tmp", self.path)


def run_protocol(args) -> dict:
    task = P.TASKS[args.task]()
    os.makedirs(args.work, exist_ok=True)
    results = Results(os.path.join(args.out, "results.json"), P.settings(task, args.config), args.fresh)
    scorer = Scorer(task, args.work)
    cfg = args.config

    def do(run: dict, steps: int) -> None:
        if P.run_key(run) in results.done:
            return
        t0 = time.perf_counter()
        if run["method"] == "sft":  # the reference itself, scored like a run
            rec = dict(run, what="the SFT model (the reference)", status="ok",
                       **scorer.test(task.model_dir, run["seed"], run["beta"], 0.0))
        else:
            rec = one_run(task, run, steps, scorer, args.work)
        score = rec.get("val_success", rec.get("success"))
        print(f"[{time.strftime('%H:%M:%S')}] {task.name} {P.run_key(run)}: {rec['status']}"
              + (f" success {score:.3f}" if rec["status"] == "ok" else f" {rec['error']}")
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        results.add(rec)

    # 1. grid, extended at an edge until every base method's best rate is inside
    for method in P.base_methods(task, cfg):
        while True:
            missing = [P.make_run("grid", method, lr, P.BETA, seed)
                       for lr in P.grid_rates(results.data["runs"], method, cfg) for seed in cfg["grid_seeds"]]
            missing = [run for run in missing if P.run_key(run) not in results.done]
            if not missing:
                break
            for run in missing:
                do(run, cfg["grid_steps"])
    selected = P.selected_rates(results.data["runs"], task, cfg)
    print("selected learning rates:", selected, flush=True)
    # 2-4. test phases, seed-major so that a cut-short protocol still pairs every method on its first seeds
    for seed in cfg["seeds"]:
        do(P.make_run("test", "sft", 0.0, P.BETA, seed), 0)
    for run in P.test_runs(task, selected, cfg):
        do(run, cfg["steps"])
    return results.data


# ------------------------------------------------------------------------------------------ main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="arithmetic", choices=sorted(P.TASKS))
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 rates, 2 methods, 1 seed, 30 steps, results under /tmp")
    p.add_argument("--out", default=None, help="results folder (default experiments/<task>/results)")
    p.add_argument("--plots", default=None, help="PNG folder (default docs/; --quick: the results folder)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bco_oracle_runs"),
                   help="scratch folder for run outputs (each deleted once scored)")
    p.add_argument("--fresh", action="store_true", help="ignore results.json instead of resuming it")
    p.add_argument("--report", action="store_true", help="only rebuild tables and plots from results.json")
    p.add_argument("--check", action="store_true", help="only assert the pinned verdicts on results.json")
    args = p.parse_args(argv)
    args.config = P.quick_config(args.task) if args.quick else P.full_config(args.task)
    default_out = os.path.join(tempfile.gettempdir(), f"bco_{args.task}_quick") if args.quick else \
        os.path.join(REPO, "experiments", args.task if args.task != "arithmetic" else "oracle", "results")
    args.out = args.out or default_out
    args.plots = args.plots or (args.out if args.quick else os.path.join(REPO, "docs"))
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "bco_jax"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = parse(argv)
    import jax

    # Runs of one method differ in constants only where the learning rate or seed enters: most of the
    # ~20 compilations of a run are the same programs as the previous run's, read back from disk.
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.work, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from experiments.oracle import report

    if args.check or args.report:
        with open(os.path.join(args.out, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
        if args.report:
            report.write(results, args.task, args.out, args.plots)
        if args.check:
            lines, failed = report.check(results, args.task)
            print("\n".join(lines))
            return int(failed)
        return 0
    results = run_protocol(args)
    report.write(results, args.task, args.out, args.plots)
    wall = sum(e.get("wall_seconds", 0) for e in results["environments"])
    print(f"{args.task}: {len(results['runs'])} runs, {wall / 60:.1f} min wall over "
          f"{len(results['environments'])} invocation(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
