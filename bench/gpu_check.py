"""Acceptance check for a lent GPU: every training path of the pipeline, one JSON file and a table.

    .venv/bin/python bench/gpu_check.py                          # a GPU machine: SmolLM2, bf16
    .venv/bin/python bench/gpu_check.py --smoke --model DIR      # CPU, tiny settings (the test suite)

Checks, each through the real stages (ingest, tokenize, train, merge) on two small synthetic tasks:
  lora-packed-rows      single-process LoRA, 2 packed rows per micro-batch: the loss falls
  packed=unpacked/<att> per attention implementation here (flash_attention_2 on a GPU with flash-attn,
                        sdpa_varlen, sdpa): per-token losses of a 2-row packed micro-batch equal each
                        sample run alone
  zero<2|3>             DeepSpeed on one device, grad_accum 4: global_steps == steps, the adapter equals
                        the plain run's (relative difference of the LoRA update), killed after checkpoint 2
                        and resumed equal to uninterrupted
  fsdp-units            FSDP2 units = decoder layers + the root (one process group of one)
  qlora                 QLoRA trains and its adapter merges into the unquantized base (the merge check passes)
  throughput            the plain run's median tokens/s and MFU; the formula is in the output
Exit status 1 when a check fails. Results: bench/results/gpu_check.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The project root replaces this folder on sys.path (bench/tokenize.py would shadow the stdlib).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import REPO, RESULTS, machine, table  # noqa: E402

# Dense bf16 peak of the card, by name (SXM parts; pass --peak-tflops for others).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def write_tasks(root: Path, per_task: int) -> list[dict]:
    tasks = []
    for name in ("alpha", "beta"):
        (root / name).mkdir(parents=True, exist_ok=True)
        with open(root / name / "d.jsonl", "w") as fh:
            for i in range(per_task):
                question = f"{name} question {i}: write f{i}. " + "more words " * (i % 9)
                answer = f"def f{i}(x):\n    return x * {i} + {len(name)}"
                fh.write(json.dumps({"chat_rounds": [{"role": "human", "content": question},
                                                     {"role": "bot", "content": answer}]}) + "\n")
        tasks.append({"path": str(root / name)})
    return tasks


def config(root: Path, args, **train) -> Any:
    from mft_core.config import config_from_dict

    settings = {"max_steps": args.steps, "warmup_steps": 0, "grad_accum": 4, "rows_per_micro_batch": 2, "lr": 2e-3,
                "min_lr": 1e-4, "eval_every": 1000, "checkpoint_every": 1000, "precision": args.precision,
                "lora": {"dropout": 0.0, "r": 8}, **train}
    raw = {"runs_root": str(root / "runs"), "data": {"tasks": write_tasks(root / "data", args.samples)},
           "model": {"path": args.model}, "ingest": {"decontaminate": {"enabled": False}, "min_valid": 4},
           "tokenize": {"seq_length": args.seq_length, "num_workers": 1}, "train": settings}
    return config_from_dict(raw, root)


def trained(cfg) -> Path:
    from mft_core.stages import run_stage

    for stage in ("ingest", "tokenize"):
        run_stage(cfg, stage)
    return run_stage(cfg, "train").directory


def step_metrics(out: Path) -> list[dict]:
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def update_difference(reference: Path, other: Path) -> float:
    """|B_other - B_ref| / |B_ref| over the LoRA B matrices (they start at zero: B is the update)."""
    from safetensors.torch import load_file

    a, b = (load_file(d / "model" / "adapter_model.safetensors") for d in (reference, other))
    keys = [k for k in a if "lora_B" in k]
    num = sum(float((b[k].float() - a[k].float()).norm() ** 2) for k in keys) ** 0.5
    return num / max(sum(float(a[k].float().norm() ** 2) for k in keys) ** 0.5, 1e-30)


def killed_and_resumed(root: Path, args, **train) -> tuple[Path, int | None]:
    """The same run, killed once checkpoint 2 is complete, then resumed by the stage."""
    from mft_core.stages import run_stage

    cfg = config(root, args, checkpoint_every=2, **train)
    for stage in ("ingest", "tokenize"):
        run_stage(cfg, stage)
    config_file = root / "pipeline.yaml"  # the resolved config (absolute paths), for `mft train`
    config_file.write_text(cfg.model_dump_json())
    proc = subprocess.Popen([sys.executable, "-m", "mft_core.cli", "train", "--config", str(config_file)], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1800
    while time.time() < deadline and proc.poll() is None:
        if list((root / "runs" / "train").glob("*.partial/checkpoints/step-0000002/COMPLETE")):
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [p.parent.name for p in (root / "runs" / "train").glob("*.partial/checkpoints/step-*/COMPLETE")]
    resumed_from = int(max(done).split("-")[1]) if done else None  # 2 unless it was killed too late
    return run_stage(cfg, "train").directory, resumed_from


def packed_equals_unpacked(args, attention: str) -> float:
    """Max |difference| of per-token losses: two packed rows in one micro-batch vs each sample alone."""
    import torch

    from mft_core.config import TrainConfig
    from mft_core.data.pack import build_packed_row
    from mft_core.train.attention import packed_segments
    from mft_core.train.model import TokenLossModel, load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = Path(args.model)
    precision = "bf16" if attention == "flash_attention_2" else "fp32"
    wrapper = TokenLossModel(load_model(model_dir, TrainConfig(lora={"dropout": 0.0}), precision, attention,
                                        on_gpu=device.type == "cuda")).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    vocab = wrapper.model.get_base_model().config.vocab_size
    rows = []
    for lengths in ((9, 14, 6), (20, 5)):
        samples = [{"input_ids": torch.randint(3, vocab, (n,), generator=generator).tolist(),
                    "loss_mask": [0] * (n // 2) + [1] * (n - n // 2), "task_id": 0} for n in lengths]
        rows.append(build_packed_row(samples, 32, pad_id=0))
    tensor = lambda field: torch.stack([torch.as_tensor(getattr(r, field)) for r in rows]).to(device)
    ids, pos, labels = tensor("input_ids"), tensor("position_ids"), tensor("labels")
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        packed = wrapper(ids, pos, labels).token_loss
        alone = torch.cat([wrapper(ids[r:r + 1, a:b], pos[r:r + 1, a:b], labels[r:r + 1, a:b]).token_loss
                           for r, row in enumerate(packed_segments(pos.cpu())) for a, b in row])
    return float((packed - alone).abs().max())


def fsdp_units(args) -> tuple[int, int]:
    import torch
    import torch.distributed as dist

    from mft_core.config import TrainConfig
    from mft_core.train.launch import free_port
    from mft_core.train.model import TokenLossModel, load_model, shard_decoder_layers

    on_gpu = torch.cuda.is_available()
    port = free_port()
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrapper = TokenLossModel(load_model(Path(args.model), TrainConfig(),
                                            "fp32", "sdpa_varlen", on_gpu=on_gpu))
        if on_gpu:
            wrapper = wrapper.cuda()
        layers = wrapper.model.get_base_model().config.num_hidden_layers
        return shard_decoder_layers(wrapper, "fp32"), layers
    finally:
        dist.destroy_process_group()


def throughput(out: Path, args) -> dict[str, Any]:
    """Median tokens/s after the first step, and MFU = (6 N + 12 L H T) x tokens/s / peak."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM


    steps = step_metrics(out)
    speeds = [m["tokens_per_s"] for m in steps[1:]] or [m["tokens_per_s"] for m in steps]
    tokens_per_s = statistics.median(speeds)
    model_config = AutoConfig.from_pretrained(args.model)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config).parameters())
    layers, hidden = model_config.num_hidden_layers, model_config.hidden_size
    flops_per_token = 6 * parameters + 12 * layers * hidden * args.seq_length
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if name and k in name), None)
    return {"tokens_per_s": tokens_per_s, "parameters": parameters, "flops_per_token": flops_per_token,
            "device": name or "cpu", "peak_tflops": peak,
            "mfu": flops_per_token * tokens_per_s / (peak * 1e12) if peak else None,
            "formula": "MFU = (6 N + 12 L H T) x tokens/s / peak bf16 FLOP/s; N parameters, L layers, H hidden size, "
                       "T seq_length (PaLM's attention term, an upper bound for packed samples); 6 N counts weight "
                       "gradients a LoRA does not compute (about 4 N are done)"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model folder, Hub id or alias")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny settings: fp32, 4 steps, 64-token rows")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20; smoke 4)")
    parser.add_argument("--seq-length", type=int, default=None, help="tokens per packed row (default 1024; smoke 96)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for MFU")
    parser.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    parser.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    args = parser.parse_args()
    import torch

    args.steps = args.steps or (4 if args.smoke else 20)
    args.seq_length = args.seq_length or (96 if args.smoke else 1024)
    args.samples = 40 if args.smoke else 600
    args.precision = "fp32" if args.smoke else "auto"
    args.work = args.work or tempfile.mkdtemp(prefix="gpu-check-")
    on_gpu = torch.cuda.is_available()
    work = Path(args.work)
    from mft_core.modeling import resolve_model

    args.model = str(resolve_model(args.model, work / "models"))  # converted once (an alias), then a folder
    rows: list[dict[str, Any]] = []

    def check(name: str, passed: bool, **numbers: Any) -> None:
        rows.append({"check": name, "passed": bool(passed), **numbers})
        print(f"{'ok  ' if passed else 'FAIL'} {name} {json.dumps(numbers)}", flush=True)

    # The tolerances: exact arithmetic in fp32 (smoke), bf16's own differences on a GPU.
    update_tolerance = 1e-4 if args.precision == "fp32" else 5e-2
    loss_tolerance = 1e-5 if args.precision == "fp32" else 5e-2

    plain = trained(config(work / "plain", args))
    losses = [m["loss"] for m in step_metrics(plain)]
    check("lora-packed-rows", losses[-1] < losses[0], first_loss=losses[0], last_loss=losses[-1], steps=len(losses))

    attentions = ["sdpa_varlen", "sdpa"]
    if on_gpu and __import__("importlib").util.find_spec("flash_attn"):
        attentions.insert(0, "flash_attention_2")
    for attention in attentions:
        difference = packed_equals_unpacked(args, attention)
        check(f"packed=unpacked/{attention}", difference <= loss_tolerance, max_abs_diff=difference)

    for stage in (2, 3):
        launch = {"num_processes": 1, "backend": "deepspeed", "zero_stage": stage}
        ds = trained(config(work / f"zero{stage}", args, launch=launch))
        summary = json.loads((ds / "train_summary.json").read_text())
        difference = update_difference(plain, ds)
        resumed, resumed_from = killed_and_resumed(work / f"zero{stage}-resumed", args, launch=launch)
        resumed_difference = update_difference(ds, resumed)
        check(f"zero{stage}", summary.get("deepspeed_global_steps") == args.steps and difference <= update_tolerance
              and resumed_from == 2 and resumed_difference <= update_tolerance,
              global_steps=summary.get("deepspeed_global_steps"), update_vs_plain=difference,
              resumed_from_step=resumed_from, resumed_vs_uninterrupted=resumed_difference)

    units, layers = fsdp_units(args)
    check("fsdp-units", units == layers + 1, units=units, decoder_layers=layers)

    qlora_cfg = config(work / "qlora", args, method="qlora", precision="bf16" if args.smoke else "auto")
    trained(qlora_cfg)
    from mft_core.stages import run_stage

    merge = json.loads((run_stage(qlora_cfg, "merge").directory / "merge_report.json").read_text())["check"]
    check("qlora", merge["passed"], merge_max_abs_diff=merge["max_abs_diff"], tolerance=merge["tolerance"])

    speed = throughput(plain, args)
    check("throughput", speed["tokens_per_s"] > 0, **{k: v for k, v in speed.items() if k != "formula"})

    result = {"machine": machine(), "gpu": torch.cuda.get_device_name() if on_gpu else None, "smoke": args.smoke,
              "model": args.model, "steps": args.steps, "seq_length": args.seq_length, "checks": rows,
              "mfu_formula": speed["formula"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(table(["check", "passed", "numbers"],
                [[r["check"], r["passed"], ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in r.items() if k not in ("check", "passed"))] for r in rows]))
    print(f"\n{speed['formula']}\nresults: {args.out}")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
