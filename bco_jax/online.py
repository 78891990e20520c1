"""`python -m bco_jax.online`: align a policy from live thumbs-up / thumbs-down on its own answers.

Each round samples `num_generations` answers to each of `prompts_per_round` prompts from the current
policy (KV-cache `generate` on the mesh, every process its own rows), has `--judge` label each answer
(`bco_jax.judges`), saves the judged round, then trains `steps_per_round` optimizer steps of the
configured loss on it with the trainer's own step: BCO by default (any unpaired loss on every judged
answer), a paired one (online DPO) on each prompt's best and worst answer, or GRPO on group-relative
advantages (several steps per round: its ratio clipped against the round's sampling policy). The
reward shift delta lives in the train state, so it carries across rounds; the reference stays the
starting policy, or with `sync_ref_model` is mixed toward the policy every `ref_model_sync_steps` steps.

Resume is exact: a round's judged answers are written (rounds/<r>.npz) before it trains, a checkpoint
closes every round, and a rerun of the same command continues from the last checkpoint, reusing the
saved answers of a round that was cut short (a refreshed reference is in the checkpoint too, and
GRPO's old log-probs are recomputed from the round's start). With no arguments it runs an embedded default: the
shipped arithmetic model and its oracle judge, scored before and after (about a CPU minute).

Exit codes as the trainer's (docs/reliability.md): 0 finished, 2 a user error or a failing judge (one
line), 1 a full disk or a bug, 128 + the signal after saving on SIGTERM / Ctrl-C.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bco_jax import checkpoint as ckpt_lib
from bco_jax import files, oracle
from bco_jax.build import Run, build, initial_state, policy_params
from bco_jax.config import TrainConfig, parse_args
from bco_jax.data.dataset import TokenizedDataset
from bco_jax.data.pipeline import BatchIterator
from bco_jax.data.tokenize import decode_answer, pad_token_id
from bco_jax.errors import ConfigError, fault_point, log
from bco_jax.judges import UNJUDGED, load_judge, run_judge
from bco_jax.load import save_model_copies
from bco_jax.losses import GRPO_LOSSES, PAIRED_LOSSES
from bco_jax.losses_online import group_advantages
from bco_jax.metrics import MetricsWriter, Window, truncate_metrics
from bco_jax.models import generate
from bco_jax.models.generate import left_padded
from bco_jax.oracle import demo as oracle_demo
from bco_jax.precompute import attach_tables
from bco_jax.resume import IDENTITY, check_resume, run_identity
from bco_jax.rounds import Prompts, load_prompts, round_dataset, round_prompts
from bco_jax.run_dir import RunDir, check_output_dir, claim_output_dir
from bco_jax.sharding import data_parallel_size, data_shard, host_gather, put_batch, put_rows, row_block, shard_devices
from bco_jax.step_grpo import GrpoBatch, sampling_logps
from bco_jax.train import Preemption, export, flat_config, run_cli

SAMPLES_PER_ROUND = 4  # judged answers per round written to samples.jsonl


def demo_defaults() -> dict:
    """The embedded default: online BCO on the shipped arithmetic model, judged by its oracle."""
    return {"model": oracle.MODEL_DIR, "prompts": [os.path.join(oracle.FEEDBACK_DIR, "train_prompts.jsonl")],
            "judge": "arithmetic", "rounds": 32, "prompts_per_round": 64, "num_generations": 4,
            "steps_per_round": 2, "max_completion_length": 5, "batch_size": 128, "learning_rate": 3e-4,
            "warmup_ratio": 0.1, "lr_scheduler_type": "linear", "beta": 0.1, "loss_type": "bco",
            "max_length": 16, "logging_steps": 1}


# --------------------------------------------------------------------------------------- one round


def sample_round(run: Run, state, prompts: Prompts, judge, r: int) -> dict:
    """Round r's answers, sampled and judged: every process samples and judges its rows, every process
    gets all of them: prompt [N] (indices), tokens / mask [N, max_completion_length], labels [N] int8.
    Row j answers prompt j // K with answer index j % K, whose key is the seed folded with (r, prompt, j % K)."""
    o, tok = run.cfg.online, run.tokenizer
    K, t0 = o.num_generations, time.perf_counter()
    prompt_B = np.repeat(round_prompts(len(prompts.ids), o.prompts_per_round, run.cfg.run.seed, r), K)
    answer_B = np.tile(np.arange(K), o.prompts_per_round)
    mine = row_block(len(prompt_B), run.mesh)
    width = max(len(prompts.ids[p]) for p in prompt_B)  # of the global batch: one shape on every process
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = left_padded([prompts.ids[p] for p in prompt_B[mine]], pad, width)
    model = nnx.merge(run.graphdef, policy_params(run, state))
    eos = tuple(model.config.eos_token_ids) or (tok.eos_token_id,)
    row_ids = np.stack([np.full(len(ids), r), prompt_B[mine], answer_B[mine]], axis=1)
    tokens, gen_mask = generate(model, ids, mask, max_new_tokens=o.max_completion_length, temperature=o.temperature,
                                top_p=o.top_p, rng=jax.random.key(run.cfg.run.seed), eos_ids=eos, pad_id=pad,
                                row_ids=row_ids, mesh=run.mesh)
    t1 = time.perf_counter()
    fault_point("sampled")
    completion_ids = [[int(t) for t in row[m > 0]] for row, m in zip(tokens, gen_mask)]
    completions = []
    for p, answer in zip(prompt_B[mine], completion_ids):
        text = decode_answer(tok, answer, eos)
        completions.append(text if isinstance(prompts.texts[p], str) else [{"role": "assistant", "content": text}])
    columns = {k: [v[p] for p in prompt_B[mine]] for k, v in prompts.columns.items()}
    labels = run_judge(judge, o.judge, o.judge_threshold, prompts=[prompts.texts[p] for p in prompt_B[mine]],
                       completions=completions, completion_ids=completion_ids, columns=columns, timeout=o.judge_timeout)
    t2 = time.perf_counter()
    tokens, gen_mask, labels = (host_gather(x) for x in put_rows((tokens, gen_mask, labels), run.mesh))
    return {"prompt": prompt_B, "answer": answer_B, "tokens": tokens, "mask": gen_mask, "labels": labels,
            "time/sample": t1 - t0, "time/judge": t2 - t1}


