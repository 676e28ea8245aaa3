"""Attention over packed rows without a cross-sample mask: `sdpa_varlen`.

A packed row holds several samples that must not see each other. Transformers' `sdpa` isolates
them with a [T, T] block-diagonal mask, and PyTorch's fused kernels then compute every block of
it, masked or not, and keep a float copy of the mask per layer for backward. `sdpa_varlen` calls
scaled_dot_product_attention once per packed sample with `is_causal=True`, the way flash-attention's
varlen kernel does on GPU: only the causal half of each sample's own block is computed, no mask
exists, and grouped-query heads are not repeated (enable_gqa). Measured on SmolLM2-135M, one row of
1024 tokens holding 6 samples, 2 CPU cores: one layer's attention forward + backward 48 -> 16 ms,
and 7 MB less kept for backward per layer.

The sample boundaries come in as the `packed_segments` keyword, computed once per forward by
`packed_segments()` from the position ids; transformers hands model keywords down to the attention
function. Anything this path does not cover goes to transformers' own sdpa with the mask it built
(the same values): no boundaries given, a sliding window shorter than a sample, an additive
position bias, a cache, non-causal attention. A soft cap on the attention logits (Gemma 2) is
beyond sdpa: it goes to the model family's own eager attention with that mask.

transformers knows the implementation as `KERNEL`, a name without "sdpa" in it: a name holding
"sdpa" makes transformers demand sdpa support of the model class, which Gemma 2 (soft cap)
declines; this path serves it through the masked eager fallback instead.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("mft.train")

NAME = "sdpa_varlen"  # the value of train.attention
KERNEL = "mft_varlen"  # the attn_implementation transformers knows it by (module docstring)

Segments = tuple[tuple[tuple[int, int], ...], ...]  # per row: (start, end) of each packed sample


def packed_segments(position_ids: torch.Tensor) -> Segments:
    """Per row, the spans where positions count up by one: the packed samples (and the padding
    tail, which restarts at 0 too). The same rule transformers uses to find packed sequences."""
    rows = []
    for row in position_ids.tolist():
        starts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1] + 1]
        rows.append(tuple(zip(starts, starts[1:] + [len(row)])))
    return tuple(rows)


def flash_varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """The sample boundaries for flash-attention's varlen kernel, over the micro-batch flattened
    into one sequence (cu_seq_lens: cumulative offsets, int32; max_length: the longest segment).

    transformers infers them from position ids only when a micro-batch has one row; with more
    rows it runs plain causal attention over each whole row, and every sample attends to the
    samples before it in its row. Passed explicitly, its varlen path flattens the rows and
    isolates every segment (the same segments sdpa_varlen uses, padding tail included)."""
    segments = packed_segments(position_ids)
    length = position_ids.shape[1]
    offsets = [0] + [number * length + end for number, row in enumerate(segments) for _, end in row]
    cu_seq_lens = torch.tensor(offsets, dtype=torch.int32, device=position_ids.device)
    longest = max(end - start for row in segments for start, end in row)
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest, "max_length_k": longest}


def _window_too_short(module: torch.nn.Module, kwargs: dict, longest: int) -> bool:
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    return bool(window) and window < longest


def sdpa_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          packed_segments: Segments | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, T, D], key/value [B, Hkv, T, D] -> ([B, T, H, D], None), like transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    longest = max((end - start for row in packed_segments or () for start, end in row), default=0)
    if kwargs.get("softcap") is not None:
        return _masked_eager_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if (packed_segments is None or len(packed_segments) != query.shape[0] or query.shape[2] != key.shape[2]
            or not getattr(module, "is_causal", True) or kwargs.get("position_bias") is not None
            or _window_too_short(module, kwargs, longest)):
        if packed_segments is None:
            _warn_once("the model did not hand `packed_segments` to its attention: masked sdpa instead (same values, slower)")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, row in enumerate(packed_segments):
        pieces = [
            torch.nn.functional.scaled_dot_product_attention(
                query[b:b + 1, :, start:end], key[b:b + 1, :, start:end], value[b:b + 1, :, start:end],
                dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa,
            ).transpose(1, 2)
            for start, end in row
        ]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


def _masked_eager_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float, scaling: float | None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """The model family's own eager attention (which applies the soft cap) with the mask transformers
    built for this path: sdpa's boolean mask (True = attend) made additive, as eager adds it to the
    scores. sdpa's mask is None where plain causal attention is all that is needed (one sample per
    row, no padding): then the causal mask is built here, eager has no is_causal of its own."""
    import sys

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__name__} soft-caps its attention logits but its module has no "
                         "eager_attention_forward; use train.attention: eager")
    length = query.shape[2]
    if attention_mask is None:
        attention_mask = torch.ones(length, key.shape[2], dtype=torch.bool, device=query.device).tril()[None, None]
    if attention_mask.dtype == torch.bool:
        additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
        attention_mask = additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
    output, _ = eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return output, None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def register() -> None:
    """Make `sdpa_varlen` a valid attn_implementation, as KERNEL (with sdpa's mask for the fallbacks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(KERNEL, sdpa_varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(KERNEL, sdpa_mask)
