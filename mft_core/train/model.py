"""Building the model to train: any Hugging Face causal LM, its precision and attention, LoRA /
DoRA / QLoRA / full fine-tuning, and a wrapper whose forward returns per-token losses.

The wrapper is what gets handed to accelerate (DDP, DeepSpeed, FSDP): its forward runs the
model with `logits_to_keep=1` (no full logits tensor) and computes the loss from the last hidden
state in chunks, so fp32 logits over the whole vocabulary are never materialized.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mft_core.config import TrainConfig
from mft_core.train import attention as packed_attention
from mft_core.train.losses import token_losses, token_losses_through_module

log = logging.getLogger("mft.train")


def cpu_has_native_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16 in the CPU flags: the instructions bf16 matmuls need to be fast at
    all (AVX2-only machines ran bf16 autocast about 20x *slower* than fp32)."""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# bf16 autocast also pays for casting the weights every step: ask for a clear matmul win.
BF16_MIN_SPEEDUP = 1.2


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(repeats: int = 5) -> float:
    """fp32 time / bf16 time of one training-sized matmul ([1024, 576] @ [576, 1536]) on this CPU
    with the current threads, best of `repeats` each. The flags alone do not tell: on a Xeon with
    AVX512-BF16 but no AMX, bf16 measured 0.6x fp32's speed (and training 152 vs 250 tokens/s);
    with AMX it is about 2x faster."""
    import time

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 576, generator=generator), torch.randn(576, 1536, generator=generator)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up: kernel selection, page faults
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


def resolve_precision(choice: str, on_gpu: bool, method: str = "lora") -> str:
    """'bf16' or 'fp32' (fp32 master weights; bf16 means autocast), logged with the reason."""
    if choice != "auto":
        return choice
    if method == "qlora":  # its 4-bit weights are stored in bf16 and unpacked into bf16 (config.py)
        if on_gpu and not torch.cuda.is_bf16_supported():
            raise ValueError("train.method=qlora computes in bf16, which this GPU lacks: use method lora")
        log.info("precision auto -> bf16 (QLoRA computes in bf16)")
        return "bf16"
    if on_gpu:
        resolved, why = ("bf16", "GPU") if torch.cuda.is_bf16_supported() else ("fp32", "GPU without bf16")
    elif not cpu_has_native_bf16():
        resolved, why = "fp32", "CPU without AMX/AVX512-BF16: bf16 autocast would be far slower"
    else:
        speedup = cpu_bf16_speedup()
        resolved = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
        why = f"a bf16 matmul measured {speedup:.2f}x fp32's speed on this CPU; bf16 needs {BF16_MIN_SPEEDUP}x"
    log.info("precision auto -> %s (%s)", resolved, why)
    return resolved


def resolve_attention(choice: str, on_gpu: bool, precision: str) -> str:
    """auto: flash-attention 2 (varlen over packed samples) when installed on CUDA and training in
    bf16 (it has no fp32 kernels), else sdpa run once per packed sample (attention.py)."""
    has_flash = on_gpu and importlib.util.find_spec("flash_attn") is not None
    if choice == "auto":
        resolved = "flash_attention_2" if has_flash and precision == "bf16" else packed_attention.NAME
        log.info("attention auto -> %s", resolved)
        return resolved
    if choice == "flash_attention_2" and not has_flash:
        raise ValueError("train.attention=flash_attention_2 needs CUDA and the flash-attn package; use auto or sdpa_varlen")
    if choice == "flash_attention_2" and precision != "bf16":
        raise ValueError(f"train.attention=flash_attention_2 has no {precision} kernels: train in bf16 or use sdpa_varlen")
    return choice