@functools.partial(jax.jit, donate_argnums=0)
def mixed_reference(reference, policy, alpha):
    """TRL's reference refresh: alpha x policy + (1 - alpha) x reference, in the reference's dtype. The
    reference is donated (one copy in memory): `Run.reference` is stale after the first refresh."""
    return jax.tree.map(lambda ref, p: (alpha * p + (1 - alpha) * ref.astype(jnp.float32)).astype(ref.dtype),
                        reference, policy)


def train_round(run: Run, state, frozen, data: TokenizedDataset | None, r: int, advantages=None):
    """`steps_per_round` optimizer steps on the round's examples (shuffled per round); (state, frozen,
    metrics). `frozen`: the step's reference argument, refreshed after every ref_model_sync_steps-th
    step with sync_ref_model. `advantages` (GRPO): one per example of `data`, riding in the batch's
    per-example weights; with several steps, each step's ratio is clipped against the policy that
    sampled the round, whose per-token log-probs of every step's batch are computed before the first update."""
    window, kl, o = Window(), None, run.cfg.online
    if data is None:
        log.warning("round %d: nothing to learn from (no answer judged, or no prompt with both a thumbs-up and "
                    "a thumbs-down for a paired loss); no step is taken", r + 1)
        return state, frozen, {}
    shard, shards = data_shard(run.mesh)
    cfg = run.cfg
    iterator = BatchIterator(data, cfg.data, seed=(cfg.run.seed + 7919 * (r + 1)) % 2**32,
                             global_batch_size=cfg.run.batch_size, process_index=shard, process_count=shards,
                             accumulation=cfg.run.gradient_accumulation_steps, shard_devices=shard_devices(run.mesh))
    batches = (put_batch(attach_tables(next(iterator), None, advantages), run.mesh, cfg.run.gradient_accumulation_steps)
               for _ in range(o.steps_per_round))
    if advantages is not None and o.steps_per_round > 1:  # GRPO's old policy: the round's sampling one
        params = policy_params(run, state)
        batches = [GrpoBatch.of(b, sampling_logps(run.graphdef, params, b), o.epsilon) for b in batches]
    for i, batch in enumerate(batches):
        state, metrics = run.program.step(state, frozen, batch)
        fault_point("step")
        if o.sync_ref_model and (r * o.steps_per_round + i + 1) % o.ref_model_sync_steps == 0:
            frozen = mixed_reference(frozen, state.params, o.ref_model_mixup_alpha)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if kl is None and advantages is None:  # at the sampling policy: mean log pi - log pi_ref
            n = metrics["count/chosen"] + metrics["count/rejected"]
            kl = (metrics["rewards_sum/chosen"] + metrics["rewards_sum/rejected"]) / max(n, 1) / cfg.loss.beta
        window.add(metrics)
    return state, frozen, {**window.summary(), "kl": kl}


