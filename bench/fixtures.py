"""What the CPU benchmarks share: the random Llama folder and feedback rows both sides read, the
record of the machine a result was measured on, and the one place they lower our train step.

`build_model_dir` writes the model with transformers (so TRL and we load the same folder);
`add_model_args` declares the shape options it reads.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


# ------------------------------------------------------------------------------------ model and data


def add_model_args(p, vocab: int) -> None:
    """The bench model's shape options (`build_model_dir` reads them)."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None, help="default: round(hidden * 2.6875)")
    p.add_argument("--vocab", type=int, default=vocab)


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


# ------------------------------------------------------------------------------------- our step


def step_shape(local):
    """The key a compiled step is valid for: the batch's token array shape and its static `BatchShape`."""
    return (local.scored()[0].input_ids.shape, local.shape)


def lower_step(run, state, reference, device_batch):
    """The run's compiled step lowered for `device_batch` (its shape is part of the batch)."""
    return run.program.step.lower(state, reference, device_batch)


# ---------------------------------------------------------------------------- machine and record


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def step_summary(times, args, extra):
    """Median / min / max of timed steps, and throughput at the median (`args.batch` rows of `args.seq`)."""
    median = statistics.median(times)
    return {"step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
            "step_s_all": times, "examples_per_s": args.batch / median,
            "tokens_per_s": args.batch * args.seq / median, **extra}


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
