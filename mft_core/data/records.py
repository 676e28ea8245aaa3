"""Record shapes accepted by ingest, and their one canonical form.

Accepted exactly as MFTCoder accepts them (reference/mftcoder.md §1.1), detected in its order:
  1. pair formats with an optional `system`: prompt/answer, prompt/response, input/output,
     instruction/output, instruction/response, question/response, question/answer, query/answer;
  2. a non-empty `chat_rounds` list of {role, content} (roles human|user, bot|assistant|gpt, and
     system only first);
  3. `text` (pretraining-style: every token trained).
Other keys (id, data_name, ...) are ignored, as MFTCoder ignores them.

Canonical form (what every later stage reads):
  {"shape": "chat"|"pair"|"text",
   "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "text": str | None}
chat/pair records have messages and text=None; text records have messages=[] and the text. The
shape is kept because MFTCoder tokenizes a pair differently from the same conversation written
as chat_rounds (reference/mftcoder.md §1.3): the pair's system, prompt and markers are one
tokenizer call, and no "\n" follows its EOS.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from json.encoder import encode_basestring, encode_basestring_ascii
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
    "bad_chat_rounds": "chat_rounds must be an array of objects with string `role` and `content`",
    "unknown_role": "roles are system, human|user, bot|assistant|gpt",
    "system_not_first": "a system turn may only be the first element of chat_rounds",
    "bad_alternation": "after the optional system turn, turns must alternate user, assistant, user, ...",
    "no_final_assistant": "end every conversation with an assistant (bot) turn: it is what gets trained",
    "empty_content": "every turn (and text) needs non-blank content; drop the turn or fill it",
    "non_string_content": "content (and text, prompt, answer, ...) must be JSON strings",
    "nul_character": "remove NUL (\\u0000) characters from the content",
    "lone_surrogate": "a \\ud800-\\udfff escape must be half of a UTF-16 pair (e.g. \\ud83d\\ude00); "
    "fix the tool that cut the pair apart, or replace the escape",
    "too_deeply_nested": "records are flat objects: remove or flatten the deeply nested value",
    # The two reasons below are about a whole file; ingest finds them, parse_line cannot.
    "corrupt_file": "the file is truncated or damaged: download or write it again "
    "(`gzip -t FILE` checks a .gz file); the lines before the damage were read",
    "json_array": "convert the array to JSON Lines, one object per line: jq -c '.[]' in.json > out.jsonl",
    # Preference tasks (data.tasks[].kind: preference) only.
    "not_a_preference_pair": "a preference record holds `chosen` and `rejected`: two chat conversations that "
    "differ only in their last (assistant) turn, or a `prompt` with two answers (see the README's preference format)",
    "pair_prefix_differs": "`chosen` and `rejected` must share every turn before the last one; only the final "
    "assistant answer may differ",
    "identical_answers": "the chosen and the rejected answer are the same text: such a pair teaches nothing; drop it",
}

# Any UTF-16 surrogate code point. json.loads joins a valid "\ud83d\ude00" pair into one
# character, so a surrogate left in a decoded string is always a lone one.
_SURROGATE = re.compile("[\ud800-\udfff]")


class RecordError(ValueError):
    """A record that cannot be used; `reason` is a key of REJECT_FIXES."""

    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_FIXES, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # Pickled as its two arguments (the default pickles the one message given to ValueError):
        # ingest's checks come back from Ray workers.
        return (RecordError, (self.reason, self.detail))


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: messages speak JSON, not Python."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    for python_type, name in ((str, "string"), (list, "array"), (dict, "object")):
        if isinstance(value, python_type):
            return name
    # Only Parquet rows can hold values JSON has no type for (binary, timestamps, decimals).
    return "binary value" if isinstance(value, bytes) else "non-JSON value"


def json_repr(value: Any, limit: int = 60) -> str:
    """A scalar as short JSON text for a message (objects and arrays by their type). Non-ASCII
    stays readable, but a lone surrogate is escaped: a message must be printable and writable as
    UTF-8 (rejects.jsonl)."""
    kind = json_type(value)
    if kind not in ("null", "boolean", "number", "string"):
        return f"a JSON {kind}" if kind in ("object", "array") else f"a {kind}"
    text = json.dumps(value, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "…"


def _content(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError("non_string_content", f"{where} is a JSON {json_type(value)}, not a string")
    if not value or value.isspace():  # what `not value.strip()` says, without copying the string
        raise RecordError("empty_content", f"{where} is empty")
    if "\x00" in value:
        raise RecordError("nul_character", f"{where} contains a NUL character")
    # isascii() is a flag lookup: most content (code) skips the scan
    surrogate = None if value.isascii() else _SURROGATE.search(value)
    if surrogate:
        raise RecordError(
            "lone_surrogate",
            f"{where} holds \\u{ord(surrogate.group()):04x} at character {surrogate.start()}: half of a UTF-16 pair, "
            "which is no character and cannot be written as UTF-8",
        )
    return value


def _system(obj: dict) -> list[dict[str, str]]:
    """An optional system field of the pair formats; null or "" means no system turn."""
    value = obj.get("system")
    if value is None or value == "":
        return []
    return [{"role": "system", "content": _content(value, "system")}]


def _chat_rounds(rounds: Any) -> list[dict[str, str]]:
    if not isinstance(rounds, list):
        raise RecordError("bad_chat_rounds", f"chat_rounds is a JSON {json_type(rounds)}, not an array")
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(rounds):
        if not isinstance(turn, dict):
            raise RecordError("bad_chat_rounds", f"chat_rounds[{i}] is a JSON {json_type(turn)}, not an object")
        if "role" not in turn or "content" not in turn:
            raise RecordError("bad_chat_rounds", f"chat_rounds[{i}] is not an object with role and content")
        raw_role = turn["role"]
        role = ROLE_ALIASES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RecordError("unknown_role", f"chat_rounds[{i}].role is {json_repr(raw_role)}")
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
        raise RecordError("not_object", f"got a JSON {json_type(obj)}")
    for user_key, answer_key in PAIR_KEYS:
        if user_key in obj and answer_key in obj:
            messages = _system(obj)
            messages.append({"role": "user", "content": _content(obj[user_key], user_key)})
            messages.append({"role": "assistant", "content": _content(obj[answer_key], answer_key)})
            return {"shape": "pair", "messages": messages, "text": None}
    rounds = obj.get("chat_rounds")
    if rounds:  # MFTCoder falls through to `text` when chat_rounds is empty
        return {"shape": "chat", "messages": _chat_rounds(rounds), "text": None}
    if "text" in obj:
        return {"shape": "text", "messages": [], "text": _content(obj["text"], "text")}
    keys = ", ".join(json_repr(key) for key in sorted(obj)[:8]) or "none"
    if "chosen" in obj and "rejected" in obj:
        raise RecordError("unknown_shape", f"a preference pair (keys: {keys}) in a fine-tuning task: "
                          "set `kind: preference` on this task in data.tasks")
    raise RecordError("unknown_shape", f"no chat_rounds, text or known pair of keys (keys: {keys})")


def _chat_turns(value: Any, where: str) -> list[dict[str, str]]:
    """A preference side written as chat turns ({role, content}; chatml's user/assistant/system or
    MFTCoder's human/bot), validated like chat_rounds."""
    try:
        return _chat_rounds(value)
    except RecordError as err:
        raise RecordError(err.reason, f"{where}: {err.detail}") from None


def _answer(value: Any, where: str) -> str:
    """One side of a flat preference record: a string, or a list of exactly one assistant turn."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or ROLE_ALIASES.get(
                str(value[0].get("role", "")).strip().lower()) != "assistant":
            raise RecordError("not_a_preference_pair", f"{where} is a list, but not of exactly one assistant turn")
        return _content(value[0].get("content"), f"{where}[0].content")
    return _content(value, where)


def normalize_preference(obj: Any) -> dict[str, Any]:
    """Validate one preference record and return its canonical form, or raise RecordError:
      {"shape": "preference", "messages": [the shared conversation, ending with a user turn],
       "text": None, "chosen": str, "rejected": str}
    Accepted: MFTCoder's {"chosen": [turns], "rejected": [turns]} (the two conversations equal but
    for their last, assistant, turn), and the flat {"prompt": str | [turns], "chosen", "rejected"}
    with an optional `system` (each answer a string or a one-turn assistant list)."""
    if not isinstance(obj, dict):
        raise RecordError("not_object", f"got a JSON {json_type(obj)}")
    if "chosen" not in obj or "rejected" not in obj:
        keys = ", ".join(json_repr(key) for key in sorted(obj)[:8]) or "none"
        raise RecordError("not_a_preference_pair", f"no `chosen` and `rejected` (keys: {keys})")
    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, list):
            messages = _chat_turns(prompt + [{"role": "assistant", "content": "-"}], "prompt")[:-1]
        else:
            messages = _system(obj) + [{"role": "user", "content": _content(prompt, "prompt")}]
        chosen, rejected = _answer(obj["chosen"], "chosen"), _answer(obj["rejected"], "rejected")
    else:
        if not isinstance(obj["chosen"], list) or not isinstance(obj["rejected"], list):
            raise RecordError("not_a_preference_pair", "without a `prompt`, `chosen` and `rejected` must be chat "
                              f"conversations (arrays of turns), got a JSON {json_type(obj['chosen'])} and a JSON "
                              f"{json_type(obj['rejected'])}")
        chosen_turns = _chat_turns(obj["chosen"], "chosen")
        rejected_turns = _chat_turns(obj["rejected"], "rejected")
        if chosen_turns[:-1] != rejected_turns[:-1]:
            differs = next((i for i, (a, b) in enumerate(zip(chosen_turns, rejected_turns)) if a != b),
                           min(len(chosen_turns), len(rejected_turns)) - 1)
            raise RecordError("pair_prefix_differs", f"chosen[{differs}] and rejected[{differs}] differ "
                              f"({len(chosen_turns)} and {len(rejected_turns)} turns)")
        messages = chosen_turns[:-1]
        chosen, rejected = chosen_turns[-1]["content"], rejected_turns[-1]["content"]
    if chosen == rejected:
        raise RecordError("identical_answers", f"both answers are {json_repr(chosen)}")
    return {"shape": "preference", "messages": messages, "text": None, "chosen": chosen, "rejected": rejected}


# The C scanner behind json.loads, called directly: json.loads wraps it in three Python calls and
# two regex matches for the whitespace around the value, a sixth of its time on a typical line.
_scan_json_value = json.JSONDecoder().scan_once


def _json_value(line: str) -> Any:
    """json.loads(line). A line the scanner does not take whole from its first character
    (surrounding whitespace, a BOM, bad JSON) goes to json.loads itself, for its exact result or
    error."""
    try:
        value, end = _scan_json_value(line, 0)
    except (StopIteration, ValueError):
        return json.loads(line)
    return value if end == len(line) else json.loads(line)


def parse_line(raw: bytes, normalize=normalize_record) -> dict[str, Any]:
    """Bytes of one JSONL line (without its newline) -> canonical record (`normalize_record`, or
    `normalize_preference` for a preference task), or raise RecordError."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError("invalid_utf8", f"invalid byte at offset {err.start}") from None
    try:
        obj = _json_value(line)
    except json.JSONDecodeError as err:
        raise RecordError("bad_json", f"{err.msg} at column {err.colno}") from None
    except RecursionError:
        # json.loads recurses once per nesting level; past the interpreter's limit it gives up
        # cleanly with RecursionError (the exact depth depends on the caller's stack).
        raise RecordError(
            "too_deeply_nested", f"the JSON is nested deeper than the parser allows (about {sys.getrecursionlimit()} levels)"
        ) from None
    return normalize(obj)


