"""Render canonical records into token ids and loss masks (what the model trains on).

Canonical records come from the ingest stage:
  {"task": str, "shape": "chat"|"pair"|"text",
   "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
   "text": str | None, "source": "path/to/file.jsonl:LINE"}
Chat records have messages (optional leading system, then user/assistant alternating, ending
with an assistant turn) and ``text=None``; pretraining records have ``messages=[]`` and ``text``.
A pair record (prompt/answer, instruction/output, ...) is one round with an optional system.
Without ``shape``, a record with messages is a chat and one with text is text.

Two templates:
  * ``mftcoder`` (default): MFTCoder's training rendering, to the token
    (reference/mftcoder.md §1.3), with optional custom role markers;
  * ``chat_template``: the tokenizer's own Jinja chat template, with assistant-only masks
    derived exactly from the rendered text (never guessed).

Only assistant content and the EOS closing it are trained, on every assistant turn; text
records train every token. ``fit_to_length`` applies the over-length policy, and
``generation_chat_template`` writes a Jinja template that reproduces the training prompt at
inference time (MFTCoder's shipped template ignores custom role markers; this one does not).
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import jinja2

DEFAULT_ROLE_MARKERS: dict[str, str] = {
    "system": "<s>system\n",
    "user": "<s>human\n",
    "assistant": "<s>bot\n",
}
ROLES = ("system", "user", "assistant")
# MFTCoder's tokenize_mode "pretrain" (continued pretraining): the same rendering without markers.
PRETRAIN_MARKERS: dict[str, str] = {"system": "", "user": "", "assistant": ""}

# A "{% generation %}" block marks assistant text for HF's return_assistant_tokens_mask.
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ----------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class MFTCoderTemplate:
    """MFTCoder's training rendering (markers default to ``<s>system\\n``, ``<s>human\\n``, ``<s>bot\\n``)."""

    system_marker: str = DEFAULT_ROLE_MARKERS["system"]
    user_marker: str = DEFAULT_ROLE_MARKERS["user"]
    assistant_marker: str = DEFAULT_ROLE_MARKERS["assistant"]
    name: ClassVar[str] = "mftcoder"


@dataclass(frozen=True)
class TokenizerChatTemplate:
    """The tokenizer's own Jinja chat template (``tokenizer.chat_template``)."""

    name: ClassVar[str] = "chat_template"


Template = MFTCoderTemplate | TokenizerChatTemplate
TEMPLATE_NAMES = (MFTCoderTemplate.name, TokenizerChatTemplate.name)


def make_template(name: str = "mftcoder", role_markers: Mapping[str, str] | None = None) -> Template:
    """Build a template from config values: a name and, for ``mftcoder``, optional role markers.

    ``role_markers`` must give all three of ``system``, ``user``, ``assistant`` (as MFTCoder
    requires), so that a partial override never silently mixes two marker styles.
    """
    if name == TokenizerChatTemplate.name:
        if role_markers:
            raise ValueError(
                "role_markers only apply to the 'mftcoder' template; the 'chat_template' template "
                "uses the tokenizer's own Jinja template. Remove role_markers or use template 'mftcoder'."
            )
        return TokenizerChatTemplate()
    if name != MFTCoderTemplate.name:
        raise ValueError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
    if role_markers is None:
        return MFTCoderTemplate()
    keys = set(role_markers)
    if keys != set(ROLES):
        raise ValueError(
            f"role_markers must have exactly the keys system, user, assistant; got {sorted(keys)} "
            f"(missing: {sorted(set(ROLES) - keys)}, unknown: {sorted(keys - set(ROLES))})"
        )
    for role, marker in role_markers.items():
        if not isinstance(marker, str):
            raise ValueError(f"role_markers[{role!r}] must be a string, got {type(marker).__name__}")
    return MFTCoderTemplate(
        system_marker=role_markers["system"],
        user_marker=role_markers["user"],
        assistant_marker=role_markers["assistant"],
    )


# ----------------------------------------------------------------------------- rendered samples


@dataclass(frozen=True)
class RenderedSample:
    """Token ids, a 0/1 loss mask of the same length, and where each conversation round ends.

    ``round_ends[i]`` is the token count after round i (a user turn and its assistant answer;
    round 0 also holds the system turn). Truncation cuts only at these points.
    """

    input_ids: list[int]
    loss_mask: list[int]
    round_ends: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(self.loss_mask)


