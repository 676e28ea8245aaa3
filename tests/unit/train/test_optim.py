"""Parameter groups and the learning-rate schedule (mft_core.train.optim)."""

from __future__ import annotations

import math

import pytest
import torch

from mft_core.train.optim import lr_at, make_scheduler, param_groups, split_decay_parameters, total_optimizer_steps

BASE, FLOOR = 1e-3, 1e-4


def lrs_per_update(kind: str, warmup: int, total: int, min_lr: float, base_lrs=(BASE,), updates: int | None = None):
    """The lr each optimizer update uses, per group, stepping the scheduler once per update."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in base_lrs]
    optimizer = torch.optim.SGD(groups, lr=base_lrs[0])
    scheduler = make_scheduler(optimizer, kind=kind, warmup_steps=warmup, total_steps=total, min_lr=min_lr)
    used = []
    for _ in range(updates or total):
        used.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return used


# ----------------------------------------------------------------------------- schedule


def test_cosine_values_at_the_key_steps_and_its_horizon_is_the_optimizer_steps():
    warmup, total = 10, 110
    used = [lrs[0] for lrs in lrs_per_update("cosine", warmup, total, FLOOR, updates=total + 20)]
    step = lambda s: used[s - 1]  # update s (1-based) uses used[s - 1]
    assert step(1) == pytest.approx(BASE / warmup), "warmup starts from 0, no update is spent at lr 0"
    assert step(5) == pytest.approx(BASE * 5 / warmup)
    assert step(warmup) == pytest.approx(BASE), "the peak ends the warmup"
    assert step(60) == pytest.approx((BASE + FLOOR) / 2), "cosine midpoint between peak and floor"
    assert step(total) == pytest.approx(FLOOR, rel=1e-12), "the floor is reached at the last step"
    assert step(total - 1) > FLOOR * (1 + 1e-6), "and not before"
    assert all(lr == pytest.approx(FLOOR, rel=1e-12) for lr in used[total:]), "stays at the floor beyond"
    assert min(used[warmup:]) >= FLOOR * (1 - 1e-12)
    decay = used[warmup - 1 :]
    assert all(a >= b for a, b in zip(decay, decay[1:])), "monotone after the warmup"


def test_linear_and_constant_schedules():
    linear = [lrs[0] for lrs in lrs_per_update("linear", 4, 24, FLOOR)]
    assert linear[3] == pytest.approx(BASE)
    assert linear[13] == pytest.approx((BASE + FLOOR) / 2)  # step 14: halfway from step 4 to step 24
    assert linear[-1] == pytest.approx(FLOOR)
    constant = [lrs[0] for lrs in lrs_per_update("constant", 3, 10, FLOOR, updates=12)]
    assert constant[:3] == pytest.approx([BASE / 3, 2 * BASE / 3, BASE]) and constant[3:] == pytest.approx([BASE] * 9)


def test_no_warmup_starts_at_the_peak_and_ends_at_the_floor():
    used = [lrs[0] for lrs in lrs_per_update("cosine", 0, 5, FLOOR)]
    assert used[0] == pytest.approx(BASE) and used[-1] == pytest.approx(FLOOR)
    assert lrs_per_update("cosine", 0, 1, FLOOR) == [[pytest.approx(BASE)]]  # a one-step run uses the peak


def test_every_group_decays_from_its_own_lr_to_the_same_absolute_floor():
    used = lrs_per_update("cosine", 2, 12, FLOOR, base_lrs=(BASE, BASE / 4))
    assert used[1] == pytest.approx([BASE, BASE / 4])
    assert used[6] == pytest.approx([(BASE + FLOOR) / 2, (BASE / 4 + FLOOR) / 2])
    assert used[-1] == pytest.approx([FLOOR, FLOOR])
    with pytest.raises(ValueError, match="min_lr 0.0001 exceeds the lr 5e-05 of parameter group 1"):
        lrs_per_update("cosine", 2, 12, FLOOR, base_lrs=(BASE, FLOOR / 2))


def test_lr_at_matches_the_scheduler_and_the_cosine_formula():
    total, warmup = 50, 5
    used = lrs_per_update("cosine", warmup, total, FLOOR)
    for s in range(1, total + 1):
        assert used[s - 1][0] == pytest.approx(lr_at(s, BASE, "cosine", warmup, total, FLOOR))
    s = 30
    expected = FLOOR + (BASE - FLOOR) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    assert lr_at(s, BASE, "cosine", warmup, total, FLOOR) == pytest.approx(expected)


def test_a_rebuilt_scheduler_resumes_from_its_state_dict():
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=BASE)
    scheduler = make_scheduler(optimizer, "cosine", 3, 20, FLOOR)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_optimizer = torch.optim.SGD(params, lr=BASE)
    fresh = make_scheduler(fresh_optimizer, "cosine", 3, 20, FLOOR)
    fresh.load_state_dict(state)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(8, BASE, "cosine", 3, 20, FLOOR))
    fresh_optimizer.step()
    fresh.step()
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(9, BASE, "cosine", 3, 20, FLOOR))


def test_schedule_errors_say_what_to_change():
    with pytest.raises(ValueError, match=r"warmup_steps \(10\) must be fewer than the run's 10 optimizer steps.*train.warmup_steps"):
        lrs_per_update("cosine", 10, 10, FLOOR)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lrs_per_update("step", 1, 10, FLOOR)
    with pytest.raises(ValueError, match="total_steps must be at least 1"):
        lrs_per_update("cosine", 0, 0, FLOOR)


def test_total_optimizer_steps_sum_the_epochs_own_counts():
    assert total_optimizer_steps([40, 37, 41], None) == 118  # epochs re-sample and re-pack
    assert total_optimizer_steps([40, 37, 41], 100) == 100
    assert total_optimizer_steps([40], 500) == 40
    with pytest.raises(ValueError, match="no optimizer step"):
        total_optimizer_steps([0, 0], None)
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        total_optimizer_steps([5, 5], 0)


# ----------------------------------------------------------------------------- parameter groups


def test_full_model_groups_decay_matrices_and_embeddings_but_not_norms(tiny_llama):
    decay, no_decay = split_decay_parameters(tiny_llama)
    names = dict(tiny_llama.named_parameters())
    assert no_decay and all("norm" in n for n in no_decay)
    assert {n for n in names if "norm" in n} == set(no_decay)
    assert "model.embed_tokens.weight" in decay and "model.layers.0.self_attn.q_proj.weight" in decay
    assert "lm_head.weight" not in names, "tied to the embedding: listed once"
    assert set(decay) | set(no_decay) == set(names) and not set(decay) & set(no_decay)

    groups = param_groups(tiny_llama, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in groups] == [len(decay), len(no_decay)]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == tiny_llama.num_parameters()


def test_lora_groups_hold_only_the_trainable_adapter(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    decay, no_decay = split_decay_parameters(model)
    assert decay and all("lora_A" in n or "lora_B" in n for n in decay)
    assert no_decay and all("lora_magnitude_vector" in n for n in no_decay), "DoRA magnitudes are 1-D: no decay"
    groups = param_groups(model, weight_decay=0.01)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable) == len(decay) + len(no_decay)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    ids = torch.arange(4, 20)[None]
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_plain_lora_has_a_single_decayed_group_and_a_frozen_model_is_an_error(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]))
    groups = param_groups(model, weight_decay=0.0)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(model, 0.1)
