"""Rendering canonical records into ids + loss masks (mft_core.data.render)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mft_core.data.render import (
    FitStatus,
    MFTCoderTemplate,
    RenderedSample,
    TokenizerChatTemplate,
    fit_to_length,
    generation_chat_template,
    make_template,
    render_prompt,
    render_record,
    render_records,
)
from mft_core.modeling import tokenizer_content_hash

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "smollm2_render.json"

SYSTEM = {"role": "system", "content": "You write Python."}
Q1 = {"role": "user", "content": "Add two numbers."}
A1 = {"role": "assistant", "content": "def add(a, b):\n    return a + b"}
Q2 = {"role": "user", "content": "Now subtract."}
A2 = {"role": "assistant", "content": "def sub(a, b):\n    return a - b"}
INDENTED = {"role": "assistant", "content": "    return a - b"}


def chat(*messages, source="data/t2c.jsonl:7"):
    return {"task": "t2c", "messages": list(messages), "text": None, "source": source}


def text_record(text, source="data/pre.jsonl:1"):
    return {"task": "pre", "messages": [], "text": text, "source": source}


def enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def trained_text(tokenizer, sample: RenderedSample) -> str:
    return tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m])


def prompt_part(sample: RenderedSample) -> list[int]:
    """Training ids before the last answer (the start of the last run of trained tokens)."""
    start = max(i for i, m in enumerate(sample.loss_mask) if m)
    while start > 0 and sample.loss_mask[start - 1]:
        start -= 1
    return sample.input_ids[:start]


@pytest.fixture
def own_tokenizer(tiny_tokenizer_dir):
    """A private copy of the tiny tokenizer whose chat template a test may replace."""
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


# ----------------------------------------------------------------------------- mftcoder, tiny BPE


def test_system_and_one_round_is_mftcoder_piecewise_rendering(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    sample = render_record(chat(SYSTEM, Q1, A1), tiny_tokenizer, MFTCoderTemplate())

    system = enc(tiny_tokenizer, "<s>system\nYou write Python.\n")
    user = enc(tiny_tokenizer, "<s>human\nAdd two numbers.\n<s>bot\n")
    answer = enc(tiny_tokenizer, "def add(a, b):\n    return a + b\n") + [eos]
    after = enc(tiny_tokenizer, "\n")
    assert sample.input_ids == system + user + answer + after
    assert sample.loss_mask == [0] * len(system + user) + [1] * len(answer) + [0] * len(after)
    assert sample.round_ends == [len(sample.input_ids)]
    assert tiny_tokenizer.decode(sample.input_ids) == (
        "<s>system\nYou write Python.\n<s>human\nAdd two numbers.\n<s>bot\n"
        "def add(a, b):\n    return a + b\n<|im_end|>\n"
    )
    assert trained_text(tiny_tokenizer, sample) == "def add(a, b):\n    return a + b\n<|im_end|>"


def test_two_rounds_train_every_answer_and_mark_round_ends(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    sample = render_record(chat(SYSTEM, Q1, A1, Q2, A2), tiny_tokenizer, MFTCoderTemplate())

    round_one = (
        enc(tiny_tokenizer, "<s>system\nYou write Python.\n")
        + enc(tiny_tokenizer, "<s>human\nAdd two numbers.\n<s>bot\n")
        + enc(tiny_tokenizer, A1["content"] + "\n") + [eos]
        + enc(tiny_tokenizer, "\n")
    )
    round_two = (
        enc(tiny_tokenizer, "<s>human\nNow subtract.\n<s>bot\n")
        + enc(tiny_tokenizer, A2["content"] + "\n") + [eos]
        + enc(tiny_tokenizer, "\n")
    )
    assert sample.input_ids == round_one + round_two
    assert sample.round_ends == [len(round_one), len(round_one) + len(round_two)]
    assert trained_text(tiny_tokenizer, sample) == (
        "def add(a, b):\n    return a + b\n<|im_end|>def sub(a, b):\n    return a - b\n<|im_end|>"
    )
    # Both answers are trained, with their EOS; the "\n" after each EOS is not.
    assert sample.num_trained == len(enc(tiny_tokenizer, A1["content"] + "\n")) + len(
        enc(tiny_tokenizer, A2["content"] + "\n")
    ) + 2


def test_record_without_system_starts_with_the_user_marker(tiny_tokenizer):
    sample = render_record(chat(Q1, A1), tiny_tokenizer, MFTCoderTemplate())
    user = enc(tiny_tokenizer, "<s>human\nAdd two numbers.\n<s>bot\n")
    assert sample.input_ids[: len(user)] == user
    assert sample.loss_mask[: len(user)] == [0] * len(user)
    assert tiny_tokenizer.decode(sample.input_ids) == (
        "<s>human\nAdd two numbers.\n<s>bot\ndef add(a, b):\n    return a + b\n<|im_end|>\n"
    )


def pair(*messages, source="data/pairs.jsonl:3"):
    return {"task": "t2c", "shape": "pair", "messages": list(messages), "text": None, "source": source}


@pytest.mark.parametrize("system", [None, "You write Python.", "You write Python.\n"])
def test_pair_record_is_one_prompt_piece_then_the_answer_and_nothing_after_eos(tiny_tokenizer, system):
    """MFTCoder's pair branch: system, user marker, prompt and assistant marker in one tokenizer
    call (a system ending in whitespace merges with the marker after it), then answer + EOS, and
    no "\n" after the EOS (that one belongs to chat records only)."""
    eos = tiny_tokenizer.eos_token_id
    messages = ([{"role": "system", "content": system}] if system else []) + [Q1, A1]
    sample = render_record(pair(*messages), tiny_tokenizer, MFTCoderTemplate())
    head = f"<s>system\n{system}\n" if system else ""
    prompt = enc(tiny_tokenizer, head + "<s>human\nAdd two numbers.\n<s>bot\n")
    answer = enc(tiny_tokenizer, "def add(a, b):\n    return a + b\n") + [eos]
    assert sample.input_ids == prompt + answer
    assert sample.loss_mask == [0] * len(prompt) + [1] * len(answer)
    assert sample.round_ends == [len(sample.input_ids)]
    as_chat = render_record(chat(*messages), tiny_tokenizer, MFTCoderTemplate())
    assert as_chat.input_ids[-1:] == enc(tiny_tokenizer, "\n") and sample.input_ids[-1] == eos


def test_pair_system_marker_is_normalised_with_the_system_text(tiny_tokenizer):
    """MFTCoder applies content_format to system_marker + system in a pair record (only to the
    content in a chat record): a no-break space in a custom system marker becomes a space."""
    markers = {"system": "###\u00a0System:\n", "user": "### User:\n", "assistant": "### Bot:\n"}
    template = make_template("mftcoder", markers)
    system = {"role": "system", "content": "S"}
    as_pair = render_record(pair(system, Q1, A1), tiny_tokenizer, template)
    as_chat = render_record(chat(system, Q1, A1), tiny_tokenizer, template)
    assert tiny_tokenizer.decode(as_pair.input_ids).startswith("### System:\nS\n### User:")
    assert tiny_tokenizer.decode(as_chat.input_ids).startswith("###\u00a0System:\nS\n### User:")


def test_pair_record_must_be_one_round(tiny_tokenizer):
    with pytest.raises(ValueError, match="pairs.jsonl:3: a pair record is one user and one assistant message"):
        render_record(pair(Q1, A1, Q2, A2), tiny_tokenizer, MFTCoderTemplate())
    with pytest.raises(ValueError, match="shape 'table' is not one of chat, pair, text"):
        render_record(dict(pair(Q1, A1), shape="table"), tiny_tokenizer, MFTCoderTemplate())


def test_text_record_trains_every_token_including_eos(tiny_tokenizer):
    sample = render_record(text_record("import os\nprint(os.sep)"), tiny_tokenizer, MFTCoderTemplate())
    assert sample.input_ids == enc(tiny_tokenizer, "import os\nprint(os.sep)\n") + [tiny_tokenizer.eos_token_id]
    assert sample.loss_mask == [1] * len(sample.input_ids)
    assert sample.round_ends == [len(sample.input_ids)]


def test_content_no_break_spaces_become_spaces(tiny_tokenizer):
    with_nbsp = render_record(
        chat({"role": "user", "content": "a\u00a0b"}, {"role": "assistant", "content": "x\u202fy"}),
        tiny_tokenizer, MFTCoderTemplate(),
    )
    plain = render_record(
        chat({"role": "user", "content": "a b"}, {"role": "assistant", "content": "x y"}),
        tiny_tokenizer, MFTCoderTemplate(),
    )
    assert with_nbsp == plain


def test_custom_role_markers_replace_the_defaults(tiny_tokenizer):
    markers = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
    sample = render_record(chat(SYSTEM, Q1, A1), tiny_tokenizer, make_template("mftcoder", markers))
    assert tiny_tokenizer.decode(sample.input_ids) == (
        "### System:\nYou write Python.\n### Instruction:\nAdd two numbers.\n### Response:\n"
        "def add(a, b):\n    return a + b\n<|im_end|>\n"
    )
    assert trained_text(tiny_tokenizer, sample) == "def add(a, b):\n    return a + b\n<|im_end|>"


def test_explicit_eos_id_overrides_the_tokenizer_eos(tiny_tokenizer):
    sample = render_record(chat(Q1, A1), tiny_tokenizer, MFTCoderTemplate(), eos_id=0)
    assert 0 in sample.input_ids and tiny_tokenizer.eos_token_id not in sample.input_ids


def test_batch_rendering_equals_one_record_at_a_time(tiny_tokenizer):
    records = [chat(SYSTEM, Q1, A1), text_record("x = 1"), chat(Q1, A1, Q2, INDENTED), chat(Q2, A2)]
    template = MFTCoderTemplate()
    assert render_records(records, tiny_tokenizer, template) == [
        render_record(record, tiny_tokenizer, template) for record in records
    ]


@pytest.mark.parametrize(
    "record, message",
    [
        (chat(Q1, {"role": "bot", "content": "x"}), "role 'bot'"),
        (chat(Q1, Q2, A1), "must alternate"),
        (chat(A1), "must alternate"),
        (chat(Q1, A1, SYSTEM, Q2, A2), "must alternate"),
        (chat(SYSTEM, Q1), "must end with an assistant"),
        (chat(SYSTEM), "must end with an assistant"),
        (chat(Q1, {"role": "assistant", "content": None}), "content must be a string"),
        ({"task": "t", "messages": [Q1, A1], "text": "both", "source": "data/t2c.jsonl:7"}, "not both"),
        ({"task": "t", "messages": [], "text": None, "source": "data/t2c.jsonl:7"}, "neither messages nor text"),
    ],
)
def test_invalid_records_raise_naming_their_source(tiny_tokenizer, record, message):
    for template in (MFTCoderTemplate(), TokenizerChatTemplate()):
        with pytest.raises(ValueError, match=message) as error:
            render_record(record, tiny_tokenizer, template)
        assert "data/t2c.jsonl:7" in str(error.value)


def test_make_template_validates_its_inputs():
    assert make_template() == MFTCoderTemplate()
    assert make_template("chat_template") == TokenizerChatTemplate()
    with pytest.raises(ValueError, match="unknown template 'alpaca'"):
        make_template("alpaca")
    with pytest.raises(ValueError, match="missing: \\['system'\\]"):
        make_template("mftcoder", {"user": "U:", "assistant": "A:"})
    with pytest.raises(ValueError, match="unknown: \\['tool'\\]"):
        make_template("mftcoder", {"system": "S:", "user": "U:", "assistant": "A:", "tool": "T:"})
    with pytest.raises(ValueError, match="only apply to the 'mftcoder' template"):
        make_template("chat_template", {"system": "S:", "user": "U:", "assistant": "A:"})


# ----------------------------------------------------------------------------- over-length policy


def test_fit_keeps_samples_that_fit(tiny_tokenizer):
    sample = render_record(chat(Q1, A1), tiny_tokenizer, MFTCoderTemplate())
    assert fit_to_length(sample, len(sample), "drop") == (sample, FitStatus.KEPT)
    assert fit_to_length(sample, len(sample), "truncate") == (sample, FitStatus.KEPT)


def test_fit_drop_policy_drops_over_length_samples(tiny_tokenizer):
    sample = render_record(chat(Q1, A1), tiny_tokenizer, MFTCoderTemplate())
    assert fit_to_length(sample, len(sample) - 1, "drop") == (None, FitStatus.DROPPED)


def test_truncate_keeps_whole_earlier_rounds(tiny_tokenizer):
    sample = render_record(chat(SYSTEM, Q1, A1, Q2, A2), tiny_tokenizer, MFTCoderTemplate())
    first_round = render_record(chat(SYSTEM, Q1, A1), tiny_tokenizer, MFTCoderTemplate())
    fitted, status = fit_to_length(sample, len(sample) - 1, "truncate")
    assert status is FitStatus.TRUNCATED
    assert fitted == first_round  # ids, mask and round ends of round one exactly


def test_truncate_cuts_inside_the_first_answer_keeping_trained_tokens(tiny_tokenizer):
    sample = render_record(chat(SYSTEM, Q1, A1, Q2, A2), tiny_tokenizer, MFTCoderTemplate())
    prompt_length = sample.loss_mask.index(1)
    fitted, status = fit_to_length(sample, prompt_length + 2, "truncate")
    assert status is FitStatus.TRUNCATED
    assert fitted.input_ids == sample.input_ids[: prompt_length + 2]
    assert fitted.loss_mask == [0] * prompt_length + [1, 1]
    assert fitted.round_ends == [prompt_length + 2]


def test_truncate_drops_when_no_trained_token_fits(tiny_tokenizer):
    sample = render_record(chat(SYSTEM, Q1, A1), tiny_tokenizer, MFTCoderTemplate())
    prompt_length = sample.loss_mask.index(1)
    assert fit_to_length(sample, prompt_length, "truncate") == (None, FitStatus.DROPPED)


def test_truncated_text_record_keeps_its_head(tiny_tokenizer):
    sample = render_record(text_record("def f():\n    return 1\n" * 20), tiny_tokenizer, MFTCoderTemplate())
    fitted, status = fit_to_length(sample, 16, "truncate")
    assert status is FitStatus.TRUNCATED
    assert fitted.input_ids == sample.input_ids[:16] and fitted.loss_mask == [1] * 16


def test_fit_rejects_bad_arguments(tiny_tokenizer):
    sample = render_record(chat(Q1, A1), tiny_tokenizer, MFTCoderTemplate())
    with pytest.raises(ValueError, match="unknown over-length policy 'cut'"):
        fit_to_length(sample, 8, "cut")
    with pytest.raises(ValueError, match="at least 2"):
        fit_to_length(sample, 1, "truncate")


# ----------------------------------------------------------------------------- generation template


TRICKY_MARKERS = {
    "system": 'Sys "quoted" \\ {{ not jinja }} %}:\n',
    "user": "Użytkownik 👤:\n",
    "assistant": "\nAssistant:\t",
}


@pytest.mark.parametrize(
    "messages, markers",
    [
        ([SYSTEM, Q1, A1], None),
        ([Q1, A1], None),
        ([SYSTEM, Q1, A1, Q2, A2], None),
        ([SYSTEM, {"role": "user", "content": "a\u00a0b\u202fc"}, A1], None),
        ([SYSTEM, Q1, A1, Q2, A2], {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}),
        ([SYSTEM, Q1, A1, Q2, A2], TRICKY_MARKERS),
    ],
)
def test_generation_template_reproduces_the_training_prompt(own_tokenizer, messages, markers):
    template = make_template("mftcoder", markers)
    sample = render_record(chat(*messages), own_tokenizer, template)
    own_tokenizer.chat_template = generation_chat_template(template, own_tokenizer.eos_token)

    prompt = own_tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert prompt == prompt_part(sample)
    assert prompt == render_prompt(messages[:-1], own_tokenizer, template)
    # The whole conversation renders to the training text too.
    assert own_tokenizer.apply_chat_template(messages, tokenize=False) == own_tokenizer.decode(sample.input_ids)


def test_generation_template_survives_save_and_reload(own_tokenizer, tmp_path):
    template = MFTCoderTemplate()
    own_tokenizer.chat_template = generation_chat_template(template, own_tokenizer.eos_token)
    own_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    prompt = reloaded.apply_chat_template([SYSTEM, Q1], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompt == render_prompt([SYSTEM, Q1], own_tokenizer, template)


def test_generation_template_rejects_broken_conversations(own_tokenizer):
    own_tokenizer.chat_template = generation_chat_template(MFTCoderTemplate(), own_tokenizer.eos_token)
    with pytest.raises(Exception, match="alternate"):
        own_tokenizer.apply_chat_template([Q1, Q2], tokenize=False)
    with pytest.raises(Exception, match="only allowed first"):
        own_tokenizer.apply_chat_template([Q1, A1, SYSTEM], tokenize=False)
    with pytest.raises(Exception, match="unsupported role tool"):
        own_tokenizer.apply_chat_template([Q1, {"role": "tool", "content": "x"}], tokenize=False)


def test_generation_template_is_only_for_the_mftcoder_template():
    with pytest.raises(ValueError, match="already uses the tokenizer's own chat template"):
        generation_chat_template(TokenizerChatTemplate(), "<|im_end|>")


def test_render_prompt_needs_a_final_user_turn(tiny_tokenizer):
    with pytest.raises(ValueError, match="ends with a user message"):
        render_prompt([Q1, A1], tiny_tokenizer, MFTCoderTemplate())


# ----------------------------------------------------------------------------- chat_template, tiny BPE


def test_chat_template_trains_answers_and_their_end_token_only(tiny_tokenizer):
    sample = render_record(chat(SYSTEM, Q1, A1, Q2, A2), tiny_tokenizer, TokenizerChatTemplate())
    rendered = tiny_tokenizer.apply_chat_template([SYSTEM, Q1, A1, Q2, A2], tokenize=False)
    assert sample.input_ids == enc(tiny_tokenizer, rendered)
    assert trained_text(tiny_tokenizer, sample) == (
        "def add(a, b):\n    return a + b<|im_end|>def sub(a, b):\n    return a - b<|im_end|>"
    )
    # Round one ends after its "<|im_end|>\n"; its ids are the rendering of the first round.
    first_round = tiny_tokenizer.apply_chat_template([SYSTEM, Q1, A1], tokenize=False)
    assert sample.round_ends == [len(enc(tiny_tokenizer, first_round)), len(sample)]


def test_chat_template_never_trains_a_token_that_holds_prompt_text(tiny_tokenizer):
    # The byte-level BPE may merge the generation prompt's "\n" with the answer's indent.
    sample = render_record(chat(Q1, INDENTED), tiny_tokenizer, TokenizerChatTemplate())
    trained = trained_text(tiny_tokenizer, sample)
    assert trained.endswith("return a - b<|im_end|>")
    assert "\n" not in trained
    assert (INDENTED["content"] + "<|im_end|>").endswith(trained)


def test_chat_template_generation_blocks_give_the_same_masks(own_tokenizer, tiny_tokenizer):
    messages = [SYSTEM, Q1, A1, Q2, INDENTED]
    own_tokenizer.chat_template = (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endif %}{% endfor %}"
    )
    with_blocks = render_record(chat(*messages), own_tokenizer, TokenizerChatTemplate())
    plain = render_record(chat(*messages), tiny_tokenizer, TokenizerChatTemplate())
    assert with_blocks.input_ids == plain.input_ids
    assert with_blocks.loss_mask == plain.loss_mask


def test_chat_template_that_rewrites_content_is_an_error(own_tokenizer):
    own_tokenizer.chat_template = own_tokenizer.chat_template.replace("message['content']", "message['content'] | trim")
    with pytest.raises(ValueError, match="data/t2c.jsonl:7: the chat template rewrites assistant turn 1"):
        render_record(chat(Q1, {"role": "assistant", "content": "x = 1\n"}), own_tokenizer, TokenizerChatTemplate())


def test_chat_template_that_does_not_end_turns_with_eos_is_an_error(own_tokenizer):
    own_tokenizer.chat_template = own_tokenizer.chat_template.replace("'<|im_end|>'", "'<|endoftext|>'")
    with pytest.raises(ValueError, match="does not close assistant turn 1 with the EOS token"):
        render_record(chat(Q1, A1), own_tokenizer, TokenizerChatTemplate())


def test_chat_template_mode_needs_a_chat_template(own_tokenizer):
    own_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        render_record(chat(Q1, A1), own_tokenizer, TokenizerChatTemplate())


def test_chat_template_errors_from_the_template_name_the_source(own_tokenizer):
    own_tokenizer.chat_template = "{{ raise_exception('no system role here') }}"
    with pytest.raises(ValueError, match="data/t2c.jsonl:7: the tokenizer's chat template failed.*no system role"):
        render_record(chat(SYSTEM, Q1, A1), own_tokenizer, TokenizerChatTemplate())


def test_chat_template_mode_renders_text_records_like_mftcoder(tiny_tokenizer):
    record = text_record("print('hi')")
    assert render_record(record, tiny_tokenizer, TokenizerChatTemplate()) == render_record(
        record, tiny_tokenizer, MFTCoderTemplate()
    )


# ----------------------------------------------------------------------------- SmolLM2 tokenizer


def test_smollm2_rendering_matches_the_golden_file(smollm2_tokenizer, smollm2_tokenizer_dir):
    golden = json.loads(GOLDEN.read_text())
    assert tokenizer_content_hash(smollm2_tokenizer_dir) == golden["tokenizer_content_hash"]
    assert smollm2_tokenizer.eos_token_id == golden["eos_id"] == 2
    for name, case in golden["cases"].items():
        template = make_template(case["template"], case["role_markers"])
        sample = render_record(golden["records"][case["record"]], smollm2_tokenizer, template)
        assert sample.input_ids == case["input_ids"], name
        assert sample.loss_mask == case["loss_mask"], name
        assert sample.round_ends == case["round_ends"], name
    for name, expected in golden["prompts"].items():
        case, record = name.split("/")
        markers = golden["cases"][name]["role_markers"]
        messages = golden["records"][record]["messages"][:-1]
        assert render_prompt(messages, smollm2_tokenizer, make_template("mftcoder", markers)) == expected, name
    # The golden ids say what we think they say (hand-written texts).
    one_round = golden["cases"]["mftcoder/system_one_round"]
    assert smollm2_tokenizer.decode(one_round["input_ids"]) == (
        "<s>system\nYou are a careful Python programmer.\n<s>human\nWrite a function that adds two numbers.\n"
        "<s>bot\ndef add(a, b):\n    return a + b\n<|im_end|>\n"
    )
    assert golden["cases"]["mftcoder/system_two_rounds"]["trained_text"] == (
        "def add(a, b):\n    return a + b\n<|im_end|>def sub(a, b):\n    return a - b\n<|im_end|>"
    )
    # Pair records (checked against MFTCoder's own encoder when the file was made): the system is
    # tokenized with the marker after it, so "assistant.\n" + "\n<s>human" gives "\n", "\n"
    # (198, 198) where a chat record's system piece ends in the one token "\n\n" (1116); and the
    # sample ends at its EOS, where a chat record has one more "\n".
    pair, as_chat = (golden["cases"][f"mftcoder/{name}_system_newline"]["input_ids"] for name in ("pair", "chat"))
    assert pair[9:13] == [11173, 30, 198, 198] and as_chat[9:12] == [11173, 30, 1116]
    assert pair[-1] == 2 and as_chat[-2:] == [2, 198]
    assert smollm2_tokenizer.decode(pair) + "\n" == smollm2_tokenizer.decode(as_chat)


def test_smollm2_chat_template_masks_only_answers(smollm2_tokenizer):
    sample = render_record(chat(Q1, A1, Q2, INDENTED), smollm2_tokenizer, TokenizerChatTemplate())
    decoded = smollm2_tokenizer.decode(sample.input_ids)
    # SmolLM2's ChatML template adds its default system prompt: rendered, never trained.
    assert decoded.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert trained_text(smollm2_tokenizer, sample) == (
        "def add(a, b):\n    return a + b<|im_end|> return a - b<|im_end|>"
    )  # the "\n   " token straddles the prompt's "\n" and the indent, so it is not trained
    assert decoded == smollm2_tokenizer.apply_chat_template([Q1, A1, Q2, INDENTED], tokenize=False)


def test_smollm2_generation_template_reproduces_training_prompts(smollm2_tokenizer_dir, smollm2_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    template = MFTCoderTemplate()
    tokenizer.chat_template = generation_chat_template(template, tokenizer.eos_token)
    for messages in ([SYSTEM, Q1, A1], [Q1, A1], [SYSTEM, Q1, A1, Q2, A2], [SYSTEM, Q1, INDENTED]):
        sample = render_record(chat(*messages), smollm2_tokenizer, template)
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert prompt == prompt_part(sample) == render_prompt(messages[:-1], smollm2_tokenizer, template)


def test_smollm2_render_prompt_is_exact_where_whole_string_tokenization_is_not(smollm2_tokenizer_dir, smollm2_tokenizer):
    """An earlier answer that starts with whitespace tokenizes differently glued to its marker
    (documented limit of any whole-string template); render_prompt still equals training."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    template = MFTCoderTemplate()
    tokenizer.chat_template = generation_chat_template(template, tokenizer.eos_token)
    messages = [Q1, INDENTED, Q2, A2]
    sample = render_record(chat(*messages), smollm2_tokenizer, template)
    assert render_prompt(messages[:-1], smollm2_tokenizer, template) == prompt_part(sample)
    whole = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert whole != prompt_part(sample)
    assert tokenizer.decode(whole) == smollm2_tokenizer.decode(prompt_part(sample))