def _json_string(text: str) -> str:
    """What json.dumps(text, ensure_ascii=False) writes. The ASCII encoder is a third faster and
    writes the same for ASCII text, except DEL, which it alone escapes."""
    if text.isascii() and "\x7f" not in text:
        return encode_basestring_ascii(text)
    return encode_basestring(text)


def record_fingerprint(record: dict[str, Any]) -> bytes:
    """sha256 of the canonical content (task-independent, so duplicates across tasks match).

    The shape is left out: a pair and a chat_rounds record of the same conversation are the same
    content (the first one wins), and the content-keyed split of existing data never moves.

    The hashed text is json.dumps([messages, text(, chosen, rejected)], ensure_ascii=False,
    separators=(",", ":")), written out here from its strings: json.dumps spends about as long
    walking the lists and dicts as escaping the strings, and ingest does this for every record.
    tests/unit/test_ingest.py checks the two agree."""
    turns = ",".join(['{"role":' + _json_string(turn["role"]) + ',"content":' + _json_string(turn["content"]) + "}"
                      for turn in record["messages"]])
    parts = ["[" + turns + "]", "null" if record["text"] is None else _json_string(record["text"])]
    if record["shape"] == "preference":
        parts += [_json_string(record["chosen"]), _json_string(record["rejected"])]
    payload = "[" + ",".join(parts) + "]"
    return hashlib.sha256(payload.encode("utf-8")).digest()


def record_text(record: dict[str, Any]) -> str:
    """All the text of a record, for decontamination."""
    if record["text"] is not None:
        return record["text"]
    answers = [record["chosen"], record["rejected"]] if record["shape"] == "preference" else []
    return "\n".join([m["content"] for m in record["messages"]] + answers)
