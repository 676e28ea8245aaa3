"""The multi-task fine-tuning recipe: setup -> train -> save, top to bottom.

Run by the train stage as a subprocess (`python -m mft_core.train.recipe --work-dir DIR`, or
under `accelerate launch` for several processes / DeepSpeed / FSDP). Everything it needs is in
DIR/train_job.json, written by the stage. Everything it writes goes into DIR:

  metrics.jsonl          one line per optimizer step (and per evaluation)
  tensorboard/           the same as TensorBoard events
  checkpoints/step-N/    full-state checkpoints (resume continues from the newest complete one)
  model/                 the final adapter (LoRA/QLoRA) or full model, Hugging Face format
  best-model/            the weights of the best validation loss (when validation ran)
  hyperparameters.json, train_summary.json, loss_curves.png

One optimizer step = `grad_accum` micro-batches on each of the `world_size` processes. Per-task
token and sample counts of the whole step are all-reduced before any loss is computed, so the
objective of a step is the same whatever the process count and accumulation (MFTCoder balances
inside one micro-batch on one process). The step's last micro-batch is its only sync point, on
every backend: DDP reduces gradients there, and DeepSpeed's engine steps its optimizer there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from mft_core.config import TrainConfig
from mft_core.train import checkpoint as ckpt
from mft_core.train import losses
from mft_core.train.coba import CoBa, measurement_batches
from mft_core.train.data import TokenizedSplit, collate, epoch_plan, to_device, validation_plan
from mft_core.train.launch import cuda_available, deepspeed_config
from mft_core.train.metrics import MetricsLog, peak_rss_mb, plot_loss_curves
from mft_core.train.model import TokenLossModel, load_model, resolve_attention, shard_decoder_layers
from mft_core.train.optim import make_scheduler, param_groups, total_optimizer_steps
from mft_core.train.stage import job_path, trained_task_ids

log = logging.getLogger("mft.train")


# ----------------------------------------------------------------------------- setup


def make_accelerator(precision: str, cfg: TrainConfig):
    """The accelerator of every launcher (`accelerate launch`, Ray Train's workers, one plain
    process): DeepSpeed and FSDP are set up here from train_job.json's settings, never from a
    launcher's files or flags, so every launcher trains the same way."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, GradientAccumulationPlugin, InitProcessGroupKwargs

    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without it, DeepSpeed on CPU runs every rank as its own world of one (silently).
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    plugins = {}
    if cfg.launch.backend == "deepspeed":
        plugins["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, precision == "bf16"))
    elif cfg.launch.backend == "fsdp":
        # The recipe shards every decoder layer itself (model.shard_decoder_layers); checkpoints
        # are saved sharded, each rank its own part.
        plugins["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="NO_WRAP", state_dict_type="SHARDED_STATE_DICT", reshard_after_forward=True)
    # step_scheduler_with_optimizer=False: otherwise accelerate steps a prepared scheduler once per
    # process at every step, and the schedule ends after 1/N of training (MFTCoder's LR defect).
    # Accumulation is the loop's own (below); an explicit plugin of 1 step also keeps a stray
    # ACCELERATE_GRADIENT_ACCUMULATION_STEPS from dividing every loss.
    return Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", kwargs_handlers=handlers,
                       step_scheduler_with_optimizer=False,
                       gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1), **plugins)


def check_world(accelerator, cfg: TrainConfig) -> None:
    expected = cfg.launch.num_processes * cfg.launch.num_machines
    seen_env = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected or seen_env != expected:
        raise RuntimeError(
            f"the trainer sees {accelerator.num_processes} process(es) (WORLD_SIZE={seen_env}) but "
            f"train.launch asks for {expected}: the launcher fell into a single-process mode"
        )
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_accum = accelerator.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"]
        if ds_accum != cfg.grad_accum:
            raise RuntimeError(f"DeepSpeed runs with gradient_accumulation_steps={ds_accum}, the config says "
                               f"train.grad_accum={cfg.grad_accum}: they must agree")


# ----------------------------------------------------------------------------- parts of a step


