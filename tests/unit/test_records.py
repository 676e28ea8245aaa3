"""Every record shape ingest accepts, and every reason it rejects one."""

import json
from pathlib import Path

import pytest

from mft_core.data.records import PAIR_KEYS, REJECT_FIXES, RecordError, normalize_preference, normalize_record, parse_line


def user(c):
    return {"role": "user", "content": c}


def assistant(c):
    return {"role": "assistant", "content": c}


@pytest.mark.parametrize("user_key,answer_key", PAIR_KEYS)
def test_every_pair_format_with_and_without_system(user_key, answer_key):
    assert normalize_record({user_key: "Q", answer_key: "A"}) == {
        "shape": "pair", "messages": [user("Q"), assistant("A")], "text": None}
    with_system = normalize_record({"system": "S", user_key: "Q", answer_key: "A", "id": 7})
    assert with_system["messages"] == [{"role": "system", "content": "S"}, user("Q"), assistant("A")]
    assert with_system["shape"] == "pair"  # tokenized as MFTCoder tokenizes pairs, not as a chat


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
    assert rec["text"] is None and rec["shape"] == "chat"


def test_text_record_and_empty_chat_rounds_falls_back_to_text():
    assert normalize_record({"text": "def f(): pass"}) == {"shape": "text", "messages": [], "text": "def f(): pass"}
    assert normalize_record({"chat_rounds": [], "text": "t"})["shape"] == "text"


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
    # valid JSON, but "\ud800" decodes to half of a UTF-16 pair: no character, not writable as UTF-8
    "lone_surrogate": b'{"prompt": "p", "answer": "a\\ud800b"}',
    # json.loads raises RecursionError on this (about 1,000 levels is its limit)
    "too_deeply_nested": b'{"text": "t", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}

def conversation(*answers_and_question):
    *question, answer = answers_and_question
    return [user(q) for q in question] + [assistant(answer)]


# Reasons of preference tasks (data.tasks[].kind: preference), found by normalize_preference.
PREFERENCE_REJECTS = {
    "not_a_preference_pair": json.dumps({"prompt": "p", "answer": "a"}).encode(),
    "pair_prefix_differs": json.dumps({"chosen": conversation("q1", "yes"), "rejected": conversation("q2", "no")}).encode(),
    "identical_answers": json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}).encode(),
}

# Reasons that are about a whole file, not one line: parse_line cannot see them, so they are
# tested on real files in test_ingest.py (by these tests).
FILE_REJECTS = {
    "corrupt_file": "test_damaged_compressed_or_parquet_file_is_a_located_reject",
    "json_array": "test_a_json_array_file_is_named_as_such",
}


def test_every_reject_reason_is_covered_here():
    assert set(REJECTS) | set(FILE_REJECTS) | set(PREFERENCE_REJECTS) == set(REJECT_FIXES)
    assert not set(REJECTS) & set(FILE_REJECTS)
    test_ingest = (Path(__file__).parent / "test_ingest.py").read_text()
    for test_name in FILE_REJECTS.values():
        assert f"def {test_name}(" in test_ingest


@pytest.mark.parametrize("reason", sorted(REJECTS))
def test_each_reject_reason(reason):
    with pytest.raises(RecordError) as info:
        parse_line(REJECTS[reason])
    assert info.value.reason == reason
    assert info.value.detail


@pytest.mark.parametrize("reason", sorted(PREFERENCE_REJECTS))
def test_each_preference_reject_reason(reason):
    with pytest.raises(RecordError) as info:
        parse_line(PREFERENCE_REJECTS[reason], normalize_preference)
    assert info.value.reason == reason
    assert info.value.detail


def test_preference_records_in_both_forms_share_one_canonical_form():
    """MFTCoder's two conversations and the flat prompt/chosen/rejected (string or one assistant
    turn, with an optional system) give the same record: the shared turns, then the two answers."""
    expected = {"shape": "preference", "messages": [{"role": "system", "content": "S"}, user("q")],
                "text": None, "chosen": "yes", "rejected": "no"}
    system = [{"role": "system", "content": "S"}]
    assert normalize_preference({"chosen": system + conversation("q", "yes"),
                                 "rejected": system + conversation("q", "no")}) == expected
    assert normalize_preference({"system": "S", "prompt": "q", "chosen": "yes", "rejected": "no"}) == expected
    assert normalize_preference({"prompt": system + [user("q")], "chosen": [assistant("yes")],
                                 "rejected": [assistant("no")]}) == expected
    multi = normalize_preference({"chosen": [user("q1"), assistant("a1"), user("q2"), assistant("yes")],
                                  "rejected": [{"role": "human", "content": "q1"}, {"role": "bot", "content": "a1"},
                                               {"role": "human", "content": "q2"}, {"role": "bot", "content": "no"}]})
    assert multi["messages"] == [user("q1"), assistant("a1"), user("q2")] and multi["chosen"] == "yes"


def test_a_preference_pair_in_a_fine_tuning_task_says_which_setting_is_missing():
    with pytest.raises(RecordError, match="kind: preference"):
        normalize_record({"prompt": "p", "chosen": "a", "rejected": "b"})


def test_chat_rounds_that_is_not_a_list_and_only_system():
    with pytest.raises(RecordError, match="bad_chat_rounds"):
        normalize_record({"chat_rounds": "hello"})
    with pytest.raises(RecordError, match="no_final_assistant"):
        normalize_record(rounds(("system", "s")))
    with pytest.raises(RecordError, match="bad_alternation"):
        normalize_record(rounds(("system", "s"), ("bot", "a")))


PYTHON_TYPE_NAMES = ("NoneType", "dict", "list", "int", "float", "bool", "str", "tuple", "True", "False", "None")


@pytest.mark.parametrize(
    "obj,json_name",
    [
        (None, "null"),
        ([1], "array"),
        ("s", "string"),
        (3, "number"),
        ({"prompt": "p", "answer": 42}, "number"),
        ({"prompt": "p", "answer": 1.5}, "number"),
        ({"text": True}, "boolean"),
        ({"text": None}, "null"),
        ({"text": ["a"]}, "array"),
        ({"text": {"a": "b"}}, "object"),
        ({"chat_rounds": "hello"}, "string"),
        ({"chat_rounds": {"role": "human"}}, "object"),
        ({"chat_rounds": ["hi"]}, "string"),
        ({"chat_rounds": [{"role": None, "content": "q"}]}, "null"),
        ({"chat_rounds": [{"role": True, "content": "q"}]}, "true"),
        ({"chat_rounds": [{"role": "human", "content": "q"}, {"role": "bot", "content": None}]}, "null"),
    ],
)
def test_messages_name_json_types_not_python_types(obj, json_name):
    with pytest.raises(RecordError) as info:
        normalize_record(obj)
    words = str(info.value).replace("(", " ").replace(")", " ").replace(",", " ").split()
    assert json_name in words, str(info.value)
    assert not set(words) & set(PYTHON_TYPE_NAMES), str(info.value)


def test_messages_never_carry_a_lone_surrogate():
    # Details are printed and written to rejects.jsonl as UTF-8: a key or role holding "\ud800"
    # must come out escaped, not crash the writer.
    for obj in ({"\ud800": "x"}, {"chat_rounds": [{"role": "\ud800", "content": "q"}]}):
        with pytest.raises(RecordError) as info:
            normalize_record(obj)
        str(info.value).encode("utf-8")
        assert "\\ud800" in str(info.value)


def test_fix_hints_speak_json():
    for reason, fix in REJECT_FIXES.items():
        assert not set(fix.replace(",", " ").split()) & {"list", "dict", "NoneType"}, (reason, fix)
