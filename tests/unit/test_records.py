"""Every record shape ingest accepts, and every reason it rejects one."""

import json

import pytest

from mft_core.data.records import PAIR_KEYS, REJECT_FIXES, RecordError, normalize_record, parse_line


def user(c):
    return {"role": "user", "content": c}


def assistant(c):
    return {"role": "assistant", "content": c}


@pytest.mark.parametrize("user_key,answer_key", PAIR_KEYS)
def test_every_pair_format_with_and_without_system(user_key, answer_key):
    assert normalize_record({user_key: "Q", answer_key: "A"}) == {"messages": [user("Q"), assistant("A")], "text": None}
    with_system = normalize_record({"system": "S", user_key: "Q", answer_key: "A", "id": 7})
    assert with_system["messages"] == [{"role": "system", "content": "S"}, user("Q"), assistant("A")]


def test_pair_formats_are_detected_in_mftcoder_order():
    # prompt/answer comes before input/output: a record with both is read as prompt/answer.
    rec = normalize_record({"input": "I", "output": "O", "prompt": "P", "answer": "A"})
    assert rec["messages"] == [user("P"), assistant("A")]


def test_chat_rounds_with_role_aliases_and_multiple_rounds():
    rec = normalize_record(
        {
            "chat_rounds": [
                {"role": "system", "content": "S"},
                {"role": "human", "content": "q1"},
                {"role": "bot", "content": "a1"},
                {"role": "user", "content": "q2"},
                {"role": "gpt", "content": "a2"},
                {"role": "User", "content": "q3"},
                {"role": "assistant", "content": "a3"},
            ]
        }
    )
    assert [m["role"] for m in rec["messages"]] == ["system"] + ["user", "assistant"] * 3
    assert rec["text"] is None


def test_text_record_and_empty_chat_rounds_falls_back_to_text():
    assert normalize_record({"text": "def f(): pass"}) == {"messages": [], "text": "def f(): pass"}
    assert normalize_record({"chat_rounds": [], "text": "t"})["text"] == "t"


def test_null_or_empty_system_means_no_system_turn():
    for system in (None, ""):
        assert normalize_record({"system": system, "prompt": "P", "answer": "A"})["messages"] == [user("P"), assistant("A")]


def rounds(*turns):
    return {"chat_rounds": [{"role": r, "content": c} for r, c in turns]}


REJECTS = {
    "invalid_utf8": b'{"text": "caf\xe9"}',
    "bad_json": b'{"text": "unterminated',
    "not_object": b"[1, 2]",
    "unknown_shape": b'{"foo": "bar"}',
    "bad_chat_rounds": json.dumps({"chat_rounds": [{"role": "human"}]}).encode(),
    "unknown_role": json.dumps(rounds(("human", "q"), ("robot", "a"))).encode(),
    "system_not_first": json.dumps(rounds(("human", "q"), ("system", "s"), ("bot", "a"))).encode(),
    "bad_alternation": json.dumps(rounds(("human", "q"), ("human", "q2"), ("bot", "a"))).encode(),
    "no_final_assistant": json.dumps(rounds(("human", "q"), ("bot", "a"), ("human", "q2"))).encode(),
    "empty_content": json.dumps(rounds(("human", "   "), ("bot", "a"))).encode(),
    "non_string_content": json.dumps({"prompt": "p", "answer": 42}).encode(),
    "nul_character": json.dumps({"text": "a\u0000b"}).encode(),
}


def test_every_reject_reason_is_covered_here():
    assert set(REJECTS) == set(REJECT_FIXES)


@pytest.mark.parametrize("reason", sorted(REJECTS))
def test_each_reject_reason(reason):
    with pytest.raises(RecordError) as info:
        parse_line(REJECTS[reason])
    assert info.value.reason == reason
    assert info.value.detail


def test_chat_rounds_that_is_not_a_list_and_only_system():
    with pytest.raises(RecordError, match="bad_chat_rounds"):
        normalize_record({"chat_rounds": "hello"})
    with pytest.raises(RecordError, match="no_final_assistant"):
        normalize_record(rounds(("system", "s")))
    with pytest.raises(RecordError, match="bad_alternation"):
        normalize_record(rounds(("system", "s"), ("bot", "a")))