def normalize_content(content: str) -> str:
    """MFTCoder's content normalisation: narrow and plain no-break spaces become spaces."""
    return content.replace("\u202f", " ").replace("\xa0", " ")


def render_record(record: Mapping[str, Any], tokenizer, template: Template, eos_id: int | None = None) -> RenderedSample:
    """Render one canonical record. ``eos_id`` defaults to ``tokenizer.eos_token_id``."""
    return render_records([record], tokenizer, template, eos_id)[0]


def render_records(
    records: Sequence[Mapping[str, Any]], tokenizer, template: Template, eos_id: int | None = None
) -> list[RenderedSample]:
    """Render many records; with the mftcoder template all text pieces go through one batch encode.

    Batch encoding lets the Rust tokenizer work on all pieces at once, which is several times
    faster than one ``encode`` call per piece and gives identical ids.
    """
    eos_id = _default_eos_id(tokenizer, eos_id)
    if isinstance(template, TokenizerChatTemplate):
        return [_render_with_chat_template(record, tokenizer, eos_id) for record in records]
    if not isinstance(template, MFTCoderTemplate):
        raise TypeError(f"template must be MFTCoderTemplate or TokenizerChatTemplate, got {template!r}")
    plans = [_mftcoder_pieces(record, template) for record in records]
    encoded = iter(_encode_batch(tokenizer, [piece.text for plan in plans for piece in plan]))
    return [_assemble(plan, [next(encoded) for _ in plan], eos_id) for plan in plans]


def render_prompt(
    messages: Sequence[Mapping[str, Any]], tokenizer, template: Template, eos_id: int | None = None
) -> list[int]:
    """Token ids of the generation prompt for a conversation that ends with a user turn.

    For the mftcoder template these are exactly the ids training saw before the answer (the
    same piecewise encoding); use this for evaluation to avoid any template drift.
    """
    messages = list(messages)
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("a generation prompt needs a conversation that ends with a user message")
    if isinstance(template, TokenizerChatTemplate):
        _require_chat_template(tokenizer)
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    # Validate and render through the training path: append a placeholder answer, then cut it off.
    record = {"messages": messages + [{"role": "assistant", "content": ""}], "text": None, "source": "<prompt>"}
    plan = _mftcoder_pieces(record, template)[:-2]  # drop the placeholder answer and its "\n"
    eos_id = _default_eos_id(tokenizer, eos_id)
    return _assemble(plan, _encode_batch(tokenizer, [piece.text for piece in plan]), eos_id).input_ids


# ----------------------------------------------------------------------------- mftcoder rendering


@dataclass(frozen=True)
class _Piece:
    text: str
    trained: int
    append_eos: bool = False
    ends_round: bool = False


def _mftcoder_pieces(record: Mapping[str, Any], template: MFTCoderTemplate) -> list[_Piece]:
    """The text pieces MFTCoder encodes separately, with their mask value (§1.3).

    A chat record: the system turn is a piece of its own; the assistant marker is glued to the
    user turn; the answer is encoded on its own and followed by EOS (both trained); a lone
    "\\n" after the EOS is not trained. A pair record is MFTCoder's other branch: system,
    user marker, prompt and assistant marker in ONE piece (so a system ending in whitespace
    merges with what follows, e.g. SmolLM2's "\\n\\n" token), then the answer and EOS, and
    nothing after them.
    """
    kind, payload = _validate_record(record)
    if kind == "text":
        return [_Piece(normalize_content(payload) + "\n", 1, append_eos=True, ends_round=True)]
    if kind == "pair":
        *system, user, assistant = payload
        # MFTCoder normalises the system marker with the system text here (not in chat records).
        head = normalize_content(template.system_marker + system[0]["content"]) + "\n" if system else ""
        prompt = head + template.user_marker + normalize_content(user["content"]) + "\n" + template.assistant_marker
        answer = normalize_content(assistant["content"]) + "\n"
        return [_Piece(prompt, 0), _Piece(answer, 1, append_eos=True, ends_round=True)]
    pieces: list[_Piece] = []
    messages = payload
    if messages[0]["role"] == "system":
        pieces.append(_Piece(template.system_marker + normalize_content(messages[0]["content"]) + "\n", 0))
        messages = messages[1:]
    for user, assistant in zip(messages[0::2], messages[1::2]):
        pieces.append(
            _Piece(template.user_marker + normalize_content(user["content"]) + "\n" + template.assistant_marker, 0)
        )
        pieces.append(_Piece(normalize_content(assistant["content"]) + "\n", 1, append_eos=True))
        pieces.append(_Piece("\n", 0, ends_round=True))
    return pieces


