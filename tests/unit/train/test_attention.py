"""sdpa_varlen: attention once per packed sample equals transformers' masked sdpa (values and
gradients) on tiny models of several families, keeps no [T, T] mask for backward, and falls back
to the masked path, with the same values, where it does not apply."""

import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mft_core.train.attention import packed_segments
from tests.unit.train.test_model_families import COMMON, FAMILIES, family_config, load, packed_batch, reference_attention

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
    model = AutoModelForCausalLM.from_config(family_config(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder


# Soft-capped attention logits go to the family's eager attention with the mask, by design.
MASKED_BY_DESIGN = {"gemma2"}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_varlen_equals_masked_sdpa_and_keeps_no_mask(family_dir, checkpointing):
    name, folder = family_dir
    batch = two_rows()
    masked = run(folder, reference_attention(name), batch, gradient_checkpointing=checkpointing)
    varlen = run(folder, "sdpa_varlen", batch, gradient_checkpointing=checkpointing)
    assert_same(masked, varlen, name)
    square = lambda shape: len(shape) >= 2 and shape[-1] == shape[-2] == T
    if not checkpointing:  # masked sdpa keeps a float copy of the [T, T] mask per layer; varlen none
        assert any(square(s) for s in masked[2]), f"{name}: the masked reference kept no mask (test is void)"
    if name not in MASKED_BY_DESIGN:
        assert not any(square(s) for s in varlen[2]), f"{name}: sdpa_varlen kept a [T, T] tensor for backward"


def test_a_sliding_window_shorter_than_a_sample_takes_the_masked_path(tmp_path):
    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", **COMMON, num_key_value_heads=2, sliding_window=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    batch = two_rows()
    assert_same(run(tmp_path, "sdpa", batch), run(tmp_path, "sdpa_varlen", batch), "mistral, window 4")


def test_a_forward_without_segments_warns_and_gives_masked_values(tmp_path, caplog, monkeypatch):
    from mft_core.train import attention as packed_attention

    monkeypatch.setattr(packed_attention, "_warned", set())  # warned once per process: maybe by an earlier test
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


# ----------------------------------------------------------------------------- flash-attention 2


def flash_attention_stand_in(calls: list):
    """Stands in for flash-attn, which needs CUDA and cannot be installed here. Registered as
    `flash_attention_2` through transformers' AttentionInterface, it records the keywords the model
    hands its attention and computes what transformers' flash path computes from them: the varlen
    kernel over the given cu_seq_lens; else, for a micro-batch of one row whose position ids
    restart, over the segments transformers derives from them; else plain causal attention over
    each whole row (modeling_flash_attention_utils._flash_attention_forward)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        batch, heads, length, dim = query.shape
        calls.append({"rows": batch, **kwargs})
        position_ids = kwargs.get("position_ids")
        if kwargs.get("cu_seq_lens_q") is not None:
            offsets = kwargs["cu_seq_lens_q"].tolist()
        elif batch == 1 and position_ids is not None and len(packed_segments(position_ids)[0]) > 1:
            offsets = prepare_fa_kwargs_from_position_ids(position_ids)[0][0].tolist()
        else:
            offsets = [row * length for row in range(batch + 1)]
        flat = lambda t: t.transpose(1, 2).reshape(batch * length, t.shape[1], dim).transpose(0, 1)  # [H, B*T, D]
        q, k, v = flat(query), flat(key), flat(value)
        pieces = [torch.nn.functional.scaled_dot_product_attention(
            q[None, :, a:b], k[None, :, a:b], v[None, :, a:b], is_causal=True, scale=scaling,
            enable_gqa=q.shape[0] != k.shape[0])[0] for a, b in zip(offsets, offsets[1:])]
        return torch.cat(pieces, dim=1).transpose(0, 1).reshape(batch, length, heads, dim), None

    return attention


def test_flash_attention_2_isolates_packed_samples_of_a_micro_batch_of_several_rows(tmp_path, monkeypatch):
    """rows_per_micro_batch: 2 under flash-attention 2: transformers finds the packed samples from
    the position ids only when the micro-batch has one row, so the boundaries must be handed to the
    attention explicitly. Checked on CPU with a stand-in for flash-attn's kernels (see above): the
    keywords the attention receives, and per-sample losses equal to each sample run alone."""
    from transformers import AttentionInterface

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **COMMON, **FAMILIES["llama"])).save_pretrained(tmp_path)
    calls = []
    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", flash_attention_stand_in(calls))
    wrapper = load(tmp_path, attention="sdpa").eval()  # from_pretrained refuses flash_attention_2 without flash-attn
    wrapper.model.get_base_model().config._attn_implementation = "flash_attention_2"
    ids, pos, labels = two_rows()
    with torch.no_grad():
        packed = wrapper(ids, pos, labels).token_loss
        alone = torch.cat([wrapper(ids[r:r + 1, a:b], pos[r:r + 1, a:b], labels[r:r + 1, a:b]).token_loss
                           for r, row in enumerate(packed_segments(pos)) for a, b in row])

    expected = [0] + [r * T + end for r, row in enumerate(packed_segments(pos)) for _, end in row]
    seen = calls[0]
    assert seen["rows"] == 2 and seen.get("cu_seq_lens_q") is not None, "flash-attention got no sample boundaries"
    assert seen["cu_seq_lens_q"].tolist() == seen["cu_seq_lens_k"].tolist() == expected
    assert seen["cu_seq_lens_q"].dtype == torch.int32
    assert seen["max_length_q"] == seen["max_length_k"] == max(b - a for row in packed_segments(pos) for a, b in row)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
