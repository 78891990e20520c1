"""TRL's side of `bench_train_step`: `trl.experimental.bco.BCOTrainer` on torch CPU with the same
hyper-parameters, timed by a TrainerCallback from on_step_begin to on_step_end (the Trainer fetches and
collates a step's batch before on_step_begin, so data loading is outside the timed window)."""

from __future__ import annotations

import os
import time

from bench.fixtures import peak_rss_mib, read_rows, step_summary


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
    rss_setup = peak_rss_mib()
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(timer.times) == total, len(timer.times)
    return step_summary(timer.times[args.warmup:], args, {
        "first_step_s": timer.times[0], "losses": losses,
        "peak_rss_mib": {"after_setup": rss_setup, "end": peak_rss_mib()},
        "threads": {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads()},
        # transformers' own name for the attention kernel a model runs (no public accessor in 5.x)
        "attn_implementation": model.config._attn_implementation})