def _assemble(plan: list[_Piece], encoded: list[list[int]], eos_id: int) -> RenderedSample:
    input_ids: list[int] = []
    loss_mask: list[int] = []
    round_ends: list[int] = []
    for piece, ids in zip(plan, encoded, strict=True):
        if piece.append_eos:
            ids = ids + [eos_id]
        input_ids.extend(ids)
        loss_mask.extend([piece.trained] * len(ids))
        if piece.ends_round:
            round_ends.append(len(input_ids))
    return RenderedSample(input_ids, loss_mask, round_ends)


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batch-encode without special tokens. A Hugging Face fast tokenizer delegates to its Rust
    backend, which gives the same ids without building a BatchEncoding; a bare
    `tokenizers.Tokenizer` (what tokenize workers load: no transformers import) works too."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) or (tokenizer if hasattr(tokenizer, "encode_batch") else None)
    if backend is not None:
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


# ----------------------------------------------------------------------------- chat_template rendering


def _render_with_chat_template(record: Mapping[str, Any], tokenizer, eos_id: int) -> RenderedSample:
    """Render with the tokenizer's Jinja template; train exactly the assistant answers.

    The answers are located as character spans of the rendered text, either from the
    template's ``{% generation %}`` blocks or, for ordinary templates, by rendering
    conversation prefixes (see ``_assistant_spans_from_prefixes``). Characters map to tokens
    through the tokenizer's offsets: a token is trained iff its characters lie entirely inside
    a trained span. So a token that merges prompt and answer characters (byte-level BPEs turn
    "\\n" + an indented answer into "\\n   ") is never trained on prompt text; the answer's
    remaining tokens are.
    """
    kind, payload = _validate_record(record)
    source = record.get("source", "<unknown source>")
    if kind == "text":
        # Pretraining text has no conversation to template: same rendering as mftcoder.
        ids = _encode_batch(tokenizer, [normalize_content(payload) + "\n"])[0] + [eos_id]
        return RenderedSample(ids, [1] * len(ids), [len(ids)])
    chat_template = _require_chat_template(tokenizer)
    messages = [{"role": m["role"], "content": m["content"]} for m in payload]
    try:
        if _GENERATION_BLOCK.search(chat_template):
            full, spans, round_end_chars = _assistant_spans_from_generation_blocks(messages, tokenizer, chat_template)
        else:
            full, spans, round_end_chars = _assistant_spans_from_prefixes(messages, tokenizer, eos_id)
        return _sample_from_char_spans(full, spans, round_end_chars, tokenizer)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error
    except jinja2.TemplateError as error:  # e.g. the template's raise_exception for an unsupported role
        raise ValueError(f"{source}: the tokenizer's chat template failed on this record: {error}") from error


def _assistant_spans_from_prefixes(
    messages: list[dict], tokenizer, eos_id: int
) -> tuple[str, list[tuple[int, int]], list[int]]:
    """Locate each answer by rendering conversation prefixes.

    For assistant turn i: ``before`` = messages[:i] with the generation prompt, ``through`` =
    messages[:i+1]. Both must be prefixes of the full rendering, and the answer must appear
    verbatim right after ``before``, else the span cannot be located exactly and this raises.
    Trained characters: the answer plus the template text up to and including the first EOS
    after it (the turn's end token; a template that does not end turns with EOS raises).
    """

    def render(conversation: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    full = render(messages, False)
    eos_text = tokenizer.convert_ids_to_tokens(eos_id)
    spans: list[tuple[int, int]] = []
    round_end_chars: list[int] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:index], True)
        through = render(messages[: index + 1], False)
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise ValueError(
                f"the chat template does not render conversation prefixes as prefixes of the full "
                f"conversation (assistant turn {index}), so assistant spans cannot be located exactly; "
                f"use template 'mftcoder' or a chat template with {{% generation %}} blocks"
            )
        start = len(before)
        content = message["content"]
        if not through.startswith(content, start):
            raise ValueError(
                f"the chat template rewrites assistant turn {index} (its content does not appear "
                f"verbatim after the generation prompt), so the trained span cannot be located "
                f"exactly; use template 'mftcoder' or a chat template with {{% generation %}} blocks"
            )
        eos_at = through.find(eos_text, start + len(content)) if eos_text else -1
        if eos_at < 0:
            raise ValueError(
                f"the chat template does not close assistant turn {index} with the EOS token "
                f"{eos_text!r}, so the model would never learn to stop; set the tokenizer's eos_token "
                f"to the turn-closing token or use template 'mftcoder'"
            )
        spans.append((start, eos_at + len(eos_text)))
        round_end_chars.append(len(through))
    return full, spans, round_end_chars


