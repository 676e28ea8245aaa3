"""The train stage's model wrapper on tiny random models of every family MFTCoder's README names
that transformers ships, and their successors: the chunked per-token loss equals the model's own
logits, packed samples are isolated, LoRA and full fine-tuning train a step, a merged LoRA equals
base + adapter, and a mixture of experts balances its routers over real tokens only."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mft_core.config import TrainConfig
from mft_core.data.pack import build_packed_row
from mft_core.merge import FP32_TOLERANCE, check_equivalence, merge_in_float64
from mft_core.train.losses import IGNORE_INDEX
from mft_core.train.model import TokenLossModel, is_moe, load_model

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256)
# Multi-head latent attention and routed experts of the DeepSeek families, scaled down (no width
# equal to the test rows' 32 tokens: test_attention looks for [T, T] tensors by shape).
_DEEPSEEK = dict(num_key_value_heads=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=24,
                 kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1)
FAMILIES = {
    "llama": dict(num_key_value_heads=2),
    # CodeLlama is a Llama with rotary base 1e6, untied embeddings and (34B) grouped-query attention
    "codellama": dict(num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                      tie_word_embeddings=False),
    "mistral": dict(num_key_value_heads=2, sliding_window=None),
    "mixtral": dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02,
                    sliding_window=None),
    "qwen2": dict(num_key_value_heads=2),
    "qwen2_moe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, router_aux_loss_coef=0.01, decoder_sparse_step=1),
    "qwen3": dict(num_key_value_heads=2, head_dim=16),
    "qwen3_moe": dict(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      router_aux_loss_coef=0.02, decoder_sparse_step=1),
    "gemma": dict(num_key_value_heads=1, head_dim=16),
    # soft-capped attention logits (beyond sdpa: the masked eager path) and output logits
    "gemma2": dict(num_key_value_heads=2, head_dim=16, sliding_window=8, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    # StarCoder 1: multi-query attention (its dropouts off, as the other families have them)
    "gpt_bigcode": dict(multi_query=True, n_inner=128, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    "starcoder2": dict(num_key_value_heads=2),
    "gpt_neox": dict(),
    "phi": dict(num_key_value_heads=4),
    "deepseek_v2": dict(_DEEPSEEK, n_routed_experts=4, q_lora_rank=None, n_group=1, topk_group=1),
    "deepseek_v3": dict(_DEEPSEEK, n_routed_experts=8, q_lora_rank=40, n_group=2, topk_group=1),
}
MODEL_TYPE = {"codellama": "llama"}
# Mixtures of experts with a router load-balancing loss (the others train their routers on the LM loss alone).
BALANCED = {"mixtral", "qwen2_moe", "qwen3_moe"}


def family_config(name):
    return AutoConfig.for_model(MODEL_TYPE.get(name, name), **COMMON, **FAMILIES[name])


def reference_attention(name):
    """transformers' masked attention for the family: sdpa, or eager where the family declines
    sdpa (Gemma 2's soft cap)."""
    return "sdpa" if AutoModelForCausalLM.from_config(family_config(name))._supports_sdpa else "eager"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(request.param))
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


def load(folder, method="lora", attention="sdpa_varlen", **settings):  # the CPU default (auto)
    cfg = TrainConfig(method=method, lora={"dropout": 0.0}, **settings)
    return TokenLossModel(load_model(folder, cfg, precision="fp32", attention=attention, on_gpu=False))


@pytest.mark.parametrize("attention", ["reference", "sdpa_varlen"])
def test_token_loss_matches_full_logits_and_packed_equals_unpacked(family_dir, attention):
    name, folder = family_dir
    attention = reference_attention(name) if attention == "reference" else attention
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
    assert (out.aux_loss is not None) == (name in BALANCED)
    if name in BALANCED:
        assert torch.isfinite(out.aux_loss) and out.aux_loss.requires_grad
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


