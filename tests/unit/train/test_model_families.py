"""The train stage's model wrapper on tiny random models of several families: the chunked
per-token loss equals the model's own logits, packed samples are isolated, and LoRA / full
fine-tuning train a step and save."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mft_core.config import TrainConfig
from mft_core.data.pack import build_packed_row
from mft_core.train.losses import IGNORE_INDEX
from mft_core.train.model import TokenLossModel, load_model

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256)
FAMILIES = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(num_key_value_heads=2),
    "qwen2_moe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, router_aux_loss_coef=0.01, decoder_sparse_step=1),
    "gemma": dict(num_key_value_heads=1, head_dim=16),
    "starcoder2": dict(num_key_value_heads=2),
    "gpt_neox": dict(),
    "phi": dict(num_key_value_heads=4),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    config = AutoConfig.for_model(request.param, **COMMON, **FAMILIES[request.param])
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder


def packed_batch(lengths=(9, 14, 6), seq_length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, 512, (n,), generator=g).tolist()
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        samples.append({"input_ids": ids, "loss_mask": mask, "task_id": i % 2})
    row = build_packed_row(samples, seq_length, pad_id=0)
    tensor = lambda a: torch.as_tensor(a, dtype=torch.long)[None]
    return samples, tensor(row.input_ids), tensor(row.position_ids), tensor(row.labels)


def load(folder, method="lora", attention="sdpa", **settings):
    cfg = TrainConfig(method=method, lora={"dropout": 0.0}, **settings)
    return TokenLossModel(load_model(folder, cfg, precision="fp32", attention=attention, on_gpu=False))


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_varlen"])
def test_token_loss_matches_full_logits_and_packed_equals_unpacked(family_dir, attention):
    name, folder = family_dir
    wrapper = load(folder, attention=attention).eval()
    samples, input_ids, position_ids, labels = packed_batch()
    with torch.no_grad():
        packed = wrapper(input_ids, position_ids, labels).token_loss
        # the model's own full logits, same positions
        logits = wrapper.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.float()
        shift_labels = labels[:, 1:]
        reference = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), reduction="none",
            ignore_index=IGNORE_INDEX)[shift_labels.reshape(-1) != IGNORE_INDEX]
        torch.testing.assert_close(packed, reference, atol=1e-4, rtol=1e-4)
        # each sample alone, unpacked: the same per-token losses in the same order
        alone = []
        for s in samples:
            ids = torch.tensor([s["input_ids"]])
            lab = torch.where(torch.tensor([s["loss_mask"]]) == 1, ids, torch.full_like(ids, IGNORE_INDEX))
            pos = torch.arange(ids.shape[1])[None]
            alone.append(wrapper(ids, pos, lab).token_loss)
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-4, rtol=1e-4, msg=f"{name}: packed samples leak")


def test_lora_trains_a_step_and_saves(family_dir, tmp_path):
    name, folder = family_dir
    wrapper = load(folder).train()
    _, input_ids, position_ids, labels = packed_batch()
    out = wrapper(input_ids, position_ids, labels)
    loss = out.token_loss.mean() + (out.aux_loss if out.aux_loss is not None else 0)
    if name == "qwen2_moe":
        assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    loss.backward()
    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    before = [p.detach().clone() for p in trainable]
    torch.optim.AdamW(trainable, lr=1e-2).step()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainable))
    wrapper.model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("checkpointing", ["mlp", True])
def test_activation_checkpointing_gives_the_same_gradients_with_fewer_saved_activations(family_dir, checkpointing):
    name, folder = family_dir
    _, input_ids, position_ids, labels = packed_batch()
    results = {}
    for setting in (False, checkpointing):
        torch.manual_seed(0)  # the same LoRA initialization
        wrapper = load(folder, gradient_checkpointing=setting).train()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = wrapper(input_ids, position_ids, labels)
        (out.token_loss.mean() + (out.aux_loss if out.aux_loss is not None else 0)).backward()
        grads = {n: p.grad.clone() for n, p in wrapper.named_parameters() if p.requires_grad}
        results[setting] = (sum(saved), out.token_loss.detach(), grads)
    (plain_saved, plain_loss, plain_grads), (saved, loss, grads) = results[False], results[checkpointing]
    torch.testing.assert_close(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and grads
    for key in grads:
        torch.testing.assert_close(grads[key], plain_grads[key], atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")
    assert saved < plain_saved, f"{name}: checkpointing={checkpointing} kept as much as no checkpointing"


def test_full_fine_tuning_updates_every_weight_and_loss_falls(tmp_path):
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **COMMON, **FAMILIES["llama"])
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    wrapper = load(tmp_path / "base", method="full").train()
    assert all(p.requires_grad for p in wrapper.parameters())
    _, input_ids, position_ids, labels = packed_batch()
    optimizer = torch.optim.AdamW(wrapper.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = wrapper(input_ids, position_ids, labels).token_loss.mean()
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first * 0.7
