"""Training throughput and memory: our train stage vs TRL's SFTTrainer, same run.

Same model (SmolLM2-135M-Instruct), same LoRA (r16, alpha 32, all linear layers), same
precision, same samples (TRL gets our tokenized demo samples, input ids and completion masks, so
both train on exactly the same tokens), sequence length 1024 and about 4k token slots per
optimizer step: ours packs rows of 1024 (1 row x 4 accumulation steps), TRL batches 4 samples
padded to the longest (and, with --trl-packed, TRL's own packing). Each side runs in a fresh
process; the first step (warm-up) is left out. Ours runs attention once per packed sample
(train.attention: auto = sdpa_varlen on CPU), recomputes each layer's MLP in backward
(train.gradient_checkpointing: mlp) and runs on tcmalloc (train.allocator: auto, when installed);
TRL keeps its defaults (sdpa with a padding mask, SFTConfig checkpoints whole layers, glibc malloc). Reported: real (non-padding) tokens/s and peak RSS
(each process's own VmHWM: getrusage's ru_maxrss would count the bench process's memory at spawn
time into both), and ours/TRL ratios.

    .venv/bin/python bench/train.py [--steps 4] [--precision fp32|bf16|auto] [--trl-packed]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# The project root replaces this folder on sys.path (bench/tokenize.py would shadow the stdlib).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import REPO, ensure_demo_data, save, table  # noqa: E402

SEQ = 1024
SLOTS_PER_STEP = 4096


def prepare(runs: Path, precision: str) -> dict:
    from mft_core.config import load_config
    from mft_core.stages import run_stage

    from mft_core.modeling import resolve_model

    model = str(resolve_model("smollm2-135m-instruct", REPO / "runs"))
    cfg = load_config(REPO / "pipeline.yaml", {"runs_root": str(runs), "tokenize.seq_length": SEQ, "model.path": model})
    ingest_dir = run_stage(cfg, "ingest").directory
    tokenize_dir = run_stage(cfg, "tokenize", upstream_dir=ingest_dir).directory
    return {"tokenize_dir": str(tokenize_dir), "model_dir": model, "precision": precision}


def run_ours(runs: Path, steps: int, precision: str) -> dict:
    from mft_core.config import load_config
    from mft_core.modeling import resolve_model
    from mft_core.stages import run_stage

    overrides = {
        "runs_root": str(runs), "tokenize.seq_length": SEQ, "train.max_steps": steps, "train.warmup_steps": 0,
        "train.rows_per_micro_batch": 1, "train.grad_accum": SLOTS_PER_STEP // SEQ, "train.eval_every": 10**6,
        "train.checkpoint_every": 10**6, "train.precision": precision, "train.lora.dropout": 0.0,
        # TRL's SFTConfig checkpoints whole layers by default; we recompute the MLPs only
        "train.gradient_checkpointing": "mlp",
        "model.path": str(resolve_model("smollm2-135m-instruct", REPO / "runs")),
    }
    cfg = load_config(REPO / "pipeline.yaml", overrides)
    out = run_stage(cfg, "train").directory
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    timed = records[1:]
    return {
        # the median step: robust to other jobs on a shared machine (the first step is warm-up)
        "tokens_per_s": statistics.median(r["tokens"] / r["step_seconds"] for r in timed),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in records),
    }


TRL_SCRIPT = r'''
import json, os, sys, time
import torch
torch.set_num_threads(os.cpu_count())
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
sys.path.insert(0, sys.argv[1])
from mft_core.train.data import TokenizedSplit
from mft_core.train.metrics import peak_rss_mb

job = json.loads(sys.argv[2])
steps, packed = int(sys.argv[3]), sys.argv[4] == "packed"
split = TokenizedSplit(job["tokenize_dir"], "train")
rows = [split.sample(i) for i in range(len(split))]
data = Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in rows],
                          "completion_mask": [r["loss_mask"].tolist() for r in rows]})
tok = AutoTokenizer.from_pretrained(job["tokenize_dir"] + "/tokenizer")
bf16 = job["precision"] == "bf16"
model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
# padded: 4 samples per step, padded to the longest; packed: 4 packed rows of 1024 (TRL's BFD packing)
args = SFTConfig(output_dir=sys.argv[5], per_device_train_batch_size=4, gradient_accumulation_steps=1,
                 max_length=1024, max_steps=steps, learning_rate=2e-4, logging_steps=1, report_to=[], save_strategy="no",
                 use_cpu=True, bf16=bf16, dataloader_num_workers=0, completion_only_loss=True, packing=packed, seed=42)
counted = []
class Timer(TrainerCallback):
    def on_step_begin(self, a, s, c, **k): self.t = time.perf_counter()
    def on_step_end(self, a, s, c, **k): counted.append(time.perf_counter() - self.t)
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                     peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
                     callbacks=[Timer()])
collate = trainer.data_collator
tokens = []
def counting(features):
    batch = collate(features)
    # padded batches carry an attention mask; packed (padding-free) ones hold only real tokens
    tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel())
    return batch
trainer.data_collator = counting
trainer.train()
timed = counted[1:]
import statistics
print(json.dumps({"tokens_per_s": statistics.median(t / s for t, s in zip(tokens[1:len(counted)], timed)),
                  "peak_rss_mb": peak_rss_mb()}))
'''


def run_trl(job: dict, steps: int, packed: bool) -> dict:
    out = tempfile.mkdtemp(prefix="bench-trl-")
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count()), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", TRL_SCRIPT, str(REPO), json.dumps(job), str(steps),
                           "packed" if packed else "padded", out], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"TRL run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per side (the first is not timed)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--trl-packed", action="store_true", help="also run TRL with packing")
    args = parser.parse_args()
    ensure_demo_data(REPO / "demo-data")
    runs = Path(tempfile.mkdtemp(prefix="bench-train-"))
    precision = args.precision
    if precision == "auto":
        from mft_core.train.model import resolve_precision

        precision = resolve_precision("auto", on_gpu=False)
    job = prepare(runs, precision)
    results = {"ours": run_ours(runs, args.steps, precision), "trl_padded": run_trl(job, args.steps, packed=False)}
    if args.trl_packed:
        results["trl_packed"] = run_trl(job, args.steps, packed=True)
    base = results["trl_padded"]
    rows = [[name, r["tokens_per_s"], r["peak_rss_mb"], r["tokens_per_s"] / base["tokens_per_s"], r["peak_rss_mb"] / base["peak_rss_mb"]]
            for name, r in results.items()]
    from mft_core.train.launch import find_tcmalloc

    allocator = "tcmalloc" if find_tcmalloc() else "glibc malloc"
    print(f"SmolLM2-135M, LoRA r16 all-linear, {precision}, seq {SEQ}, ~{SLOTS_PER_STEP} token slots/step, {args.steps} steps; "
          f"ours: sdpa_varlen, MLP checkpointing, {allocator}; TRL: its defaults (whole-layer checkpointing)")
    print(table(["run", "real tokens/s", "peak RSS MB", "speed vs TRL padded", "RSS vs TRL padded"], rows))
    path = save("train", {"precision": precision, "steps": args.steps, "baseline": "TRL SFTTrainer, padded batches",
                          "ours": {"attention": "sdpa_varlen", "gradient_checkpointing": "mlp", "allocator": allocator},
                          "results": results,
                          "ratios": {n: {"speed": r["tokens_per_s"] / base["tokens_per_s"], "rss": r["peak_rss_mb"] / base["peak_rss_mb"]}
                                     for n, r in results.items()}})
    print(f"written {path}")


if __name__ == "__main__":
    main()