def _assistant_spans_from_generation_blocks(
    messages: list[dict], tokenizer, chat_template: str
) -> tuple[str, list[tuple[int, int]], list[int]]:
    """The character spans the template marks with {% generation %} (what HF's assistant mask uses)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, indices = render_jinja_template(
        conversations=[messages],
        chat_template=chat_template,
        return_assistant_tokens_mask=True,
        add_generation_prompt=False,
        **tokenizer.special_tokens_map,
    )
    spans = [(int(start), int(end)) for start, end in indices[0] if end > start]
    if not spans:
        raise ValueError("the chat template's {% generation %} blocks mark no text of this conversation")
    return rendered[0], spans, [end for _, end in spans]


def _sample_from_char_spans(
    full: str, spans: list[tuple[int, int]], round_end_chars: list[int], tokenizer
) -> RenderedSample:
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    offsets = [(int(start), int(end)) for start, end in encoding["offset_mapping"]]
    loss_mask = [0] * len(input_ids)
    for turn, (span_start, span_end) in enumerate(spans):
        inside = [i for i, (start, end) in enumerate(offsets) if span_start <= start < end <= span_end]
        if not inside:
            raise ValueError(f"assistant turn {turn} has no token entirely inside its answer; nothing to train")
        for i in inside:
            loss_mask[i] = 1
    round_ends = [sum(1 for _, end in offsets if end <= boundary) for boundary in round_end_chars]
    round_ends[-1] = len(input_ids)  # the last round owns the template's trailing text
    return RenderedSample(input_ids, loss_mask, round_ends)


def _require_chat_template(tokenizer) -> str:
    try:
        return tokenizer.get_chat_template()
    except ValueError as error:
        raise ValueError(
            "template 'chat_template' needs a tokenizer with a chat template, and this one has none; "
            "use template 'mftcoder' or save a chat_template.jinja with the tokenizer"
        ) from error


# ----------------------------------------------------------------------------- validation


SHAPES = ("chat", "pair", "text")


def _validate_record(record: Mapping[str, Any]) -> tuple[str, Any]:
    """Return ("text", text), ("chat", messages) or ("pair", messages), or raise a ValueError
    naming the source."""
    source = record.get("source", "<unknown source>")
    messages = record.get("messages") or []
    text = record.get("text")
    shape = record.get("shape") or ("text" if text is not None else "chat")
    if shape not in SHAPES:
        raise ValueError(f"{source}: shape {shape!r} is not one of {', '.join(SHAPES)}")
    if (shape == "text") != (text is not None):
        raise ValueError(f"{source}: a {shape} record must {'have' if shape == 'text' else 'not have'} text")
    if text is not None:
        if messages:
            raise ValueError(f"{source}: a record has either messages or text, not both")
        if not isinstance(text, str):
            raise ValueError(f"{source}: 'text' must be a string, got {type(text).__name__}")
        return "text", text
    if not messages:
        raise ValueError(f"{source}: record has neither messages nor text; the ingest stage should have rejected it")
    for position, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            raise ValueError(f"{source}: message {position} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{source}: message {position} ({role}) content must be a string")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for position, message in enumerate(turns):
        expected = "user" if position % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(
                f"{source}: after an optional first system message, roles must alternate "
                f"user/assistant; turn {position} is {message['role']!r}, expected {expected!r}"
            )
    if not turns or turns[-1]["role"] != "assistant":
        raise ValueError(f"{source}: the conversation must end with an assistant message (nothing to train otherwise)")
    if shape == "pair" and len(turns) != 2:
        raise ValueError(f"{source}: a pair record is one user and one assistant message, got {len(turns)} turns")
    return shape, list(messages)


def _default_eos_id(tokenizer, eos_id: int | None) -> int:
    if eos_id is not None:
        return int(eos_id)
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(
            "the tokenizer has no eos_token_id; pass eos_id from mft_core.modeling.resolve_special_tokens"
        )
    return int(tokenizer.eos_token_id)


# ----------------------------------------------------------------------------- over-length policy


class FitStatus(str, enum.Enum):
    KEPT = "kept"
    TRUNCATED = "truncated"
    DROPPED = "dropped"


OVERLENGTH_POLICIES = ("drop", "truncate")


def fit_to_length(sample: RenderedSample, seq_length: int, policy: str) -> tuple[RenderedSample | None, FitStatus]:
    """Make a sample fit ``seq_length`` tokens, or drop it; the status lets the caller count per task.

    ``truncate`` keeps whole earlier rounds and drops later ones. If even the first round does
    not fit, it cuts inside the first answer, provided at least one trained token remains
    that can be a target (position >= 1: the first token of a sample is never predicted);
    otherwise the sample is dropped. ``drop`` drops every over-length sample.
    """
    if policy not in OVERLENGTH_POLICIES:
        raise ValueError(f"unknown over-length policy {policy!r}; choose one of {', '.join(OVERLENGTH_POLICIES)}")
    if seq_length < 2:
        raise ValueError(f"seq_length must be at least 2, got {seq_length}")
    if len(sample) <= seq_length:
        return sample, FitStatus.KEPT
    if policy == "drop":
        return None, FitStatus.DROPPED
    whole_rounds = [end for end in sample.round_ends if end <= seq_length]
    cut = whole_rounds[-1] if whole_rounds else seq_length
    if not whole_rounds and not any(sample.loss_mask[1:cut]):
        return None, FitStatus.DROPPED
    round_ends = whole_rounds if whole_rounds else [cut]
    return RenderedSample(sample.input_ids[:cut], sample.loss_mask[:cut], round_ends), FitStatus.TRUNCATED


# ----------------------------------------------------------------------------- generation template


def generation_chat_template(template: Template, eos_token: str) -> str:
    """A Jinja chat template that reproduces the mftcoder training rendering at inference.

    Saved as ``tokenizer.chat_template``, ``apply_chat_template(messages,
    add_generation_prompt=True, tokenize=True)`` yields the training prompt token for token
    (given the usual byte-level/SentencePiece behaviour of splitting at "\\n" before a marker;
    checked by the tests). It uses the template's own role markers and normalises content
    like training does. Roles must alternate as in training, else the template raises.

    One limit, inherent to tokenizing a whole string: an earlier assistant answer that starts
    with whitespace may tokenize differently glued to its marker than on its own. The final
    prompt of a single-turn conversation is always exact; ``render_prompt`` is exact always.
    """
    if isinstance(template, TokenizerChatTemplate):
        raise ValueError(
            "template 'chat_template' already uses the tokenizer's own chat template; keep it as is"
        )
    literal = lambda text: json.dumps(text, ensure_ascii=False)  # a valid Jinja string literal
    return (
        "{%- set system_marker = " + literal(template.system_marker) + " -%}"
        "{%- set user_marker = " + literal(template.user_marker) + " -%}"
        "{%- set assistant_marker = " + literal(template.assistant_marker) + " -%}"
        "{%- set eos = " + literal(eos_token) + " -%}"
        "{%- set offset = 1 if (messages and messages[0]['role'] == 'system') else 0 -%}"
        "{%- for message in messages -%}"
        "{%- set content = message['content'] | replace('\\u202f', ' ') | replace('\\xa0', ' ') -%}"
        "{%- if message['role'] == 'system' -%}"
        "{%- if not loop.first -%}{{- raise_exception('a system message is only allowed first') -}}{%- endif -%}"
        "{{- system_marker + content + '\\n' -}}"
        "{%- elif message['role'] == 'user' -%}"
        "{%- if (loop.index0 - offset) % 2 != 0 -%}{{- raise_exception('roles must alternate user/assistant') -}}{%- endif -%}"
        "{{- user_marker + content + '\\n' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{%- if (loop.index0 - offset) % 2 != 1 -%}{{- raise_exception('roles must alternate user/assistant') -}}{%- endif -%}"
        "{{- assistant_marker + content + '\\n' + eos + '\\n' -}}"
        "{%- else -%}"
        "{{- raise_exception('unsupported role ' + message['role'] + '; use system, user or assistant') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- assistant_marker -}}{%- endif -%}"
    )