def test_full_fine_tuning_trains_a_step(family_dir):
    name, folder = family_dir
    wrapper = load(folder, method="full").train()
    assert all(p.requires_grad for p in wrapper.parameters())
    _, input_ids, position_ids, labels = packed_batch()
    out = wrapper(input_ids, position_ids, labels)
    (out.token_loss.mean() + (out.aux_loss if out.aux_loss is not None else 0)).backward()
    # every weight the language-model loss reaches has a gradient (a family's unused experts may not)
    with_grad = [n for n, p in wrapper.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any("embed" in n or "wte" in n for n in with_grad) and len(with_grad) > len(list(wrapper.parameters())) // 2
    before = {n: p.detach().clone() for n, p in wrapper.named_parameters()}
    torch.optim.AdamW(wrapper.parameters(), lr=1e-2).step()
    assert all(not torch.equal(before[n], p) for n, p in wrapper.named_parameters() if n in with_grad)


def test_merged_lora_equals_base_plus_adapter(family_dir, tmp_path):
    """A LoRA trained a few steps, merged the way the merge stage merges (float64, rounded once),
    saved, reloaded and compared in float64 with base + adapter unmerged (merge.check_equivalence)."""
    name, folder = family_dir
    torch.manual_seed(0)
    wrapper = load(folder).train()
    _, input_ids, position_ids, labels = packed_batch()
    optimizer = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        optimizer.zero_grad()
        wrapper(input_ids, position_ids, labels).token_loss.mean().backward()
        optimizer.step()
    wrapper.model.save_pretrained(tmp_path / "adapter")

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    merged = merge_in_float64(PeftModel.from_pretrained(base, tmp_path / "adapter"), torch.float32)
    merged.save_pretrained(tmp_path / "merged")
    samples = [input_ids[0, :20].tolist(), input_ids[0, 9:32].tolist()]
    check = check_equivalence("lora", folder, tmp_path / "adapter", tmp_path / "merged", torch.float32, samples,
                              torch.float64, torch.device("cpu"))
    assert check["max_abs_diff"] <= FP32_TOLERANCE, f"{name}: merged model differs from base + adapter"
    assert check["finetune_effect"]["max_abs_diff"] > 100 * FP32_TOLERANCE, f"{name}: the adapter changed nothing"


def padded_row(seq_length=40):
    """One packed row of two samples and a padding tail of 13 tokens; and the same row cut before the tail."""
    samples, input_ids, position_ids, labels = packed_batch(lengths=(15, 12), seq_length=seq_length)
    real = 27
    return (input_ids, position_ids, labels), (input_ids[:, :real], position_ids[:, :real], labels[:, :real]), real


@pytest.mark.parametrize("name", sorted(BALANCED))
def test_router_load_balance_counts_real_tokens_only(name, tmp_path):
    """The padding tail of a packed row is no token of any sample: the router balance must not
    count it (MFTCoder masks it too). With the real-token mask the padded row's auxiliary loss is
    the unpadded row's; without it, the padding weighs in."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(name))
    with torch.no_grad():  # a trained router's sharp preferences; random init routes almost uniformly
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("mlp.gate.weight"):
                parameter.mul_(20)
    model.save_pretrained(tmp_path)
    wrapper = load(tmp_path, attention="sdpa_varlen").eval()
    padded, unpadded, real = padded_row()
    real_tokens = torch.arange(padded[0].shape[1])[None] < real
    with torch.no_grad():
        masked = wrapper(*padded, real_tokens=real_tokens).aux_loss
        alone = wrapper(*unpadded).aux_loss
        everything = wrapper(*padded).aux_loss
    torch.testing.assert_close(masked, alone, rtol=1e-6, atol=1e-7)
    assert abs(everything.item() - alone.item()) > 1e-5, "the padding changes nothing here: the test is void"


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_is_a_mixture_of_experts_trained_without_an_auxiliary_loss(name, tmp_path):
    """DeepSeek's routed experts (n_routed_experts) make it a mixture of experts; transformers' DeepSeek
    has no load-balancing loss (V3 balances with a routing-bias buffer), so none is added and no
    router logits are kept."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(family_config(name)).save_pretrained(tmp_path)
    wrapper = load(tmp_path)
    assert is_moe(wrapper.model.config) and wrapper.balance is None
    assert not wrapper.model.config.output_router_logits
    _, input_ids, position_ids, labels = packed_batch()
    assert wrapper(input_ids, position_ids, labels).aux_loss is None


def test_full_fine_tuning_updates_every_weight_and_loss_falls(tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(family_config("llama")).save_pretrained(tmp_path / "base")
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