# -------------------------------------------------------------------------------------------- loop


def round_file(run: Run, r: int) -> str:
    return os.path.join(run.output_dir, "rounds", f"{r:06d}.npz")


def save_answers(run: Run, prompts: Prompts, answers: dict, r: int) -> None:
    """The round's judged answers, before training on them (process 0; written whole or not at all),
    and a few of them as text in samples.jsonl."""
    if not run.main_process:
        return
    arrays = {k: v for k, v in answers.items() if isinstance(v, np.ndarray)}
    os.makedirs(os.path.dirname(round_file(run, r)), exist_ok=True)
    files.atomic_write(round_file(run, r), lambda f: np.savez(f, **arrays))
    with open(os.path.join(run.output_dir, "samples.jsonl"), "a", encoding="utf-8") as f:
        for j in range(min(SAMPLES_PER_ROUND, len(answers["labels"]))):
            answer = answers["tokens"][j][answers["mask"][j] > 0]
            f.write(json.dumps({"round": r + 1, "prompt": prompts.texts[answers["prompt"][j]],
                                "completion": run.tokenizer.decode(answer, skip_special_tokens=True),
                                "label": None if answers["labels"][j] == UNJUDGED else bool(answers["labels"][j])})
                    + "\n")


def load_answers(run: Run, r: int) -> dict | None:
    """Round r's saved answers, or None when they were not saved (then every process samples again:
    the processes agree, so that none skips the sampling collective the others enter)."""
    path = round_file(run, r)
    if not ckpt_lib.agreed(os.path.exists(path)):
        return None
    try:
        with np.load(path) as saved:
            return {k: saved[k] for k in saved.files}
    except (OSError, ValueError) as err:
        raise ConfigError(f"resume: {path} does not read ({err}); delete it to sample round {r + 1} again") from None


def round_text(record: dict) -> str:
    """`thumbs-up 0.62 (79/128) loss 0.6890 delta 0.0052 kl 0.0311 gen tokens/s 5123` for the log."""
    judged = record["thumbs_up"] + record["thumbs_down"]
    parts = [f"thumbs-up {record['thumbs_up_rate']:.3f} ({record['thumbs_up']}/{judged})" if judged
             else "nothing judged"]
    parts += [f"{key} {record[key]:.4f}" for key in ("loss", "delta", "kl") if isinstance(record.get(key), float)]
    if "generation_tokens_per_s" in record:
        parts.append(f"gen tokens/s {record['generation_tokens_per_s']:.0f}")
    return "  ".join(parts)


def run_rounds(run: Run, prompts: Prompts, judge, checkpointer, writer, state, start_round: int):
    """Rounds start_round .. rounds - 1, each closed by a checkpoint; SIGTERM / Ctrl-C: the round in
    progress finishes and saves, then the process exits with 128 + the signal."""
    o, pad_id, config = run.cfg.online, pad_token_id(run.tokenizer), flat_config(run.cfg)
    preemption, frozen = Preemption(), run.frozen
    try:
        for r in range(start_round, o.rounds):
            state, frozen = _one_round(run, prompts, judge, checkpointer, writer, state, frozen, r, pad_id, config)
            if preemption.reached((r + 1) * o.steps_per_round):
                code = 128 + int(preemption.signum)
                log.warning("stopped by a signal: saved round %d, exiting with code %d", r + 1, code)
                raise SystemExit(code)
    finally:  # also on errors and signals: the save in flight completes, never half-written
        checkpointer.close()
        preemption.restore()
    return state


