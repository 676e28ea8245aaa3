"""Parts of the recipe, checked alone on the tiny random Llama: the focal_task pre-pass, the
dtypes a bf16 run loads, and the FSDP units (on a gloo process group: accelerate enables FSDP
only on GPUs, so the recipe's own wrapping function is called directly)."""


import pytest
import torch

from mft_core.config import TrainConfig
from mft_core.train import recipe
from mft_core.train.losses import per_task_loss_sums, task_mean_losses, trained_values
from mft_core.train.model import TokenLossModel, load_model, shard_decoder_layers
from tests.unit.train.test_losses import packed_micro_batch, random_rows


def test_focal_task_reference_is_the_mean_of_the_steps_own_forwards_under_dropout(tiny_llama_dir):
    """mft_loss's focal_task expansion is exact when the reference is the per-task mean token
    probability of the step's own forwards. With dropout on, a pre-pass that draws other masks
    gives other means."""
    torch.manual_seed(0)
    wrapper = TokenLossModel(load_model(tiny_llama_dir, TrainConfig(lora={"dropout": 0.5}), "fp32", "sdpa_varlen",
                                        on_gpu=False)).train()
    with torch.no_grad():  # as after some training: LoRA B starts at zero, where dropout changes nothing
        for name, parameter in wrapper.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    steps_rows = [random_rows(seed, num_rows=2) for seed in (0, 1)]  # the step's two micro-batches
    cpu = torch.device("cpu")
    reference = recipe.focal_task_reference(wrapper, packed_micro_batch, steps_rows, 3, cpu)

    sums, counts = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)
    for rows in steps_rows:  # the training forwards that follow, as the loop runs them
        batch = packed_micro_batch(rows)
        out = wrapper(batch["input_ids"], batch["position_ids"], batch["labels"])
        probability = torch.exp(-out.token_loss.detach().double())
        s, c = per_task_loss_sums(probability, trained_values(batch["task_ids"], batch["labels"]), 3)
        sums, counts = sums + s, counts + c
    own = task_mean_losses(sums, counts).float()
    torch.testing.assert_close(reference, own, rtol=1e-5, atol=0)  # probabilities of ~0.002: relative

    other_masks = recipe.focal_task_reference(wrapper, packed_micro_batch, steps_rows, 3, cpu)
    assert not torch.allclose(other_masks, own, rtol=1e-3, atol=0), "dropout changes nothing here: the test is void"


@pytest.mark.parametrize("dora", [False, True])
def test_bf16_training_loads_a_loras_frozen_base_in_bf16_and_keeps_what_trains_in_fp32(tiny_llama_dir, dora):
    """Stands in for the GPU, where bf16 is what `auto` picks: the dtypes load_model asks for and
    gets are the same on a CPU. The frozen base in bf16 halves its memory; the LoRA weights, and so
    the optimizer state, stay fp32; full fine-tuning keeps fp32 master weights."""
    lora = load_model(tiny_llama_dir, TrainConfig(lora={"dora": dora}), "bf16", "sdpa", on_gpu=False)
    assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in load_model(tiny_llama_dir, TrainConfig(), "fp32", "sdpa", on_gpu=False).parameters()} == {torch.float32}
    full = load_model(tiny_llama_dir, TrainConfig(method="full"), "bf16", "sdpa", on_gpu=False)
    assert {p.dtype for p in full.parameters()} == {torch.float32}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_shards_every_decoder_layer_and_computes_the_same(tiny_llama_dir, gloo_group, method):
    from torch.distributed.fsdp import FSDPModule

    cfg = TrainConfig(method=method, lora={"dropout": 0.0})
    batch = packed_micro_batch(random_rows(0, num_rows=2))
    results = []
    for shard in (False, True):
        torch.manual_seed(0)
        wrapper = TokenLossModel(load_model(tiny_llama_dir, cfg, "fp32", "sdpa_varlen", on_gpu=False)).train()
        units = shard_decoder_layers(wrapper, "fp32") if shard else 0
        out = wrapper(batch["input_ids"], batch["position_ids"], batch["labels"])
        out.token_loss.mean().backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for n, p in wrapper.named_parameters() if p.requires_grad}
        results.append((out.token_loss.detach(), grads))
    sharded = [m for m in wrapper.modules() if isinstance(m, FSDPModule)]
    layers = wrapper.model.get_base_model().model.layers if method == "lora" else wrapper.model.model.layers
    assert units == len(sharded) == len(layers) + 1 and all(isinstance(layer, FSDPModule) for layer in layers)
    (loss, grads), (sharded_loss, sharded_grads) = results
    torch.testing.assert_close(sharded_loss, loss)
    assert sharded_grads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(sharded_grads[name], grads[name], msg=name)