def batch_maker(split: TokenizedSplit, seq_length: int, pad_id: int, device: torch.device):
    """rows -> the micro-batch's tensors on the training device: every batch the model sees is
    made here and moved by `to_device`."""
    return lambda rows: to_device(collate(split, rows, seq_length, pad_id), device)


def task_loss_totals(wrapper, make_batch, micro_batches, num_tasks: int, of=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task sums of token losses (or of `of(token losses)`) and trained-token counts [K]
    (float64) over `micro_batches` (lists of rows), without gradients, summed over all ranks.
    Mode (train/eval) is the caller's."""
    sums = torch.zeros(num_tasks, dtype=torch.float64)
    counts = torch.zeros(num_tasks, dtype=torch.float64)
    with torch.no_grad():
        for rows in micro_batches:
            batch = make_batch(rows)
            out = wrapper(batch["input_ids"], batch["position_ids"], batch["labels"])
            task_of_token = losses.trained_values(batch["task_ids"], batch["labels"])
            values = out.token_loss.double() if of is None else of(out.token_loss.double())
            s, c = losses.per_task_loss_sums(values, task_of_token, num_tasks)
            sums += s.cpu()
            counts += c.cpu()
    return losses.all_reduce_sum(sums), losses.all_reduce_sum(counts)


def focal_task_reference(wrapper, make_batch, micro_batches, num_tasks: int, device: torch.device) -> torch.Tensor:
    """focal_task weighs each task by its mean token probability over the whole step, known only
    after every micro-batch: a no-grad pass computes it first (all ranks), at one forward's cost.
    The pass runs on a fork of the random state, so the step's own forwards then draw the same
    dropout masks: the means are those of the step itself, the exact case of `losses.mft_loss`."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        sums, counts = task_loss_totals(wrapper, make_batch, micro_batches, num_tasks, of=lambda loss: torch.exp(-loss))
    return losses.task_mean_losses(sums, counts).float()


def step_groups(plans, rank: int, grad_accum: int, state: dict):
    """(epoch, group index, micro-batches) of every optimizer step left, from the resume point
    (state["epoch"], state["group"]) on: this rank's micro-batches of each epoch, grad_accum at a time."""
    for epoch in range(state["epoch"], len(plans)):
        micro_batches = plans[epoch].micro_batches(rank)
        groups = [micro_batches[i : i + grad_accum] for i in range(0, len(micro_batches), grad_accum)]
        for group_index in range(state["group"] if epoch == state["epoch"] else 0, len(groups)):
            yield epoch, group_index, groups[group_index]


def optimizer_step(accelerator, wrapper, optimizer, scheduler, max_grad_norm: float, deepspeed: bool) -> float | None:
    """Clip, update, clear the gradients, advance the schedule; returns the pre-clip grad norm.
    Under DeepSpeed the engine has already clipped and updated inside the step's last backward
    (accelerate steps it where sync_gradients is set); its norm is read after that update."""
    if deepspeed:
        grad_norm = wrapper.get_global_grad_norm()
    else:
        grad_norm = accelerator.clip_grad_norm_(wrapper.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return None if grad_norm is None else float(grad_norm)


@dataclass
class RecipeRun:
    """What a recipe (this one, align's) sets up from its work directory's train_job.json before
    anything of its own: the settings, the accelerator and where this process stands in the world."""

    job: dict
    cfg: TrainConfig
    precision: str  # resolved by the stage, the same for every process
    attention: str
    on_gpu: bool
    accelerator: object
    deepspeed: bool
    tokenize_dir: Path
    seq_length: int
    pad_id: int


def start_run(work_dir: Path) -> RecipeRun:
    job = json.loads((work_dir / "train_job.json").read_text())
    cfg = TrainConfig.model_validate(job["train"])
    torch.set_num_threads(int(os.environ.get("MFT_TRAIN_THREADS", os.cpu_count() or 1)))
    on_gpu = cuda_available()
    attention = resolve_attention(cfg.attention, on_gpu, job["precision"])
    accelerator = make_accelerator(job["precision"], cfg)
    check_world(accelerator, cfg)
    from accelerate.utils import DistributedType, set_seed

    log.info("accelerator: %s over %d process(es), %s", accelerator.distributed_type.value, accelerator.num_processes,
             accelerator.device)

    set_seed(cfg.seed)  # the same initial weights (LoRA init) on every rank
    tokenize_dir = job_path(job["tokenize_dir"], work_dir)
    template = json.loads((tokenize_dir / "template.json").read_text())
    return RecipeRun(job, cfg, job["precision"], attention, on_gpu, accelerator,
                     accelerator.distributed_type == DistributedType.DEEPSPEED, tokenize_dir,
                     template["seq_length"], template["pad_id"])


def prepare_training(run: RecipeRun, model, total_steps: int):
    """(wrapper, optimizer, scheduler, trainable parameter names): the model wrapped for per-token
    losses (FSDP-sharded per decoder layer under FSDP), AdamW (betas 0.9/0.95) and the schedule
    over exactly `total_steps`, prepared by the accelerator; checkpoints keep only the trainable
    weights (DeepSpeed's engine saves without the frozen ones itself)."""
    from accelerate.utils import DistributedType

    cfg, accelerator = run.cfg, run.accelerator
    wrapper = TokenLossModel(model)
    if accelerator.distributed_type == DistributedType.FSDP:
        shard_decoder_layers(wrapper, run.precision)
    optimizer = torch.optim.AdamW(param_groups(wrapper, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = make_scheduler(optimizer, kind=cfg.schedule, warmup_steps=cfg.warmup_steps,
                               total_steps=total_steps, min_lr=cfg.min_lr)
    wrapper, optimizer, scheduler = accelerator.prepare(wrapper, optimizer, scheduler)
    if not run.deepspeed:
        ckpt.install_trainable_only_hooks(accelerator)
    # Named as checkpoints name them: without the "module." of DDP's wrapper (a DDP run's resume
    # found every saved weight "unexpected" and stopped).
    return wrapper, optimizer, scheduler, ckpt.trainable_names(accelerator.unwrap_model(wrapper))


def main(work_dir: Path) -> None:
    run = start_run(work_dir)
    job, cfg, accelerator, deepspeed = run.job, run.cfg, run.accelerator, run.deepspeed
    precision, attention, on_gpu = run.precision, run.attention, run.on_gpu
    tokenize_dir, seq_length, pad_id = run.tokenize_dir, run.seq_length, run.pad_id
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    is_main = accelerator.is_main_process

    train_split = TokenizedSplit(tokenize_dir, "train")
    valid_split = TokenizedSplit(tokenize_dir, "valid")
    # The fine-tuning tasks (train.tasks, else all but preference tasks); ids and names stay those of the output
    selected = trained_task_ids(job, "sft", cfg.tasks)
    train_split.keep_tasks(selected)
    valid_split.keep_tasks(selected)
    train_batch = batch_maker(train_split, seq_length, pad_id, device)
    valid_batch = batch_maker(valid_split, seq_length, pad_id, device)
    task_names = [t["name"] for t in job["tasks"]]
    task_weights = torch.tensor([t["weight"] for t in job["tasks"]], dtype=torch.float32)
    # sampling=weights already puts the weights into the task mix; weighing the loss again would
    # apply them twice.
    loss_weights = torch.ones_like(task_weights) if cfg.sampling == "weights" else task_weights

    # Every epoch re-samples and re-packs, so epochs hold different numbers of steps: the run's
    # total is the sum of the planned epochs' own counts (up to max_steps).
    plans = []
    while len(plans) < cfg.epochs and sum(p.num_optimizer_steps for p in plans) < (cfg.max_steps or float("inf")):
        plans.append(epoch_plan(train_split, epoch=len(plans), seed=cfg.seed, seq_length=seq_length,
                                rows_per_micro_batch=cfg.rows_per_micro_batch, world_size=world,
                                grad_accum=cfg.grad_accum, sampling=cfg.sampling, alpha=cfg.sampling_alpha,
                                task_weights=task_weights.tolist()))
    total_steps = total_optimizer_steps([p.num_optimizer_steps for p in plans], cfg.max_steps)
    if len(valid_split) == 0:
        log.warning("no validation data (ingest.valid_fraction and min_valid are 0): no validation, "
                    "no early stopping, no best model")
        valid_plans, valid_batches = None, None
    else:
        valid_plans = validation_plan(valid_split, seq_length=seq_length,
                                      rows_per_micro_batch=cfg.rows_per_micro_batch, world_size=world)
        valid_batches = valid_plans[rank]

    model = load_model(job_path(job["model_dir"], work_dir), cfg, precision, attention, on_gpu,
                       trust_remote_code=job["trust_remote_code"])
    wrapper, optimizer, scheduler, trainable = prepare_training(run, model, total_steps)

    state = {"step": 0, "epoch": 0, "group": 0, "best_loss": None, "best_step": None,
             "evals_without_improvement": 0, "trained_tokens": 0, "coba": None}
    balancer = None
    if cfg.loss == "coba":
        if valid_batches is None:
            raise RuntimeError("train.loss=coba needs validation data")
        balancer = CoBa(len(task_names), warmup_steps=cfg.coba.warmup_steps, history_length=cfg.coba.history_length,
                        tau=cfg.coba.tau, update_interval=cfg.coba.update_interval, min_weight=cfg.coba.min_weight)
    resume_from = ckpt.latest_checkpoint(work_dir)
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from, trainable, deepspeed)
        if balancer is not None:
            balancer.load_state_dict(tensors_from_json(state["coba"]))
        log.info("resumed from %s (step %d)", resume_from, state["step"])
    metrics = MetricsLog(work_dir, enabled=is_main, resume_step=state["step"])
    if is_main:
        (work_dir / "hyperparameters.json").write_text(json.dumps({
            **job, "precision": precision, "attention": attention, "world_size": world,
            "steps_per_epoch": [p.num_optimizer_steps for p in plans], "total_steps": total_steps}, indent=1) + "\n")
        print(f"progress step={state['step']} total={total_steps}", flush=True)

    # ------------------------------------------------------------------------- evaluation

    def evaluate() -> dict[str, float]:
        """Per-task token-mean validation loss over all validation data, all ranks together."""
        wrapper.eval()
        sums, counts = task_loss_totals(wrapper, valid_batch, valid_batches, len(task_names))
        wrapper.train()
        return {name: (sums[k] / counts[k]).item() for k, name in enumerate(task_names) if counts[k] > 0}

    def coba_measure() -> torch.Tensor:
        """Per-task validation losses on CoBa's `coba.valid_batches` validation micro-batches, the
        same ones at every measurement (so the slopes see training, not which samples were drawn;
        every rank takes as many), token-weighted and all-reduced; nan where a task had no token."""
        wrapper.eval()
        sums, counts = task_loss_totals(wrapper, valid_batch, coba_batches, len(task_names))
        wrapper.train()
        return losses.task_mean_losses(sums, counts)

    if balancer is not None:
        # Every process takes as many as the process that needs the most to hold all its tasks.
        tasks_in = lambda rows: {int(valid_split.task_ids[sample]) for row in rows for sample in row}
        count = max(len(measurement_batches(plan, cfg.coba.valid_batches, tasks_in)) for plan in valid_plans)
        coba_batches = measurement_batches(valid_batches, count, tasks_in)

    if balancer is not None and resume_from is None:
        # The normalizers: one full validation pass before any training; the curves' first point:
        # the measurement batches, before any training too.
        before = evaluate()
        balancer.set_normalizers(torch.tensor([before.get(n, float("nan")) for n in task_names], dtype=torch.float64))
        balancer.update(0, coba_measure())

    def weighted(per_task: dict[str, float]) -> float:
        pairs = [(task_weights[task_names.index(n)].item(), v) for n, v in per_task.items()]
        return sum(w * v for w, v in pairs) / sum(w for w, _ in pairs)

    # ------------------------------------------------------------------------- train

    wrapper.train()
    done = state["step"] >= total_steps  # resumed from the final checkpoint: nothing left but saving
    stop = False  # early stopping
    tick = time.perf_counter()
    for epoch, group_index, group in [] if done else step_groups(plans, rank, cfg.grad_accum, state):
        batches = [train_batch(rows) for rows in group]
        counts = losses.all_reduce_counts(losses.group_counts(batches, len(task_names)))
        reference = (focal_task_reference(wrapper, train_batch, group, len(task_names), device)
                     if cfg.loss == "focal_task" else None)
        # CoBa's weights hold for every micro-step of the step (changed only between steps)
        step_weights = balancer.weights.float() if balancer is not None else loss_weights
        mode = "case3" if balancer is not None else cfg.loss
        objective = torch.zeros((), dtype=torch.float64)
        task_sums = torch.zeros(len(task_names), dtype=torch.float64)
        task_tokens = torch.zeros(len(task_names), dtype=torch.float64)
        input_tokens = torch.tensor(float(sum(int((b["task_ids"] >= 0).sum()) for b in batches)), dtype=torch.float64)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            # The last micro-batch is the step's sync point: DDP and FSDP reduce gradients
            # only there (no_sync before), and accelerate's backward steps DeepSpeed's engine
            # wherever sync_gradients is set (left on, it stepped after every micro-batch).
            accelerator.sync_gradients = last
            with nullcontext() if last else accelerator.no_sync(wrapper):
                # real_tokens: a mixture of experts balances its routers over samples, not padding
                out = wrapper(batch["input_ids"], batch["position_ids"], batch["labels"],
                              real_tokens=batch["task_ids"] >= 0)
                token_task = losses.trained_values(batch["task_ids"], batch["labels"])
                token_sample = losses.trained_values(batch["sample_ids"], batch["labels"])
                contribution = losses.mft_loss(mode, out.token_loss, token_task, token_sample, counts,
                                               step_weights, gamma=cfg.focal_gamma, task_reference=reference)
                # Gradients are averaged over ranks (x world) and DeepSpeed divides each
                # micro-step by its accumulation steps (x grad_accum): undo both, so the step's
                # gradient is that of the summed contributions, the global objective.
                scale = world * (cfg.grad_accum if deepspeed else 1)
                loss = contribution * scale
                if out.aux_loss is not None:
                    loss = loss + out.aux_loss * scale / (world * len(batches))
                accelerator.backward(loss)
            objective += contribution.detach().double().cpu()
            s, c = losses.per_task_loss_sums(out.token_loss.detach().double(), token_task, len(task_names))
            task_sums += s.cpu()
            task_tokens += c.cpu()
        lr_used = scheduler.get_last_lr()[0]  # the lr of this update (scheduler.step() moves to the next)
        grad_norm = optimizer_step(accelerator, wrapper, optimizer, scheduler, cfg.max_grad_norm, deepspeed)

        state["step"] += 1
        state["epoch"], state["group"] = epoch, group_index + 1
        if deepspeed and wrapper.global_steps != state["step"]:
            raise RuntimeError(f"DeepSpeed's engine took {wrapper.global_steps} optimizer steps in {state['step']} "
                               "steps of this loop: its accumulation boundary is not the loop's")
        objective = losses.all_reduce_sum(objective)
        task_sums, task_tokens = losses.all_reduce_sum(task_sums), losses.all_reduce_sum(task_tokens)
        step_tokens = int(task_tokens.sum().item())
        input_tokens = int(losses.all_reduce_sum(input_tokens).item())
        state["trained_tokens"] += step_tokens
        now = time.perf_counter()
        metrics.write({
            "step": state["step"], "epoch": epoch, "lr": lr_used,
            "loss": objective.item(),
            "grad_norm": grad_norm,  # before clipping
            "task_loss": {n: (task_sums[k] / task_tokens[k]).item() for k, n in enumerate(task_names) if task_tokens[k] > 0},
            "task_tokens": {n: int(task_tokens[k].item()) for k, n in enumerate(task_names)},
            "trained_tokens_per_s": step_tokens / max(now - tick, 1e-9),
            "tokens": input_tokens,  # non-padding tokens that went through the model
            "tokens_per_s": input_tokens / max(now - tick, 1e-9),
            "step_seconds": now - tick,
            "peak_rss_mb": peak_rss_mb(),
            **({"cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20} if on_gpu else {}),
            **({"task_weight": dict(zip(task_names, step_weights.tolist()))} if balancer is not None else {}),
        })
        if balancer is not None and balancer.should_update(state["step"]):
            balancer.update(state["step"], coba_measure())
        if is_main:  # the stage turns it into the live line (step, loss, tokens/s, time left)
            print(f"progress step={state['step']} total={total_steps} loss={objective.item():.6g} "
                  f"tokens_per_s={input_tokens / max(now - tick, 1e-9):.1f}", flush=True)

        last_step = state["step"] >= total_steps
        if valid_batches is not None and (state["step"] % cfg.eval_every == 0 or last_step):
            per_task = evaluate()
            score = weighted(per_task)
            improved = state["best_loss"] is None or score < state["best_loss"]
            if improved:
                state["best_loss"], state["best_step"] = score, state["step"]
                state["evals_without_improvement"] = 0
                save_weights(accelerator, wrapper, work_dir / "best-model")
            else:
                state["evals_without_improvement"] += 1
            metrics.write({"step": state["step"], "valid_loss": score, "valid_task_loss": per_task})
            patience = cfg.early_stopping_patience
            if patience and state["evals_without_improvement"] >= patience:
                log.info("early stopping at step %d: no better validation loss in %d evaluations", state["step"], patience)
                stop = True
        if state["step"] % cfg.checkpoint_every == 0 or last_step or stop:
            if balancer is not None:
                state["coba"] = tensors_to_json(balancer.state_dict())
            ckpt.save_checkpoint(accelerator, work_dir, state["step"], state, cfg.keep_checkpoints,
                                 protect=state["best_step"], deepspeed=deepspeed)
        tick = time.perf_counter()
        if last_step or stop:
            break

    # ------------------------------------------------------------------------- save

    save_weights(accelerator, wrapper, work_dir / "model")
    if is_main:
        summary = {
            "steps": state["step"], "total_steps": total_steps, "trained_tokens": state["trained_tokens"],
            "best_valid_loss": state["best_loss"], "best_step": state["best_step"],
            "final_valid_task_loss": metrics.last_validation(), "tasks": task_names,
            "early_stopped": state["step"] < total_steps,
            **({"deepspeed_global_steps": wrapper.global_steps} if deepspeed else {}),
        }
        (work_dir / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        plot_loss_curves(work_dir / "metrics.jsonl", work_dir / "loss_curves.png")
    metrics.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def tensors_to_json(value):
    """CoBa's state (tensors inside dicts) as JSON-able data, for trainer_state.json."""
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {k: tensors_to_json(v) for k, v in value.items()}
    return value


def tensors_from_json(value):
    if isinstance(value, dict) and "__tensor__" in value:
        return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
    if isinstance(value, dict):
        return {k: tensors_from_json(v) for k, v in value.items()}
    return value


def save_weights(accelerator, wrapper, out: Path) -> None:
    """The adapter (LoRA) or the full model in Hugging Face format, gathered from every rank."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(wrapper)  # gathers ZeRO-3 / FSDP shards
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(wrapper).model
        prefix = "model."
        inner = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        # Only the trained adapter: a frozen one under it (align's) is an input, not an output.
        selected = {"selected_adapters": ["default"]} if len(getattr(model, "peft_config", {})) > 1 else {}
        publish_folder(out, lambda tmp: model.save_pretrained(tmp, state_dict=inner, safe_serialization=True, **selected))
    accelerator.wait_for_everyone()


def publish_folder(out: Path, write) -> None:
    """write(tmp) into a fresh out.tmp, then put it in out's place: out is never half written."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def run_from_command_line(recipe_main, description: str) -> None:
    """`python -m <recipe> --work-dir DIR`, as the stages start a recipe (launch.trainer_command)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work-dir", required=True, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe_main(args.work_dir)


if __name__ == "__main__":
    run_from_command_line(main, "mft-pipeline trainer (started by the train stage)")