def _one_round(run: Run, prompts: Prompts, judge, checkpointer, writer, state, frozen, r: int, pad_id: int,
               config: dict):
    o = run.cfg.online
    answers = load_answers(run, r)
    if answers is None:
        answers = sample_round(run, state, prompts, judge, r)
        save_answers(run, prompts, answers, r)
        fault_point("judged")
    t0 = time.perf_counter()
    loss_type = run.cfg.loss.loss_type
    data = round_dataset(prompts, answers, pad_id, o.num_generations, loss_type in PAIRED_LOSSES)
    advantages = None
    if loss_type in GRPO_LOSSES:  # group-relative, over each prompt's K answers (the unjudged: NaN, left out)
        scores = np.where(answers["labels"] == UNJUDGED, np.nan, answers["labels"]).astype(np.float32)
        advantages = np.asarray(group_advantages(scores, o.num_generations))[answers["labels"] != UNJUDGED]
    state, frozen, metrics = train_round(run, state, frozen, data, r, advantages)
    step = (r + 1) * o.steps_per_round
    labels, lengths = answers["labels"], answers["mask"].sum(axis=1)
    judged = labels != UNJUDGED
    record = {**metrics, "round": r + 1, "thumbs_up_rate": float(labels[judged].mean()) if judged.any() else None,
              "thumbs_up": int((labels == 1).sum()), "thumbs_down": int((labels == 0).sum()),
              "unjudged": int((~judged).sum()), "completion_length": float(lengths.mean()),
              "time/train": time.perf_counter() - t0}
    for key in ("time/sample", "time/judge"):
        if key in answers:
            record[key] = float(answers[key])
    if "time/sample" in answers:
        record["generation_tokens_per_s"] = float(lengths.sum() / max(float(answers["time/sample"]), 1e-9))
    writer.write(step, record)  # before the save: a resume from an earlier checkpoint drops it (truncate_metrics)
    checkpointer.save(step, checkpoint_items(run, state, frozen), {"round": r + 1, "config": config})
    fault_point("checkpoint")
    if run.main_process:
        print(f"round {r + 1}/{o.rounds}  {round_text(record)}", flush=True)
    return state, frozen


def checkpoint_items(run: Run, state, reference) -> dict:
    """What a round's checkpoint holds: the train state, and a reference that sync_ref_model refreshes
    (the starting one is read from the model again on resume). Concrete or abstract, as restore takes it."""
    return {"train": state, "reference": reference} if run.cfg.online.sync_ref_model else {"train": state}


def check_online(cfg: TrainConfig) -> None:
    """What the loop refuses before anything loads, each in one line naming the key."""
    o = cfg.online
    if not cfg.model.model or not o.prompts or not o.judge:
        raise ConfigError("model, prompts and judge: give all three, or none for the embedded default")
    if cfg.loss.udm or cfg.run.precompute_ref_log_probs:
        raise ConfigError(f"{'udm' if cfg.loss.udm else 'precompute_ref_log_probs'}: not in the online loop (its "
                          "answers are new every round; reference log-probs are computed live)")
    if o.sync_ref_model and cfg.model.use_peft:
        raise ConfigError("sync_ref_model: not with use_peft (the reference is the frozen base, int8 with "
                          "load_in_8bit: there is no reference of its own to refresh)")
    if o.sync_ref_model and cfg.loss.beta == 0:
        raise ConfigError("sync_ref_model: the reference is not used at beta 0 (GRPO's default); give beta > 0")


def _check_mixable(run: Run) -> None:
    """sync_ref_model mixes the policy into the reference: they must be the same architecture."""
    def shapes(tree):
        return jax.tree.map(lambda x: tuple(x.shape), tree)

    if run.cfg.online.sync_ref_model and shapes(run.reference) != shapes(run.program.abstract_state.params):
        raise ConfigError(f"sync_ref_model: ref_model {run.ref_path} has other weights' shapes than the policy; "
                          "a refresh mixes the two")


