"""Merge stage: the train stage's adapter + the base model -> a plain Hugging Face model folder,
proven equal to what was trained.

Output directory (`runs/merge/<key16>/`):
  model/              a plain HF causal-LM folder, usable anywhere (transformers, vLLM, llama.cpp
                      conversion): safetensors weights in `merge.dtype` (sharded above
                      `merge.max_shard_size`), config.json, generation_config.json (the training
                      EOS and pad), the tokenizer of the tokenize stage (its chat template renders
                      the training prompt) and a model card README.md
  template.json       the tokenize stage's template.json (rendering, role markers, eos/pad ids)
  merge_report.json   what was merged and the equivalence check: max / mean |logit difference|
                      and argmax agreement of the saved model vs the trained one, and how far the
                      fine-tune moved the logits from the base (so a passing check means something)

(The model lives in `model/` because the store writes its own config.json, the resolved pipeline
config, at the top of every stage directory.)

LoRA / DoRA / QLoRA: a fresh *unquantized* base in `merge.dtype` + `PeftModel.from_pretrained`,
then PEFT's merge one adapted layer at a time in float64, rounded once into `merge.dtype`
(`merge_in_float64`): the saved weights are the correctly rounded W + delta, whatever precision
the CPU's fp32 matmul kernels use. A QLoRA adapter is folded into the full-precision base, never
into a de-quantized nf4 one (reference/peers.md §3: merging into a quantized base changes outputs).
Full fine-tuning: nothing to merge; the trained weights are saved in `merge.dtype` with the same
folder contract and checked the same way.

The check: the saved folder is loaded back (so what is on disk is what is checked) and run next
to the reference: base + adapter unmerged (`PeftModel.from_pretrained` on a fresh base in
`merge.dtype`), or the trained full model; on `merge.check_samples` validation samples taken
round-robin over the tasks, one unpacked sample at a time (a plain causal forward over prompt and
answer: no packing, so no position-id or block-mask subtlety can enter the comparison). Every
logit of every position counts. The stage fails with the numbers when the max |difference|
exceeds `merge.tolerance` (default: FP32_TOLERANCE / BF16_TOLERANCE).

Both models hold the weights they have in `merge.dtype` but compute in float64 *throughout*
(`float64_compute`): model code upcasts to float32 on purpose (RMSNorm, rotary angles), and in a
float64 model those upcasts are islands of fp32 arithmetic. Their rounding, amplified by the
outlier activations of small LMs, is not the merge's and may depend on the machine (fp32
arithmetic alone moves SmolLM2-135M's logits by up to 1.8e-2 between two processes). A correct
2-step demo merge measured 2.2e-5 here and 1.9e-2 on a CI machine, not reproducible here; the
merge arithmetic and these fp32 steps were the two places that machine's kernels could enter,
and both are float64 now. In float64 throughout, a merge done in float64 equals the unmerged
forward to 3e-13, so what is left is what the merge wrote into the weights. Cost: 8 bytes per parameter for each of the two models held during the
check, and float64 matmuls (SmolLM2-135M, 8 demo samples, 2 cores: ~40 s vs ~17 s in fp32).

Measured (SmolLM2-135M, the demo's LoRA r 16 on all linear layers, 2 cores):
  fp32 merge, 16-step demo adapter (moves the logits by up to 14.4; 8 samples, 2147 tokens):
    max 6.8e-6, mean 5.1e-7, argmax agreement 100 %
  fp32 merge, 2-step adapter (moves them by 1.75; 2 samples): max 7.0e-6, mean 5.2e-7
That error is the rounding of W + BA into fp32 storage (about 6e-8 of each weight), which no merge
can avoid: FP32_TOLERANCE 1e-4 leaves it a 15x margin and sits four orders of magnitude below
what a wrong merge does (errors of 1 and more; a LoRA on a tied output head: 6 on the tiny model).
  bf16 merge: an earlier demo adapter (effect 8.7): max 2.31, mean 0.13, argmax agreement 97.4 %;
  the 16-step demo adapter (effect 15.2 in bf16): max 14.7, mean 0.20, argmax agreement 96.0 %.
In bf16, W + delta is rounded to bf16 once, and an update smaller than W's bf16 spacing (2^-8 of
|W|) is rounded away (PEFT #1388 / #1836): a short fine-tune with small updates can lose most of
its effect in places. BF16_TOLERANCE 4.0 passes bf16 merges that keep the fine-tune and fails
those that lose it, with a message that says to merge in fp32; bf16 is for size, not exactness.

That float64 check holds a model in 8 bytes per parameter on the CPU: cheap for small models, 56 GB
and hours for a 7B. Above FLOAT64_CHECK_MAX_PARAMETERS the check runs in fp32 on the GPU (the CPU
without one), on FP32_CHECK_TOKENS tokens, against the storage dtype's tolerance plus fp32's own
arithmetic noise (2^14 fp32 epsilons of the largest reference logit); merge_report.json says which
check ran and with what numbers. Either way one model is held at a time.

Timings (load, merge, save, check) are logged, not written into the output: the output must be a
pure function of the inputs, so that a rebuilt merge leaves the downstream keys unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mft_core import store
from mft_core.config import PipelineConfig
from mft_core.console import announce
from mft_core.modeling import SMOLLM2_ALIAS, load_pretrained, load_tokenizer, resolve_model
from mft_core.store import FileHashCache
from mft_core.train.stage import job_path, model_digest

log = logging.getLogger("mft.merge")

STAGE_VERSION = 2  # 2: merged in float64, checked in float64 throughout
MODEL_DIR = "model"
REPORT = "merge_report.json"
FP32_TOLERANCE = 1e-4  # fp32 storage rounding of W + BA: see the module docstring
BF16_TOLERANCE = 4.0  # measured bound, see the module docstring
# The float64 check holds a model in 8 bytes per parameter on the CPU (and float64 matmuls):
# cheap up to here, 56 GB and hours for a 7B. Larger models are checked in fp32 on the GPU.
FLOAT64_CHECK_MAX_PARAMETERS = 1_000_000_000
FP32_CHECK_TOKENS = 2048  # token budget of the fp32 check (its reference logits are kept on the CPU)
# fp32 arithmetic of two different computations (W x + B A x against (W + BA) x, through every
# layer) differs by up to ~2^12 fp32 epsilons of the logits' size (SmolLM2: 1.8e-2 at |logits| ~ 25);
# the fp32 check allows 2^14 on top of the storage dtype's own tolerance. A wrong merge is off by 1+.
FP32_CHECK_RELATIVE = 2**14 * 1.1920928955078125e-07
ADAPTER_METHODS = ("lora", "qlora")
# Hub ids of the model aliases, for the model card's `base_model` metadata.
HUB_IDS = {SMOLLM2_ALIAS: "HuggingFaceTB/SmolLM2-135M-Instruct"}


class MergeCheckFailed(RuntimeError):
    """The saved model's logits differ from the trained model's by more than the tolerance."""


def default_tolerance(dtype: str) -> float:
    return FP32_TOLERANCE if dtype == "fp32" else BF16_TOLERANCE


def merge_key_parts(cfg: PipelineConfig, hashes: FileHashCache) -> tuple[dict[str, Any], list[str]]:
    """The merge section and the base model's content. The train output (adapter, tokenizer path,
    losses) enters the key through its manifest; the base weights are not in that manifest, and
    the merge reads them again, so they are hashed here (cheap: the hash cache knows them)."""
    model_dir = resolve_model(cfg.model.path, cfg.runs_root)
    return cfg.stage_section("merge"), [f"model:{model_digest(model_dir, hashes)}"]


# ----------------------------------------------------------------------------- the train output


def read_train_output(train_dir: Path, runs_root: Path) -> dict[str, Any]:
    """hyperparameters.json and train_summary.json of a finished train output, checked, with the
    tokenize output that trained it."""
    for required in ("hyperparameters.json", "train_summary.json", MODEL_DIR):
        if not (train_dir / required).exists():
            raise FileNotFoundError(
                f"{train_dir} has no {required}: it is not a finished train output; run the train stage "
                "(`mft train`) and merge its output"
            )
    hyper = json.loads((train_dir / "hyperparameters.json").read_text())
    method = hyper["train"]["method"]
    if method in ADAPTER_METHODS and not (train_dir / MODEL_DIR / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{train_dir / MODEL_DIR} has no adapter_config.json although train.method is {method!r}: "
            "the train output is damaged; rerun the train stage with --force"
        )
    tokenize_dir = job_path(hyper["tokenize_dir"], train_dir)  # relative to the runs root
    if not store.is_complete(tokenize_dir):
        raise FileNotFoundError(
            f"the tokenize output {tokenize_dir} that trained this model is gone or unfinished (named in "
            f"{train_dir / 'hyperparameters.json'}); rerun `mft tokenize`, which rebuilds the same key"
        )
    summary = json.loads((train_dir / "train_summary.json").read_text())
    return {**hyper, "summary": summary, "tokenize_dir": tokenize_dir}


def check_sample_ids(tokenize_dir: Path, count: int) -> tuple[str, list[list[int]]]:
    """Up to `count` samples' token ids, taken round-robin over the tasks (every task is checked),
    from the validation split; the train split only when there is no validation data."""
    from mft_core.train.data import TokenizedSplit

    with_samples = {shard["split"] for shard in json.loads((tokenize_dir / "shards.json").read_text()) if shard["rows"]}
    split = TokenizedSplit(tokenize_dir, "valid" if "valid" in with_samples else "train")
    per_task = [[int(i) for i in (split.task_ids == task).nonzero()[0]] for task in range(split.num_tasks)]
    chosen: list[int] = []
    for round_index in range(max((len(ids) for ids in per_task), default=0)):
        chosen += [ids[round_index] for ids in per_task if round_index < len(ids)]
    return split.split, [split.sample(i)["input_ids"].tolist() for i in chosen[:count]]


# ----------------------------------------------------------------------------- the stage


def run_merge(cfg: PipelineConfig, train_dir: Path, out_dir: Path) -> dict[str, Any]:
    import torch

    settings = cfg.merge
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[settings.dtype]
    tolerance = settings.tolerance if settings.tolerance is not None else default_tolerance(settings.dtype)
    trained = read_train_output(train_dir, cfg.runs_root)
    method = trained["train"]["method"]
    remote = cfg.model.trust_remote_code  # a model of its own code (model.trust_remote_code)
    base_dir = resolve_model(cfg.model.path, cfg.runs_root)
    template = json.loads((trained["tokenize_dir"] / "template.json").read_text())
    model_out = out_dir / MODEL_DIR
    shutil.rmtree(model_out, ignore_errors=True)
    what = f"{method} adapter into {cfg.model.path}" if method in ADAPTER_METHODS else "the fully trained model"
    announce(log, "merge", f"start: {what}, {settings.dtype}, then checked on {settings.check_samples} samples")

    started = time.perf_counter()
    if method in ADAPTER_METHODS:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(load_causal_lm(base_dir, dtype, remote), train_dir / MODEL_DIR)
        loaded = time.perf_counter()
        model = merge_in_float64(peft_model, dtype)
        del peft_model
    else:
        model = load_causal_lm(train_dir / MODEL_DIR, dtype, remote)
        loaded = time.perf_counter()
    merged = time.perf_counter()
    num_parameters = sum(p.numel() for p in model.parameters())
    model.generation_config.eos_token_id = template["eos_id"]
    model.generation_config.pad_token_id = template["pad_id"]
    model.save_pretrained(model_out, max_shard_size=settings.max_shard_size)
    del model
    save_tokenizer(trained["tokenize_dir"] / "tokenizer", model_out, template, remote)
    # Beside the model, not in it: how training rendered prompts, for exact prompts at evaluation.
    shutil.copyfile(trained["tokenize_dir"] / "template.json", out_dir / "template.json")
    saved = time.perf_counter()

    split, samples = check_sample_ids(trained["tokenize_dir"], settings.check_samples)
    plan = check_plan(num_parameters, torch.cuda.is_available())
    samples = within_budget(samples, plan["token_budget"])
    check = check_equivalence(method, base_dir, train_dir / MODEL_DIR, model_out, dtype, samples,
                              getattr(torch, plan["precision"].replace("fp32", "float32")), torch.device(plan["device"]),
                              trust_remote_code=remote)
    checked = time.perf_counter()
    if settings.tolerance is None and plan["precision"] == "fp32":
        tolerance = default_tolerance(settings.dtype) + FP32_CHECK_RELATIVE * check["max_abs_reference_logit"]
        plan["tolerance_rule"] = (f"{default_tolerance(settings.dtype):g} (merge.dtype {settings.dtype}) + 2^14 fp32 "
                                  f"epsilons x max |reference logit| {check['max_abs_reference_logit']:.4g}")
    check.update(plan, split=split, tolerance=tolerance, passed=check["max_abs_diff"] <= tolerance)
    log.info("merge: load %.2f s, merge %.2f s, save %.2f s, check %.2f s (%d samples, %d tokens)",
             loaded - started, merged - loaded, saved - merged, checked - saved, check["samples"], check["tokens"])

    report: dict[str, Any] = {
        "method": method,
        "merged": method in ADAPTER_METHODS,
        "dtype": settings.dtype,
        "base_model": cfg.model.path if cfg.model.path == SMOLLM2_ALIAS else cfg.display_path(base_dir),
        "base_quantized_in_training": method == "qlora",
        "model_dir": MODEL_DIR,
        "weight_shards": len(list(model_out.glob("*.safetensors"))),
        "weight_bytes": sum(p.stat().st_size for p in model_out.glob("*.safetensors")),
        "check": check,
    }
    if check["passed"]:
        (model_out / "README.md").write_text(model_card(cfg, trained, template, report))
    report["files"] = sorted(p.name for p in model_out.iterdir())
    (out_dir / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    if not check["passed"]:
        raise MergeCheckFailed(failure_message(report, adapter_targets(train_dir / MODEL_DIR), out_dir / REPORT))
    return report


def merge_in_float64(peft_model, dtype):
    """PEFT's merge, one adapted layer at a time in float64, rounded once into `dtype`: the saved
    weight is the correctly rounded W + merge delta, whatever precision this CPU's fp32 matmul
    kernels use (PEFT merges in the weights' dtype). Transient memory: one layer in float64."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            module.to(torch.float64)
            module.merge()
            module.to(dtype)
    return peft_model.unload()  # the merged base layers, without the adapter modules


def load_causal_lm(folder: Path, dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, folder, trust_remote_code, dtype=dtype).eval()


def save_tokenizer(tokenizer_dir: Path, model_out: Path, template: dict[str, Any], trust_remote_code: bool = False) -> None:
    """The tokenize stage's tokenizer (its chat template renders the training prompt). EOS and pad
    are filled in from training only where the tokenizer has none (MFTCoder pads with EOS), so a
    tokenizer that has them is saved unchanged."""
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
    if tokenizer.eos_token_id is None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(template["eos_id"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(template["pad_id"])
    tokenizer.save_pretrained(model_out)


# ----------------------------------------------------------------------------- the check


LogitFn = Callable[["Any"], "Any"]  # token ids [1, T] -> logits [T, V]


def check_plan(num_parameters: int, on_gpu: bool, max_float64: int | None = None) -> dict[str, Any]:
    """How the merge is checked, by model size. Up to FLOAT64_CHECK_MAX_PARAMETERS: float64 on the
    CPU, every logit of every check sample (exact to 3e-13, so only the saved weights show). Above:
    fp32 on the GPU (the CPU without one), on at most FP32_CHECK_TOKENS tokens, against the storage
    dtype's tolerance plus fp32's own noise (FP32_CHECK_RELATIVE x the logits' size)."""
    limit = FLOAT64_CHECK_MAX_PARAMETERS if max_float64 is None else max_float64
    plan = {"model_parameters": num_parameters, "float64_max_parameters": limit}
    if num_parameters <= limit:
        return {**plan, "precision": "float64", "device": "cpu", "token_budget": None,
                "tolerance_rule": "merge.tolerance, else the storage dtype's (1e-4 fp32, 4.0 bf16)"}
    return {**plan, "precision": "fp32", "device": "cuda" if on_gpu else "cpu", "token_budget": FP32_CHECK_TOKENS,
            "tolerance_rule": "merge.tolerance"}


def within_budget(samples: list[list[int]], budget: int | None) -> list[list[int]]:
    """The samples, the last one cut, up to `budget` tokens in all (None: all of them)."""
    if budget is None:
        return samples
    kept, left = [], budget
    for sample in samples:
        if left <= 0:
            break
        kept.append(sample[:left])
        left -= len(kept[-1])
    return kept


def load_for_check(folder: Path, dtype, compute_dtype, device, trust_remote_code: bool = False):
    """A model whose weights hold the values they have in `dtype`, computing in `compute_dtype`.
    Experts run one by one ("eager"): the grouped matmul transformers picks for a mixture of
    experts has no float64 kernel (and the check wants plain arithmetic anyway)."""
    from transformers import AutoModelForCausalLM

    model = load_pretrained(AutoModelForCausalLM, folder, trust_remote_code, dtype=dtype,
                            experts_implementation="eager").eval()
    return model.to(device=device, dtype=compute_dtype)


def float64_compute():
    """A context in which the model code's upcasts to float32 compute in float64 instead.

    Model code casts to float32 on purpose for bf16 models (RMSNorm, rotary angles, softmax
    `dtype=`); in a float64 model those casts are islands of fp32 arithmetic whose rounding,
    amplified by the outlier activations of small LMs, is not the merge's (see the module
    docstring). Under this context a float64 model computes in float64 from embedding to
    logits (a merge done in float64 compares to the unmerged forward at 3e-13), so the check
    measures the saved weights and nothing else."""
    import torch
    from torch.overrides import TorchFunctionMode

    fp32, fp64 = torch.float32, torch.float64

    class Float64Compute(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.float:
                return args[0].to(fp64)
            if func is torch.Tensor.to:
                args = tuple(fp64 if a is fp32 else a for a in args)
            if kwargs.get("dtype") is fp32:
                kwargs = {**kwargs, "dtype": fp64}
            return func(*args, **kwargs)

    return Float64Compute()


def check_equivalence(method: str, base_dir: Path, trained_dir: Path, saved_dir: Path, dtype,
                      samples: list[list[int]], compute_dtype, device, trust_remote_code: bool = False) -> dict[str, Any]:
    """Saved model vs the trained one (base + adapter unmerged, or the trained full model), and,
    to know the check means something, the trained model vs the base. One model at a time on
    `device`: the reference logits are kept (on the CPU) and compared with the saved model's."""
    reference_logits: list = []

    def remembered(run: LogitFn) -> LogitFn:
        def remember(ids):
            logits = run(ids)
            reference_logits.append(logits.cpu())
            return logits
        return remember

    def replayed() -> LogitFn:
        stored = iter(reference_logits)
        return lambda ids: next(stored)

    load = lambda folder: load_for_check(folder, dtype, compute_dtype, device, trust_remote_code)
    if method in ADAPTER_METHODS:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load(base_dir), trained_dir).eval()

        def base_logits(ids):
            with model.disable_adapter():
                return logits_of(model)(ids)

        effect = compare_logits(remembered(logits_of(model)), base_logits, samples)
    else:
        model = load(trained_dir)
        for sample in samples:
            remembered(logits_of(model))(sample_ids(sample))
        del model
        model = load(base_dir)
        effect = compare_logits(replayed(), logits_of(model), samples)
    del model
    equal = compare_logits(logits_of(load(saved_dir)), replayed(), samples)
    return {
        "reference": "base + adapter, unmerged" if method in ADAPTER_METHODS else "the trained model",
        "samples": len(samples),
        "tokens": sum(len(s) for s in samples),
        "max_abs_diff": equal["max_abs_diff"],
        "mean_abs_diff": equal["mean_abs_diff"],
        "argmax_agreement": equal["argmax_agreement"],
        "max_abs_reference_logit": max(float(logits.abs().max()) for logits in reference_logits),
        "finetune_effect": {
            "max_abs_diff": effect["max_abs_diff"],
            "mean_abs_diff": effect["mean_abs_diff"],
            "argmax_changed": 1.0 - effect["argmax_agreement"],
        },
    }


def sample_ids(sample: list[int]):
    import torch

    return torch.tensor([sample], dtype=torch.long)


def logits_of(model) -> LogitFn:
    import torch

    parameter = next(model.parameters())
    in_float64 = parameter.dtype == torch.float64

    def run(ids):
        with torch.no_grad(), float64_compute() if in_float64 else contextlib.nullcontext():
            return model(input_ids=ids.to(parameter.device), use_cache=False).logits[0]

    return run


def compare_logits(first: LogitFn, second: LogitFn, samples: list[list[int]]) -> dict[str, float]:
    """Max and mean |difference| over every logit of every position, and the share of positions
    whose argmax agrees; one sample at a time, so memory is one sample's logits."""
    max_diff, diff_sum, values, agree, positions = 0.0, 0.0, 0, 0, 0
    for sample in samples:
        ids = sample_ids(sample)
        a = first(ids)
        b = second(ids).to(a.device)
        diff = (a - b).abs()
        max_diff = max(max_diff, diff.max().item())
        diff_sum += diff.double().sum().item()
        values += diff.numel()
        agree += int((a.argmax(-1) == b.argmax(-1)).sum().item())
        positions += a.shape[0]
    if not positions:
        raise ValueError("no samples to check the merge on: the tokenize output holds no sample")
    return {"max_abs_diff": max_diff, "mean_abs_diff": diff_sum / values, "argmax_agreement": agree / positions}


def adapter_targets(model_dir: Path) -> list[str]:
    """The module names an adapter was trained on ([] for a full model)."""
    config = model_dir / "adapter_config.json"
    targets = json.loads(config.read_text()).get("target_modules") if config.is_file() else None
    return [targets] if isinstance(targets, str) else list(targets or [])


def failure_message(report: dict[str, Any], targets: list[str], report_path: Path) -> str:
    check = report["check"]
    message = (
        f"merge check failed: the saved {report['dtype']} model differs from {check['reference']} by up to "
        f"{check['max_abs_diff']:.3g} in a logit, above merge.tolerance {check['tolerance']:.3g} "
        f"(mean |diff| {check['mean_abs_diff']:.3g}, argmax agreement {check['argmax_agreement']:.2%}, "
        f"{check['samples']} {check['split']} samples; the fine-tune itself moved the logits by up to "
        f"{check['finetune_effect']['max_abs_diff']:.3g}). Details: {report_path}."
    )
    if "lm_head" in targets:
        message += (
            " Likely cause: the adapter trains lm_head; when the model ties lm_head to the input "
            "embeddings, merging changes both. Train without lm_head in train.lora.targets."
        )
    elif report["dtype"] == "bf16":
        message += " bf16 merging rounds the weights; merge in fp32 (merge.dtype: fp32) for an exact model."
    else:
        message += (" Nothing was published; check that the train output and the base model belong together "
                    "(the base is the one named by model.path).")
    return message


# ----------------------------------------------------------------------------- model card


def _alignment_section(trained: dict[str, Any]) -> str:
    """The model card's account of the align stage (its output's hyperparameters and summary)."""
    align, summary = trained["align"], trained["summary"]
    before, after = summary.get("valid_before") or {}, summary.get("valid_after") or {}
    rows = "\n".join(f"| {t} | {before.get('logp_accuracy', {}).get(t, float('nan')):.2%} | "
                     f"{after.get('logp_accuracy', {}).get(t, float('nan')):.2%} | "
                     f"{after.get('reward_margin', {}).get(t, float('nan')):.4f} |" for t in summary.get("preference_tasks", []))
    return f"""
## Preference alignment

After fine-tuning (`{trained.get('sft_dir')}`), aligned with **{align['method'].upper()}** (β {align['beta']:g},
balance {align['balance']}, {align['parameters']} parameters) for {summary.get('steps')} steps; reference:
{trained.get('reference')}. The steps above are align's; the losses are the fine-tuning's.

| preference task | validation accuracy before | after | reward margin after |
|---|---|---|---|
{rows}
"""


def model_card(cfg: PipelineConfig, trained: dict[str, Any], template: dict[str, Any], report: dict[str, Any]) -> str:
    summary, check = trained["summary"], report["check"]
    losses = summary.get("final_valid_task_loss") or {}
    method = report["method"]
    base = report["base_model"]
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["mft-pipeline", "multi-task-fine-tuning", "code", method]}
    if base in HUB_IDS:
        front["base_model"] = HUB_IDS[base]
    elif base.startswith("hf://"):  # a Hub model's snapshot: hf://org/name@commit (see display_path)
        front["base_model"] = base[len("hf://"):].split("@")[0]
    loss = lambda name: f"{losses[name]:.4f}" if name in losses else "-"
    rows = "\n".join(f"| {t['name']} | {t['id']} | {t['weight']:g} | {loss(t['name'])} |" for t in trained["tasks"])
    how = ("merged into the base (`merge_and_unload`)" if report["merged"] else "full fine-tuning, no adapter")
    if method == "qlora":
        how += "; trained on a 4-bit nf4 base, merged into the unquantized base"
    prompt = (
        f"MFTCoder rendering, role markers {json.dumps(template['role_markers'])}, each answer closed by EOS"
        if template["template"] == "mftcoder" else "the base tokenizer's own chat template"
    )
    train_yaml = yaml.safe_dump(trained["train"], sort_keys=False).rstrip()
    aligned = _alignment_section(trained) if "align" in trained else ""
    return f"""---
{yaml.safe_dump(front, sort_keys=False).rstrip()}
---

# Multi-task fine-tune of {base}

Trained with mft-pipeline on {len(trained['tasks'])} tasks at once: method **{method}**, {how}.
Weights: safetensors, {report['dtype']}.

## Tasks and final validation loss

| task | id | weight | final validation loss (per-task token mean) |
|---|---|---|---|
{rows}

{summary.get('steps')} optimizer steps, {summary.get('trained_tokens') or '-'} trained tokens, precision
{trained.get('precision')}, {trained.get('world_size')} process(es).
{aligned}
## Prompt format

{prompt}. The tokenizer's chat template reproduces the training prompt token for token:
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`. Generation stops at EOS
(id {template['eos_id']}); padding uses id {template['pad_id']} (both in generation_config.json).

## Merge check

The saved weights were loaded back and compared with {check['reference']} on {check['samples']}
{check['split']} samples ({check['tokens']} tokens, every logit, {check['precision']} arithmetic): max |difference|
{check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g}), mean {check['mean_abs_diff']:.3g},
argmax agreement {check['argmax_agreement']:.2%}. The fine-tune moved the logits from the base by up
to {check['finetune_effect']['max_abs_diff']:.3g}.

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
ids = tokenizer.apply_chat_template([{{"role": "user", "content": "Write a function that adds two numbers."}}],
                                    add_generation_prompt=True, return_tensors="pt", return_dict=False)
print(tokenizer.decode(model.generate(ids, max_new_tokens=128)[0][ids.shape[1]:], skip_special_tokens=True))
```

## Training config

```yaml
{train_yaml}
```
"""
