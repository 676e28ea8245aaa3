"""Record shapes accepted by ingest, and their one canonical form.

Accepted exactly as MFTCoder accepts them (reference/mftcoder.md §1.1), detected in its order:
  1. pair formats with an optional `system`: prompt/answer, prompt/response, input/output,
     instruction/output, instruction/response, question/response, question/answer, query/answer;
  2. a non-empty `chat_rounds` list of {role, content} (roles human|user, bot|assistant|gpt, and
     system only first);
  3. `text` (pretraining-style: every token trained).
Other keys (id, data_name, ...) are ignored, as MFTCoder ignores them.

Canonical form (what every later stage reads):
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "text": str | None}
chat/pair records have messages and text=None; text records have messages=[] and the text.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

PAIR_KEYS: tuple[tuple[str, str], ...] = (
    ("prompt", "answer"),
    ("prompt", "response"),
    ("input", "output"),
    ("instruction", "output"),
    ("instruction", "response"),
    ("question", "response"),
    ("question", "answer"),
    ("query", "answer"),
)

ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "bot": "assistant",
    "assistant": "assistant",
    "gpt": "assistant",
}

# reason -> how to fix it. Every reject carries one of these reasons.
REJECT_FIXES: dict[str, str] = {
    "invalid_utf8": "re-encode the file as UTF-8",
    "bad_json": "each line must hold exactly one JSON object",
    "not_object": "each line must be a JSON object ({...}), not an array or a scalar",
    "unknown_shape": "use chat_rounds, text, or a pair such as prompt/answer (see the README's data formats)",
    "bad_chat_rounds": "chat_rounds must be a list of objects with string `role` and `content`",
    "unknown_role": "roles are system, human|user, bot|assistant|gpt",
    "system_not_first": "a system turn may only be the first element of chat_rounds",
    "bad_alternation": "after the optional system turn, turns must alternate user, assistant, user, ...",
    "no_final_assistant": "end every conversation with an assistant (bot) turn: it is what gets trained",
    "empty_content": "every turn (and text) needs non-blank content; drop the turn or fill it",
    "non_string_content": "content (and text, prompt, answer, ...) must be JSON strings",
    "nul_character": "remove NUL (\\u0000) characters from the content",
}


class RecordError(ValueError):
    """A record that cannot be used; `reason` is a key of REJECT_FIXES."""

    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_FIXES, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _content(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError("non_string_content", f"{where} is a JSON {type(value).__name__}, not a string")
    if not value.strip():
        raise RecordError("empty_content", f"{where} is empty")
    if "\x00" in value:
        raise RecordError("nul_character", f"{where} contains a NUL character")
    return value


def _system(obj: dict) -> list[dict[str, str]]:
    """An optional system field of the pair formats; null or "" means no system turn."""
    value = obj.get("system")
    if value is None or value == "":
        return []
    return [{"role": "system", "content": _content(value, "system")}]


def _chat_rounds(rounds: Any) -> list[dict[str, str]]:
    if not isinstance(rounds, list):
        raise RecordError("bad_chat_rounds", f"chat_rounds is a JSON {type(rounds).__name__}, not a list")
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(rounds):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise RecordError("bad_chat_rounds", f"chat_rounds[{i}] is not an object with role and content")
        raw_role = turn["role"]
        role = ROLE_ALIASES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RecordError("unknown_role", f"chat_rounds[{i}].role is {raw_role!r}")
        if role == "system" and i != 0:
            raise RecordError("system_not_first", f"chat_rounds[{i}] is a system turn")
        messages.append({"role": role, "content": _content(turn["content"], f"chat_rounds[{i}].content")})
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise RecordError("no_final_assistant", "chat_rounds holds only a system turn")
    for j, turn in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if turn["role"] != expected:
            index = j + (len(messages) - len(turns))
            raise RecordError("bad_alternation", f"chat_rounds[{index}] is {turn['role']!r}, expected {expected!r}")
    if turns[-1]["role"] != "assistant":
        raise RecordError("no_final_assistant", f"the last turn (chat_rounds[{len(messages) - 1}]) is from the user")
    return messages


def normalize_record(obj: Any) -> dict[str, Any]:
    """Validate one parsed JSON value and return its canonical form, or raise RecordError."""
    if not isinstance(obj, dict):
        raise RecordError("not_object", f"got a JSON {type(obj).__name__}")
    for user_key, answer_key in PAIR_KEYS:
        if user_key in obj and answer_key in obj:
            messages = _system(obj)
            messages.append({"role": "user", "content": _content(obj[user_key], user_key)})
            messages.append({"role": "assistant", "content": _content(obj[answer_key], answer_key)})
            return {"messages": messages, "text": None}
    rounds = obj.get("chat_rounds")
    if rounds:  # MFTCoder falls through to `text` when chat_rounds is empty
        return {"messages": _chat_rounds(rounds), "text": None}
    if "text" in obj:
        return {"messages": [], "text": _content(obj["text"], "text")}
    keys = ", ".join(sorted(obj)[:8]) or "none"
    raise RecordError("unknown_shape", f"no chat_rounds, text or known pair of keys (keys: {keys})")


def parse_line(raw: bytes) -> dict[str, Any]:
    """Bytes of one JSONL line (without its newline) -> canonical record, or raise RecordError."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError("invalid_utf8", f"invalid byte at offset {err.start}") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise RecordError("bad_json", f"{err.msg} at column {err.colno}") from None
    return normalize_record(obj)


def record_fingerprint(record: dict[str, Any]) -> bytes:
    """sha256 of the canonical content (task-independent, so duplicates across tasks match)."""
    payload = json.dumps([record["messages"], record["text"]], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).digest()


def record_text(record: dict[str, Any]) -> str:
    """All the text of a record, for decontamination."""
    if record["text"] is not None:
        return record["text"]
    return "\n".join(m["content"] for m in record["messages"])