def fit(cfg: TrainConfig, *, demo: bool = False) -> dict:
    """Run the configured rounds (resuming), export the policy; returns the last round's record."""
    o = cfg.online
    check_online(cfg)
    output_dir = RunDir.for_config(cfg).root
    check_output_dir(cfg, output_dir)
    judge = load_judge(o.judge)
    run = build(cfg, output_dir=output_dir, steps=o.rounds * o.steps_per_round)
    _check_mixable(run)
    answers = o.prompts_per_round * o.num_generations
    if answers % data_parallel_size(run.mesh):
        raise ConfigError(f"prompts_per_round: {o.prompts_per_round} x num_generations {o.num_generations} = "
                          f"{answers} answers do not split over {data_parallel_size(run.mesh)} data-parallel devices")
    prompts = load_prompts(cfg, run.tokenizer)
    if run.main_process:
        claim_output_dir(output_dir)
    identity = run_identity(model_dir=run.model_dir, separate_reference=cfg.model.separate_reference,
                            ref_path=run.ref_path, ref_fingerprint=run.ref_fingerprint,
                            train_data_fingerprint=prompts.fingerprint)
    checkpointer = ckpt_lib.Checkpointer(output_dir, constant_extras={IDENTITY: identity.record()})

    def check(step, extras):
        check_resume(identity, step, extras, config=cfg.flat(), allow_config_change=cfg.run.allow_config_change,
                     steps=run.steps, output_dir=output_dir)

    found = checkpointer.restore_latest(checkpoint_items(run, run.program.abstract_state, run.reference), check)
    # Outside the mesh context, as loading is (the models' logical axes are not mesh axes).
    state, start = (initial_state(run), 0) if found is None else (found[1]["train"], found[2]["round"])
    if found is not None and o.sync_ref_model:  # the refreshed reference replaces the starting one
        run = dataclasses.replace(run, reference=found[1]["reference"])
    with jax.set_mesh(run.mesh):
        if run.main_process:
            truncate_metrics(output_dir, start * o.steps_per_round, finished=False, keep_start=start > 0)
            ckpt_lib.record_config(output_dir, flat_config(cfg), start * o.steps_per_round, identity.record())
        save_model_copies(run)
        writer = MetricsWriter(output_dir, cfg.run.tensorboard, enabled=run.main_process)
        before = oracle_demo.success(run.graphdef, policy_params(run, state), run.tokenizer, seed=cfg.run.seed,
                                     samples=cfg.run.demo_samples, mesh=run.mesh) if demo and start == 0 else None
        if before is not None and run.main_process:
            files.atomic_write_json(run.dir.demo_before, before)
        state = run_rounds(run, prompts, judge, checkpointer, writer, state, start)
        if run.main_process:
            ckpt_lib.write_final_state(output_dir, step=run.steps, reward_shift=state.reward_shift, beta=cfg.loss.beta,
                                       loss_type=cfg.loss.loss_type, reference_path=run.ref_path,
                                       reference_fingerprint=run.ref_fingerprint)
        if cfg.run.export_hf:
            export(run, state)
        result = {"output_dir": output_dir}
        if demo:
            after = oracle_demo.success(run.graphdef, policy_params(run, state), run.tokenizer, seed=cfg.run.seed,
                                        samples=cfg.run.demo_samples, mesh=run.mesh)
            with open(run.dir.demo_before, encoding="utf-8") as f:
                before = json.load(f)
            result.update({f"before_{k}": v for k, v in before.items()}, **after)
            if run.main_process:
                print(f"\noracle success rate (held-out prompts, T=1): {before['oracle_success']:.4f} -> "
                      f"{after['oracle_success']:.4f}   ({output_dir})")
        writer.close()
    return result


def main(argv=None) -> int:
    """The CLI: the trainer's keys plus the online ones (`bco_jax.config.schema.OnlineOptions`)."""

    def start(argv):
        cfg = parse_args(argv, prog="python -m bco_jax.online")
        demo = not cfg.model.model and not cfg.online.prompts and not cfg.online.judge
        defaults = demo_defaults() if demo else {}
        if parse_args(argv, defaults=defaults).loss.loss_type in GRPO_LOSSES:
            defaults["beta"] = 0.0  # GRPO's KL coefficient defaults to 0, as TRL's GRPOConfig.beta
        if defaults:
            cfg = parse_args(argv, prog="python -m bco_jax.online", defaults=defaults)
        return cfg, lambda c: fit(c, demo=demo)

    return run_cli(argv, start)


if __name__ == "__main__":
    logging.getLogger("bco_jax.online")
    sys.exit(main())