def num_experts(config: Any) -> int | None:
    """The number of routed experts of a mixture-of-experts model, whatever its family calls it
    (Mixtral, Qwen3-MoE: num_local_experts; Qwen2-MoE: num_experts; DeepSeek: n_routed_experts), or None."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def is_moe(config: Any) -> bool:
    return num_experts(config) is not None


def router_balance(causal_lm: nn.Module):
    """The family's router load-balancing loss function and its coefficient, or None for a mixture
    of experts trained without one: DeepSeek-V2 and -V3 as transformers ships them have no
    auxiliary loss (V3 balances with a routing bias, e_score_correction_bias, a buffer that
    gradient training leaves as it is), so their routers learn from the language-model loss alone."""
    family = sys.modules[type(causal_lm).__module__]
    balance = getattr(family, "load_balancing_loss_func", None)
    coefficient = float(getattr(causal_lm.config, "router_aux_loss_coef", 0.0) or 0.0)
    if not is_moe(causal_lm.config) or balance is None or coefficient == 0.0:
        return None
    return balance, coefficient


FROZEN_ADAPTER = "frozen"  # the name of `load_model`'s frozen_adapter among the model's adapters


def load_model(model_dir: Path, cfg: TrainConfig, precision: str, attention: str, on_gpu: bool,
               trust_remote_code: bool = False, frozen_adapter: Path | None = None) -> nn.Module:
    """The model with its trainable parameters set up per `cfg.method`; trust_remote_code
    (model.trust_remote_code) allows a model of its own code. frozen_adapter: a LoRA adapter the
    model starts from (align starts from the fine-tuned model this way): under a new LoRA, loaded
    unmerged and frozen, both active (exactly the model fine-tuning trained, where merging it into
    a bf16 base would round its update away); for full training, merged into the fp32 weights."""
    from transformers import AutoModelForCausalLM

    from mft_core.modeling import load_pretrained

    if attention == packed_attention.NAME:
        packed_attention.register()
        attention = packed_attention.KERNEL
    # A LoRA's frozen base has no gradient and no optimizer state: in bf16 when training in bf16
    # (half its memory; autocast computes its matmuls in bf16 anyway). PEFT keeps the LoRA weights,
    # and so their optimizer state, in fp32. Full fine-tuning keeps fp32 master weights.
    base_dtype = torch.bfloat16 if precision == "bf16" and cfg.method == "lora" else torch.float32
    kwargs: dict[str, Any] = {"attn_implementation": attention, "dtype": base_dtype}
    if cfg.method == "qlora":
        if not on_gpu:
            log.warning("QLoRA on CPU runs bitsandbytes' CPU backend: correct but slow (for testing the path)")
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if precision == "bf16" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
            # bf16 storage of the packed 4-bit weights lets ZeRO-3 / FSDP shard them
            bnb_4bit_quant_storage=torch.bfloat16,
        )
        kwargs["dtype"] = compute
    model = load_pretrained(AutoModelForCausalLM, model_dir, trust_remote_code, **kwargs)
    model.config.use_cache = False
    if router_balance(model) is not None:
        model.config.output_router_logits = True  # the router's load-balancing loss joins the loss
    elif is_moe(model.config):
        log.info("%s: a mixture of experts without a router auxiliary loss: its routers learn from the "
                 "language-model loss alone", type(model).__name__)
    if cfg.gradient_checkpointing == "mlp":
        checkpoint_mlps(model)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "full":
        if frozen_adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, frozen_adapter).merge_and_unload()
            model.requires_grad_(True)  # PEFT froze the base it loaded the adapter onto
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = cfg.lora.targets if isinstance(cfg.lora.targets, list) else []
    head_name = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), "lm_head")
    if getattr(model.config, "tie_word_embeddings", False) and any(t == head_name.split(".")[-1] for t in targets):
        raise ValueError(f"train.lora.targets includes {head_name!r}, but this model ties it to the input embeddings: "
                         "merging such an adapter changes both matrices and the merged model differs from the trained one. "
                         "Leave the output head out of the targets (all-linear already does).")

    whole_layers = cfg.gradient_checkpointing is True
    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=whole_layers)
    elif whole_layers:
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.targets,
        use_dora=cfg.lora.dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if frozen_adapter is None:
        model = get_peft_model(model, lora)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, frozen_adapter, adapter_name=FROZEN_ADAPTER)
        for module in model.modules():  # frozen means deterministic too: no dropout in train mode
            dropouts = getattr(module, "lora_dropout", None)
            if isinstance(dropouts, nn.ModuleDict) and FROZEN_ADAPTER in dropouts:
                dropouts[FROZEN_ADAPTER] = nn.Identity()
        model.add_adapter("default", lora)
        model.base_model.set_adapter([FROZEN_ADAPTER, "default"])  # both active; it makes both trainable:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = ".default." in name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("%s: %d trainable of %d parameters (%.2f%%)", cfg.method, trainable, total, 100 * trainable / total)
    return model


@contextmanager
def adapter_switched_off(model: nn.Module, adapter: str = "default"):
    """`adapter` contributes nothing inside the block (its LoRA scaling is 0), the other adapters
    still do: with a frozen adapter under it (load_model's frozen_adapter), the model it started
    from. PEFT's disable_adapter() would switch every adapter off."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict) and adapter in m.scaling]
    if not layers:
        raise ValueError(f"the model has no LoRA adapter named {adapter!r}")
    saved = [layer.scaling[adapter] for layer in layers]
    for layer in layers:
        layer.scaling[adapter] = 0.0
    try:
        yield
    finally:
        for layer, scale in zip(layers, saved):
            layer.scaling[adapter] = scale


def shard_decoder_layers(wrapper: nn.Module, precision: str) -> int:
    """FSDP2 over the wrapper: one unit per decoder layer, then the root (embeddings, final norm,
    output head); returns the number of units. accelerate's TRANSFORMER_BASED_WRAP would look up
    the layer classes in `_no_split_modules` of the module it prepares, our TokenLossModel, which
    names none: no unit below the root, the whole model gathered at once on every rank. Done
    before accelerate.prepare, which leaves a module that is already FSDP as it is."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    causal_lm = wrapper.model.get_base_model() if hasattr(wrapper.model, "get_base_model") else wrapper.model
    layer_classes = set(getattr(causal_lm, "_no_split_modules", None) or ())
    layers = [module for module in wrapper.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"FSDP: {type(causal_lm).__name__} names no decoder layer class in _no_split_modules "
                         f"({sorted(layer_classes)}): use backend ddp or deepspeed")
    # bf16: gathered and computed in bf16, gradients reduced in fp32 (torchtitan's policy)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16" else MixedPrecisionPolicy())
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(wrapper, mp_policy=policy)
    log.info("FSDP: %d units (%d decoder layers and the root)", len(layers) + 1, len(layers))
    return len(layers) + 1


def checkpoint_mlps(model: nn.Module) -> int:
    """Activation checkpointing of each decoder layer's MLP only: backward recomputes the MLP from
    its input instead of keeping its four [T, intermediate] activations. The MLP is the larger
    part of a small model's activations and the cheaper part to recompute than attention
    (SmolLM2-135M, 1024 tokens on CPU: peak 2.8 -> 2.1 GB for ~6% more time)."""
    from torch.utils.checkpoint import checkpoint

    mlps = [module.mlp for module in model.modules() if isinstance(getattr(module, "mlp", None), nn.Module)]
    if not mlps:
        raise ValueError(f"train.gradient_checkpointing=mlp: {type(model).__name__} has no decoder layers with an `mlp` "
                         "submodule; use gradient_checkpointing: true (whole layers)")
    for mlp in mlps:
        forward = mlp.forward  # the module's own forward; __call__ (and its hooks) stays outside

        def recomputed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        mlp.forward = recomputed
    log.info("activation checkpointing: the MLP of %d decoder layers", len(mlps))
    return len(mlps)


def _logit_transform(config: Any):
    """Some families scale or soft-cap their logits; apply the same inside the chunked loss."""
    scale = getattr(config, "logit_scale", None) or (1 / config.logits_scaling if getattr(config, "logits_scaling", None) else None)
    cap = getattr(config, "final_logit_softcapping", None)
    if scale is None and cap is None:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


@dataclass
class ForwardOutput:
    token_loss: torch.Tensor  # [N] fp32, one per trained position, in row-major order
    aux_loss: torch.Tensor | None  # MoE router load-balancing loss (already weighted), or None


class TokenLossModel(nn.Module):
    """Wraps a causal LM; forward(batch) -> per-token losses of the trained positions."""

    # 256 trained tokens per loss chunk: a [256, V] fp32 logits block (50 MB at a 49k vocabulary)
    # lives in backward; 1024 measured +300 MB peak (SmolLM2, CPU; 244-249 vs 225-231 tokens/s, one run each).
    def __init__(self, model: nn.Module, chunk_size: int = 256):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        config = model.config
        self.transform = _logit_transform(config)
        self.balance = router_balance(model.get_base_model() if hasattr(model, "get_base_model") else model)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                real_tokens: torch.Tensor | None = None) -> ForwardOutput:
        """real_tokens [B, T] bool: the positions that hold a sample, not padding (task_ids >= 0);
        None when nothing is padding. A mixture of experts' load balance counts only those: a
        padded row's tail would otherwise weigh in the balance (MFTCoder masks it too)."""
        # The decoder alone, not the CausalLM: its last hidden state is all the loss needs, and
        # asking the CausalLM for hidden states keeps every layer's output (measured: +40% peak
        # memory at 1024 tokens). position_ids restart per packed sample, attention_mask None and
        # use_cache False: that is what makes transformers isolate packed samples (with the cache
        # on they leak into each other silently). sdpa_varlen and flash-attention also get the
        # segments themselves (flash-attention finds them alone only in a micro-batch of one row).
        causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        extra: dict[str, Any] = {"output_router_logits": True} if self.balance else {}
        attention = causal_lm.config._attn_implementation
        if attention == packed_attention.KERNEL:
            extra["packed_segments"] = packed_attention.packed_segments(position_ids)
        elif attention == "flash_attention_2":
            extra.update(packed_attention.flash_varlen_kwargs(position_ids))
        out = causal_lm.get_decoder()(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=None,
            use_cache=False,
            **extra,
        )
        hidden = out.last_hidden_state
        head = causal_lm.get_output_embeddings()
        if hasattr(head.weight, "ds_id"):  # DeepSpeed ZeRO-3: the weight is only whole inside the module's call
            losses = token_losses_through_module(hidden, head, labels, chunk_size=self.chunk_size, transform=self.transform)
        else:
            losses = token_losses(hidden, head.weight, labels, bias=getattr(head, "bias", None),
                                  chunk_size=self.chunk_size, transform=self.transform)
        aux = self._router_loss(causal_lm.config, out, real_tokens) if self.balance else None
        return ForwardOutput(losses, aux)

    def _router_loss(self, config: Any, out: Any, real_tokens: torch.Tensor | None) -> torch.Tensor | None:
        """The family's own load-balancing loss over the router logits of the real tokens, times
        its coefficient."""
        router_logits = getattr(out, "router_logits", None)
        if not router_logits:
            return None
        balance, coefficient = self.balance
        return balance(router_logits, num_experts(config), config.num_experts_per_tok, real_tokens) * coefficient
