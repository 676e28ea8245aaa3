"""The preference-alignment recipe (DPO, RPO, ORPO): setup -> train -> save, top to bottom.

Run by the align stage as the train stage runs its trainer (`python -m mft_core.align.recipe
--work-dir DIR`, or under `accelerate launch`), from DIR/train_job.json alone. It shares the fine-tuning
recipe's parts (accelerator, world check, batches, optimizer step, checkpoints, metrics, weights)
and owns only its loop.

The model: the fine-tuned model, i.e. the base with the SFT adapter loaded frozen and unmerged
(exactly the model fine-tuning trained: merged into a bf16 base, its update would be rounded
away), or the fully fine-tuned model, plus a fresh LoRA adapter, the only trainable weights. The
reference of DPO/RPO is that same model with the new adapter switched off (its LoRA scaling 0
under no_grad, `adapter_switched_off`): exactly the model the policy starts from, and no second
copy in memory. (Training the SFT adapter on would leave no such reference: disabling it gives
the *base* model; TRL loads a second, frozen copy of the adapter for that case.) With
align.parameters full every weight trains, and the reference is a table of every pair's
log-probs computed by the model before its first step (`precomputed_reference`). ORPO needs no
reference.

Writes into DIR what the train stage writes (metrics.jsonl, checkpoints/, hyperparameters.json,
train_summary.json, loss_curves.png) and:
  model/          ONE LoRA adapter equal to the SFT adapter plus the align adapter, of rank r_sft +
                  r_align: [s_1 B_1, s_2 B_2] [A_1; A_2] = s_1 B_1 A_1 + s_2 B_2 A_2 (scale 1), so that
                  merge folds it into the base as it folds any adapter; after full fine-tuning,
                  the full model with the align adapter merged; with align.parameters full, the
                  aligned model itself.
  align-adapter/  the align adapter alone (on top of the fine-tuned model; LoRA only).
  reference_logps_{train,valid}.pt   the precomputed reference (align.parameters full, dpo/rpo).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from mft_core.align.data import PairSplit, pair_rows
from mft_core.align.losses import (
    NEEDS_REFERENCE,
    PairLogps,
    pair_coefficients,
    pair_logps,
    per_pair_loss,
    preference_loss,
)
from mft_core.config import AlignConfig
from mft_core.train import checkpoint as ckpt
from mft_core.train import losses
from mft_core.train.data import TokenizedSplit, epoch_plan, validation_plan
from mft_core.train.metrics import MetricsLog, peak_rss_mb, plot_loss_curves
from mft_core.train.model import adapter_switched_off, load_model
from mft_core.train.optim import total_optimizer_steps
from mft_core.train.recipe import (
    batch_maker,
    optimizer_step,
    prepare_training,
    publish_folder,
    run_from_command_line,
    save_weights,
    start_run,
    step_groups,
    task_loss_totals,
)
from mft_core.train.stage import job_path, trained_task_ids

log = logging.getLogger("mft.align")
REFERENCE = "the fine-tuned model: the align adapter switched off, in the same weights"
PRECOMPUTED = "the fine-tuned model's log-probs, computed in one no-grad pass before the first step"


# ----------------------------------------------------------------------------- one micro-batch


def micro_batch_pairs(wrapper, accelerator, batch, sample_task: torch.Tensor, align: AlignConfig,
                      reference_table: torch.Tensor | None = None, pair_ids: list[int] | None = None):
    """(per-pair loss [P] with its graph, chosen and rejected rewards [P], the policy's PairLogps)
    of one micro-batch. The reference (dpo, rpo): the rows `pair_ids` of a precomputed table
    (full-parameter align), else a forward of the same model with the align adapter switched off
    (no grad, eval mode), before the policy's own."""
    token_sample = losses.trained_values(batch["sample_ids"], batch["labels"])
    reference = None
    if align.method in NEEDS_REFERENCE and reference_table is not None:
        rows = reference_table[torch.tensor(pair_ids, dtype=torch.long)].to(device=accelerator.device)
        ones = torch.ones(len(pair_ids))  # a reference's token counts: no loss uses them
        reference = PairLogps(rows[:, 0], rows[:, 1], ones, ones, sample_task[0::2])
    elif align.method in NEEDS_REFERENCE:
        unwrapped = accelerator.unwrap_model(wrapper)
        training = unwrapped.training
        unwrapped.eval()  # the reference is a fixed model: no dropout anywhere
        with torch.no_grad(), adapter_switched_off(unwrapped.model):
            ref_out = unwrapped(batch["input_ids"], batch["position_ids"], batch["labels"])
        unwrapped.train(training)
        reference = pair_logps(ref_out.token_loss.double(), token_sample, sample_task)
    out = wrapper(batch["input_ids"], batch["position_ids"], batch["labels"], real_tokens=batch["task_ids"] >= 0)
    policy = pair_logps(out.token_loss.double(), token_sample, sample_task)
    loss, chosen_reward, rejected_reward = per_pair_loss(align.method, policy, reference, align.beta, align.rpo_alpha)
    return loss, chosen_reward, rejected_reward, policy


def pair_batch_maker(pairs: PairSplit, seq_length: int, pad_id: int, device):
    """rows of pair indices -> the micro-batch of their samples (chosen, rejected, chosen, ...) on the device."""
    make = batch_maker(pairs.samples, seq_length, pad_id, device)
    return lambda rows: make(pair_rows(rows))


def sample_tasks(pairs: PairSplit, rows) -> torch.Tensor:
    """The task of each sample of a micro-batch of pair rows (both sides of a pair: its task)."""
    return torch.tensor([int(pairs.task_ids[pair]) for row in rows for pair in row for _side in (0, 1)], dtype=torch.long)


def pair_ids(rows) -> list[int]:
    return [pair for row in rows for pair in row]


def precomputed_reference(wrapper, accelerator, make_batch, pairs: PairSplit, plan: list, path: Path) -> torch.Tensor:
    """[pairs, 2] float64: every pair's summed chosen and rejected log-probs under the model as it
    is now (before the first step: the fine-tuned model), in one no-grad pass, each process over
    its share of `plan` (validation_plan: every pair once), summed over processes. Kept in `path`
    (the work directory): a resumed run reads it, since its model is no longer the reference."""
    if path.is_file():
        return torch.load(path)
    table = torch.zeros(len(pairs), 2, dtype=torch.float64)
    wrapper.eval()
    with torch.no_grad():
        for rows in plan:
            batch = make_batch(rows)
            out = wrapper(batch["input_ids"], batch["position_ids"], batch["labels"])
            logps = pair_logps(out.token_loss.double(), losses.trained_values(batch["sample_ids"], batch["labels"]),
                               sample_tasks(pairs, rows))
            ids = torch.tensor(pair_ids(rows), dtype=torch.long)
            table[ids, 0], table[ids, 1] = logps.chosen.cpu(), logps.rejected.cpu()
    wrapper.train()
    table = losses.all_reduce_sum(table)
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(table, tmp)
        tmp.rename(path)
    accelerator.wait_for_everyone()
    return table


class PairTotals:
    """Per-task sums over pairs, summed over ranks on `reduced()`: the loss, the reward margin,
    pairs won (chosen reward > rejected reward), and two that mean something before training too,
    where every DPO reward is 0: pairs whose chosen answer has the higher mean token log-prob under
    the model, and that mean log-prob's margin (chosen - rejected); then the count."""

    ROWS = ("loss", "reward_margin", "accuracy", "logp_accuracy", "logp_margin")

    def __init__(self, num_tasks: int):
        self.sums = torch.zeros(len(self.ROWS) + 1, num_tasks, dtype=torch.float64)

    def add(self, loss, chosen_reward, rejected_reward, policy) -> None:
        task = policy.task.cpu()
        margin = (chosen_reward - rejected_reward).detach().double().cpu()
        mean_gap = (policy.chosen / policy.chosen_tokens - policy.rejected / policy.rejected_tokens).detach().double().cpu()
        values = (loss.detach().double().cpu(), margin, (margin > 0).double(), (mean_gap > 0).double(), mean_gap,
                  torch.ones_like(margin))
        for row, value in enumerate(values):
            self.sums[row].index_add_(0, task, value)

    def reduced(self, names: list[str]) -> dict[str, dict[str, float]]:
        *sums, count = losses.all_reduce_sum(self.sums)
        present = [k for k in range(len(names)) if count[k] > 0]
        means = {row: {names[k]: (total[k] / count[k]).item() for k in present} for row, total in zip(self.ROWS, sums)}
        return {**means, "pairs": {names[k]: int(count[k].item()) for k in present}}


# ----------------------------------------------------------------------------- the recipe


def main(work_dir: Path) -> None:
    run = start_run(work_dir)  # cfg: train's precision and attention, align's launch, optimizer and batches
    job, cfg, accelerator, deepspeed = run.job, run.cfg, run.accelerator, run.deepspeed
    tokenize_dir, seq_length, pad_id = run.tokenize_dir, run.seq_length, run.pad_id
    align = AlignConfig.model_validate(job["align"])
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    is_main = accelerator.is_main_process
    precision, on_gpu = run.precision, run.on_gpu
    preference_ids = trained_task_ids(job, "preference")
    train_pairs = PairSplit(TokenizedSplit(tokenize_dir, "train"), preference_ids)
    valid_pairs = PairSplit(TokenizedSplit(tokenize_dir, "valid"), preference_ids)
    # Plans and micro-batches hold rows of pair indices; a batch expands them into the pairs' samples.
    train_batch = pair_batch_maker(train_pairs, seq_length, pad_id, device)
    valid_batch = pair_batch_maker(valid_pairs, seq_length, pad_id, device)
    task_names = [t["name"] for t in job["tasks"]]
    task_weights = torch.tensor([t["weight"] for t in job["tasks"]], dtype=torch.float64)

    plans = []
    while len(plans) < cfg.epochs and sum(p.num_optimizer_steps for p in plans) < (cfg.max_steps or float("inf")):
        plans.append(epoch_plan(train_pairs, epoch=len(plans), seed=align.seed, seq_length=seq_length,
                                rows_per_micro_batch=cfg.rows_per_micro_batch, world_size=world, grad_accum=cfg.grad_accum))
    total_steps = total_optimizer_steps([p.num_optimizer_steps for p in plans], cfg.max_steps)
    # The fine-tuning tasks' validation data: what alignment does to them (before and after).
    sft_valid = TokenizedSplit(tokenize_dir, "valid")
    sft_valid.keep_tasks(trained_task_ids(job, "sft"))
    sft_valid_batches = (validation_plan(sft_valid, seq_length=seq_length, rows_per_micro_batch=cfg.rows_per_micro_batch,
                                         world_size=world)[rank] if len(sft_valid) else None)
    pair_plan = lambda pairs: validation_plan(pairs, seq_length=seq_length, rows_per_micro_batch=cfg.rows_per_micro_batch,
                                              world_size=world)[rank]  # every pair once over the processes
    valid_batches = pair_plan(valid_pairs) if len(valid_pairs) else None

    sft_method = job["sft_method"]
    model_dir = job_path(job["model_dir"], work_dir)
    sft_model = job_path(job["sft_dir"], work_dir) / "model"
    model = load_model(sft_model if sft_method == "full" else model_dir, cfg, precision, run.attention, on_gpu,
                       trust_remote_code=job["trust_remote_code"],
                       frozen_adapter=None if sft_method == "full" else sft_model)
    wrapper, optimizer, scheduler, trainable = prepare_training(run, model, total_steps)  # weight_decay 0 (the stage's)

    # Full-parameter DPO/RPO: the reference log-probs of every pair, computed by the model before it
    # trains (no second copy of it); LoRA switches its adapter off instead, at every micro-batch.
    tables = {}
    if align.method in NEEDS_REFERENCE and cfg.method == "full":
        for split, pairs, make in (("train", train_pairs, train_batch), ("valid", valid_pairs, valid_batch)):
            if len(pairs):
                tables[split] = precomputed_reference(wrapper, accelerator, make, pairs, pair_plan(pairs),
                                                      work_dir / f"reference_logps_{split}.pt")

    state = {"step": 0, "epoch": 0, "group": 0}
    resume_from = ckpt.latest_checkpoint(work_dir)
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from, trainable, deepspeed)
        log.info("resumed from %s (step %d)", resume_from, state["step"])
    metrics = MetricsLog(work_dir, enabled=is_main, resume_step=state["step"])
    parameters = sum(p.numel() for p in accelerator.unwrap_model(wrapper).parameters())
    if is_main:
        (work_dir / "hyperparameters.json").write_text(json.dumps({
            **job, "precision": precision, "attention": run.attention, "world_size": world,
            "reference": ("none (orpo)" if align.method not in NEEDS_REFERENCE else PRECOMPUTED if tables else REFERENCE),
            # what merge reads: one stacked adapter, or a full model
            "train": {**job["train"], "method": "lora" if cfg.method == "lora" and sft_method != "full" else "full"},
            "parameters_in_memory": parameters,
            "steps_per_epoch": [p.num_optimizer_steps for p in plans], "total_steps": total_steps}, indent=1) + "\n")
        print(f"progress step={state['step']} total={total_steps}", flush=True)

    def evaluate() -> dict[str, dict[str, float]]:
        """Per-task validation pair loss, reward margin and preference accuracy, all ranks together."""
        wrapper.eval()
        totals = PairTotals(len(task_names))
        with torch.no_grad():
            for rows in valid_batches:
                totals.add(*micro_batch_pairs(wrapper, accelerator, valid_batch(rows), sample_tasks(valid_pairs, rows),
                                              align, tables.get("valid"), pair_ids(rows)))
        wrapper.train()
        return totals.reduced(task_names)

    def sft_validation_loss() -> dict[str, float]:
        """Per-task token-mean validation loss of the fine-tuning tasks under the policy."""
        wrapper.eval()
        sums, counts = task_loss_totals(wrapper, batch_maker(sft_valid, seq_length, pad_id, device), sft_valid_batches,
                                        len(task_names))
        wrapper.train()
        return {name: (sums[k] / counts[k]).item() for k, name in enumerate(task_names) if counts[k] > 0}

    def write_validation(step: int, with_sft_tasks: bool = False) -> None:
        valid = evaluate()
        sft = {"valid_sft_task_loss": sft_validation_loss()} if with_sft_tasks and sft_valid_batches is not None else {}
        metrics.write({"step": step, **{f"valid_task_{row}": valid[row] for row in PairTotals.ROWS}, **sft})

    if valid_batches is not None and resume_from is None:
        write_validation(0, with_sft_tasks=True)  # the fine-tuned model before alignment: the "before" of every curve

    # ------------------------------------------------------------------------- train

    wrapper.train()
    done = state["step"] >= total_steps  # resumed from the final checkpoint: nothing left but saving
    tick = time.perf_counter()
    for epoch, group_index, group in [] if done else step_groups(plans, rank, cfg.grad_accum, state):
        tasks_of = [sample_tasks(train_pairs, rows) for rows in group]
        # The step's pairs per task over all ranks, before any forward: the denominators of the objective.
        task_pairs = losses.all_reduce_sum(sum(torch.bincount(t[0::2], minlength=len(task_names)) for t in tasks_of))
        coefficients = pair_coefficients(align.balance, task_pairs, task_weights)
        totals = PairTotals(len(task_names))
        objective = torch.zeros((), dtype=torch.float64)
        input_tokens = 0
        for i, rows in enumerate(group):
            batch = train_batch(rows)
            input_tokens += int((batch["task_ids"] >= 0).sum())
            last = i == len(group) - 1
            accelerator.sync_gradients = last  # the step's one sync point, as in the fine-tuning recipe
            with nullcontext() if last else accelerator.no_sync(wrapper):
                pair_loss, chosen_reward, rejected_reward, policy = micro_batch_pairs(
                    wrapper, accelerator, batch, tasks_of[i], align, tables.get("train"), pair_ids(rows))
                contribution = preference_loss(pair_loss, policy.task, coefficients)
                # x world (DDP averages over ranks), x grad_accum under DeepSpeed (it divides): the
                # step's gradient is that of the summed contributions.
                accelerator.backward((contribution * world * (cfg.grad_accum if deepspeed else 1)).float())
            objective += contribution.detach().cpu()
            totals.add(pair_loss, chosen_reward, rejected_reward, policy)
        lr_used = scheduler.get_last_lr()[0]
        grad_norm = optimizer_step(accelerator, wrapper, optimizer, scheduler, cfg.max_grad_norm, deepspeed)
        state["step"] += 1
        state["epoch"], state["group"] = epoch, group_index + 1
        objective = losses.all_reduce_sum(objective)
        step_pairs = totals.reduced(task_names)
        input_tokens = int(losses.all_reduce_sum(torch.tensor(float(input_tokens))).item())
        now = time.perf_counter()
        metrics.write({
            "step": state["step"], "epoch": epoch, "lr": lr_used, "loss": objective.item(), "grad_norm": grad_norm,
            **{f"task_{row}": step_pairs[row] for row in (*PairTotals.ROWS, "pairs")},
            "tokens": input_tokens, "tokens_per_s": input_tokens / max(now - tick, 1e-9),
            "step_seconds": now - tick, "peak_rss_mb": peak_rss_mb(),
            **({"cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20} if on_gpu else {}),
        })
        if is_main:
            print(f"progress step={state['step']} total={total_steps} loss={objective.item():.6g} "
                  f"tokens_per_s={input_tokens / max(now - tick, 1e-9):.1f}", flush=True)
        last_step = state["step"] >= total_steps
        if valid_batches is not None and (state["step"] % cfg.eval_every == 0 or last_step):
            write_validation(state["step"], with_sft_tasks=last_step)
        if state["step"] % cfg.checkpoint_every == 0 or last_step:
            ckpt.save_checkpoint(accelerator, work_dir, state["step"], state, cfg.keep_checkpoints,
                                 protect=None, deepspeed=deepspeed)
        tick = time.perf_counter()
        if last_step:
            break

    # ------------------------------------------------------------------------- save

    if cfg.method == "full":
        save_weights(accelerator, wrapper, work_dir / "model")  # every weight trained: the aligned model itself
    else:
        save_weights(accelerator, wrapper, work_dir / "align-adapter")
        if is_main and sft_method == "full":
            save_merged_full_model(accelerator.unwrap_model(wrapper).model, work_dir / "model")
        elif is_main:
            write_stacked_adapter(sft_model, work_dir / "align-adapter", work_dir / "model")
    if is_main:
        sft_summary = json.loads((job_path(job["sft_dir"], work_dir) / "train_summary.json").read_text())
        records = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
        valid = [r for r in records if "valid_task_accuracy" in r]
        summary = {
            "steps": state["step"], "total_steps": total_steps, "method": align.method, "beta": align.beta,
            "tasks": task_names, "preference_tasks": [task_names[k] for k in preference_ids],
            # validation before alignment (step 0) and at the end
            "valid_before": {row: valid[0][f"valid_task_{row}"] for row in PairTotals.ROWS} if valid else None,
            "valid_after": {row: valid[-1][f"valid_task_{row}"] for row in PairTotals.ROWS} if valid else None,
            # the fine-tuning tasks' validation loss under the fine-tuned model and under the aligned one
            "sft_valid_loss_before": valid[0].get("valid_sft_task_loss") if valid else None,
            "sft_valid_loss_after": valid[-1].get("valid_sft_task_loss") if valid else None,
            # The fine-tuning's own validation losses (the model card shows them); align's are pair losses.
            "final_valid_task_loss": sft_summary.get("final_valid_task_loss"),
            "sft": {k: sft_summary.get(k) for k in ("steps", "best_valid_loss", "final_valid_task_loss")},
        }
        (work_dir / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        plot_loss_curves(work_dir / "metrics.jsonl", work_dir / "loss_curves.png")
    metrics.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()


# ----------------------------------------------------------------------------- the saved model


def write_stacked_adapter(sft_adapter: Path, align_adapter: Path, out: Path) -> None:
    """One LoRA adapter equal to the two: per module, A = [A_sft; A_align] and B = [s_sft B_sft,
    s_align B_align] with lora_alpha = r (scale 1); a module only one adapter targets gets zeros in
    the other's half. Merge and any PEFT user then load it as a plain adapter."""
    from safetensors.torch import load_file, save_file

    configs = [json.loads((folder / "adapter_config.json").read_text()) for folder in (sft_adapter, align_adapter)]
    weights = [load_file(str(folder / "adapter_model.safetensors")) for folder in (sft_adapter, align_adapter)]
    for config, folder in zip(configs, (sft_adapter, align_adapter)):
        if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
            raise ValueError(f"{folder}: an adapter with rank/alpha patterns or DoRA cannot be stacked")
    ranks = [int(c["r"]) for c in configs]
    scales = [float(c["lora_alpha"]) / (r ** 0.5 if c.get("use_rslora") else r) for c, r in zip(configs, ranks)]
    modules = sorted({key.rsplit(".lora_A.", 1)[0] for w in weights for key in w if ".lora_A." in key})
    stacked: dict[str, torch.Tensor] = {}
    for module in modules:
        a_parts, b_parts = [], []
        shape = next(w[f"{module}.lora_A.weight"].shape[1] for w in weights if f"{module}.lora_A.weight" in w)
        out_features = next(w[f"{module}.lora_B.weight"].shape[0] for w in weights if f"{module}.lora_B.weight" in w)
        for w, r, scale in zip(weights, ranks, scales):
            a = w.get(f"{module}.lora_A.weight")
            b = w.get(f"{module}.lora_B.weight")
            a_parts.append(a.float() if a is not None else torch.zeros(r, shape))
            b_parts.append(b.float() * scale if b is not None else torch.zeros(out_features, r))
        stacked[f"{module}.lora_A.weight"] = torch.cat(a_parts, dim=0).contiguous()
        stacked[f"{module}.lora_B.weight"] = torch.cat(b_parts, dim=1).contiguous()
    config = {**configs[0], "r": sum(ranks), "lora_alpha": sum(ranks), "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}), "lora_dropout": 0.0}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
        save_file(stacked, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    publish_folder(out, write)


def save_merged_full_model(peft_model, out: Path) -> None:
    """After full fine-tuning: the fine-tuned model with the align adapter merged, as a full model."""
    merged = peft_model.merge_and_unload()
    publish_folder(out, lambda tmp: merged.save_pretrained(tmp, safe_serialization=True))


if __name__ == "__main__":
    run_from_command_line(main, "mft-pipeline preference aligner (started by the align stage)")
