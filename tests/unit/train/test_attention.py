"""sdpa_varlen: attention once per packed sample equals transformers' masked sdpa (values and
gradients) on tiny models of several families, keeps no [T, T] mask for backward, and falls back
to the masked path, with the same values, where it does not apply."""

import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mft_core.train.attention import packed_segments
from tests.unit.train.test_model_families import COMMON, FAMILIES, load, packed_batch

T = 32


def test_packed_segments_follow_position_restarts():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    assert packed_segments(positions) == (((0, 3), (3, 5), (5, 9), (9, 10)), ((0, 10),))


def two_rows():
    """Two packed rows with different sample boundaries (and padding tails)."""
    _, ids_a, pos_a, lab_a = packed_batch(lengths=(9, 14, 6), seed=0)
    _, ids_b, pos_b, lab_b = packed_batch(lengths=(20, 5), seed=1)
    return torch.cat([ids_a, ids_b]), torch.cat([pos_a, pos_b]), torch.cat([lab_a, lab_b])


def run(folder, attention, batch, **settings):
    torch.manual_seed(0)  # the same LoRA initialization for both attentions
    wrapper = load(folder, attention=attention, **settings).train()
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        out = wrapper(*batch)
    (out.token_loss.mean() + (out.aux_loss if out.aux_loss is not None else 0)).backward()
    grads = {n: p.grad.clone() for n, p in wrapper.named_parameters() if p.requires_grad}
    return out.token_loss.detach(), grads, shapes


def assert_same(reference, candidate, name):
    (ref_loss, ref_grads, _), (loss, grads, _) = reference, candidate
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, msg=f"{name}: losses")
    assert grads.keys() == ref_grads.keys() and grads
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-6, rtol=1e-4, msg=f"{name}: {key}")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(request.param, **COMMON, **FAMILIES[request.param]))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder


@pytest.mark.parametrize("checkpointing", [False, True])
def test_varlen_equals_masked_sdpa_and_keeps_no_mask(family_dir, checkpointing):
    name, folder = family_dir
    batch = two_rows()
    masked = run(folder, "sdpa", batch, gradient_checkpointing=checkpointing)
    varlen = run(folder, "sdpa_varlen", batch, gradient_checkpointing=checkpointing)
    assert_same(masked, varlen, name)
    square = lambda shape: len(shape) >= 2 and shape[-1] == shape[-2] == T
    if not checkpointing:  # masked sdpa keeps a float copy of the [T, T] mask per layer; varlen none
        assert any(square(s) for s in masked[2]), f"{name}: the masked reference kept no mask (test is void)"
    assert not any(square(s) for s in varlen[2]), f"{name}: sdpa_varlen kept a [T, T] tensor for backward"


def test_a_sliding_window_shorter_than_a_sample_takes_the_masked_path(tmp_path):
    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", **COMMON, num_key_value_heads=2, sliding_window=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    batch = two_rows()
    assert_same(run(tmp_path, "sdpa", batch), run(tmp_path, "sdpa_varlen", batch), "mistral, window 4")


def test_a_forward_without_segments_warns_and_gives_masked_values(tmp_path, caplog):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **COMMON, **FAMILIES["llama"])).save_pretrained(tmp_path)
    ids, pos, _ = two_rows()
    logits = {}
    for attention in ("sdpa", "sdpa_varlen"):
        torch.manual_seed(0)
        model = load(tmp_path, attention=attention).model.eval()
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="mft.train"):
            logits[attention] = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(logits["sdpa_varlen"], logits["sdpa"])
    assert "did not hand `packed_segments`" in caplog.text
