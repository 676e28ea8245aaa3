"""HumanEval-X generation: prompts, chat-answer extraction, stop rules, batching, seeded sampling,
the resumable generations file. Real generation on tiny Llamas (no mocks):

- `lively_llama_dir`: a random tiny Llama with large initial weights and an untied head, so its
  greedy output is varied text rather than one repeated token (the conftest model repeats the
  prompt's last token, which exercises nothing);
- `memorizing_llama_folder`: the tiny Llama trained in-test (~10 s once, cached across sessions in
  the test cache) to answer five HumanEval-X problems, one per language, with the canonical
  solution followed by text the stop rules must cut; in chat mode with a fenced answer that repeats
  the signature. Slow tests only. test_eval_stage.py imports it for the end-to-end check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from eval_testing import requires_humaneval_x
from mft_core.data.render import TokenizerChatTemplate, generation_chat_template, make_template, render_prompt
from mft_core.eval.assemble import generation_is_complete, truncate_generation
from mft_core.eval.generate import (CHAT_INSTRUCTION, GenerationSettings, SeededSampling, StopWhenComplete, WorkItem,
                                    chat_answer_is_complete, completion_from_output, extract_chat_completion,
                                    generate_batch, generate_to_file, load_generation_model, output_is_complete,
                                    prompt_function_name, read_generations, render_prompt_for, sample_seed,
                                    split_fenced_code)
from mft_core.eval.problems import LANGUAGES, Problem, load_problems, select_problems

MFTCODER = make_template("mftcoder")


def problem(language: str, prompt: str, task_id: str | None = None) -> Problem:
    prefix = {"python": "Python", "cpp": "CPP", "java": "Java", "js": "JavaScript", "go": "Go"}[language]
    return Problem(task_id=task_id or f"{prefix}/0", language=language, prompt=prompt, canonical_solution="", test="")


# ----------------------------------------------------------------------------- tiny models


def save_llama(folder: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    settings.update(overrides)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**settings)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def lively_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_llama(tmp_path_factory.mktemp("lively_llama"), tiny_tokenizer, seed=2,
                      tie_word_embeddings=False, initializer_range=0.2)


@pytest.fixture(scope="module")
def lively(lively_llama_dir):
    return load_generation_model(lively_llama_dir, "fp32")


MEMORIZED_TASKS = ("Python/2", "CPP/2", "Java/2", "JavaScript/2", "Go/2")
# What each memorized completion goes on with after the canonical solution: text to be cut.
TRAILING_TEXT = {
    "python": "\n\ndef check(candidate):\n    assert candidate(3.5) == 0.5\n",
    "cpp": "\nint main(){\n    return 0;\n}\n",
    "java": "\npublic class Main {\n}\n",
    "js": "\nconsole.log(truncateNumber(3.5))\nconsole.log(truncateNumber(1.25))\n",
    "go": "\nfunc main() {\n}\n",
}
FENCE_TAGS = {"python": "python", "cpp": "cpp", "java": "java", "js": "javascript", "go": "go"}
MEMORIZER_VERSION = 1


def declaration_line(p: Problem) -> str:
    """The prompt's line that declares the function to complete (`def name(`, or `name` ... `{`)."""
    name = prompt_function_name(p)
    if p.language == "python":
        return re.findall(rf"^def {name}\(.*$", p.prompt, re.MULTILINE)[-1]
    return [line for line in p.prompt.splitlines() if name in line and line.rstrip().endswith("{")][-1].strip()


def memorized_answers(p: Problem) -> dict[str, str]:
    """The answer taught per prompt mode: a continuation running on, and a fenced chat answer."""
    chat = (f"Here is the function:\n```{FENCE_TAGS[p.language]}\n{declaration_line(p)}\n"
            f"{p.canonical_solution.rstrip()}\n```\nIt returns the decimal part.")
    return {"completion": p.canonical_solution + TRAILING_TEXT[p.language], "chat": chat}


def memorizing_llama_folder(cache_root: Path, base_dir: Path) -> Path:
    """The tiny Llama of `base_dir` trained until it reproduces `memorized_answers` token for token
    (teacher-forced argmax on every answer token), saved with a chat template that renders the
    mftcoder prompt and the tokenize stage's template.json beside it. Cached by content."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mft_core.modeling import build_folder_once, tokenizer_content_hash

    problems = select_problems(task_ids=list(MEMORIZED_TASKS))
    key = hashlib.sha256(json.dumps([MEMORIZER_VERSION, torch.__version__, tokenizer_content_hash(base_dir),
                                     [memorized_answers(p) for p in problems]]).encode()).hexdigest()[:16]

    def train(out: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        eos = tokenizer.eos_token_id
        rows = []
        for p in problems:
            answers = memorized_answers(p)
            for mode in ("completion", "chat"):
                prompt = render_prompt_for(p, mode, tokenizer, MFTCODER, eos).ids
                answer = tokenizer(answers[mode], add_special_tokens=False)["input_ids"]
                rows.append((prompt, answer + ([eos] if mode == "chat" else [])))
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((len(rows), width), eos)
        labels = torch.full((len(rows), width), -100)
        for row, (prompt, answer) in enumerate(rows):
            ids[row, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            labels[row, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        model.train()
        for step in range(400):
            output = model(input_ids=ids, labels=labels)  # right padding: no mask needed for a causal LM
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
            if step % 5 == 4:
                trained = labels[:, 1:] != -100
                if bool((output.logits[:, :-1].argmax(-1)[trained] == labels[:, 1:][trained]).all()):
                    break
        else:
            raise AssertionError("the tiny Llama did not memorize the answers in 400 steps")
        model.save_pretrained(out)
        tokenizer.chat_template = generation_chat_template(MFTCODER, tokenizer.eos_token)
        tokenizer.save_pretrained(out)
        (out / "template.json").write_text(json.dumps({
            "template": "mftcoder", "role_markers": {"system_marker": MFTCODER.system_marker,
                                                     "user_marker": MFTCODER.user_marker,
                                                     "assistant_marker": MFTCODER.assistant_marker},
            "eos_id": eos, "pad_id": eos}))

    return build_folder_once(cache_root / "eval-memorizing-llama" / key, train, {"kind": "test model"})


# ----------------------------------------------------------------------------- prompts


def test_completion_prompt_is_the_raw_prompt(tiny_tokenizer):
    p = problem("python", "def f(x):\n    \"\"\"Double x.\"\"\"\n")
    rendered = render_prompt_for(p, "completion", tiny_tokenizer)
    assert rendered.ids == tiny_tokenizer(p.prompt)["input_ids"]
    assert rendered.text == tiny_tokenizer.decode(rendered.ids, skip_special_tokens=False)


def test_chat_prompt_is_the_training_rendering(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    p = problem("go", "func Double(x int) int {\n")
    rendered = render_prompt_for(p, "chat", tokenizer, MFTCODER, tokenizer.eos_token_id)
    instruction = CHAT_INSTRUCTION.format(language="Go", prompt=p.prompt)
    assert instruction == "Complete the following Go code.\n\nfunc Double(x int) int {\n"
    assert rendered.ids == render_prompt([{"role": "user", "content": instruction}], tokenizer, MFTCODER)
    assert rendered.text == f"<s>human\n{instruction}\n<s>bot\n"
    # The merged model's tokenizer carries a chat template that reproduces it token for token.
    tokenizer.chat_template = generation_chat_template(MFTCODER, tokenizer.eos_token)
    via_template = render_prompt_for(p, "chat", tokenizer, TokenizerChatTemplate())
    assert via_template.ids == rendered.ids


def test_prompt_errors_are_clear(tiny_tokenizer):
    p = problem("python", "def f():\n")
    with pytest.raises(ValueError, match="unknown prompt mode 'instruct'"):
        render_prompt_for(p, "instruct", tiny_tokenizer)
    with pytest.raises(ValueError, match="chat prompts need the training template"):
        render_prompt_for(p, "chat", tiny_tokenizer)
    with pytest.raises(ValueError, match="temperature 0 is greedy"):
        GenerationSettings(samples_per_problem=2, temperature=0)


# ----------------------------------------------------------------------------- chat answers

PY_PROMPT = 'from typing import List\n\n\ndef below_zero(operations: List[int]) -> bool:\n    """ Is the sum ever below zero?\n    >>> below_zero([1, -2])\n    True\n    """\n'
PY_BODY = "    balance = 0\n    for op in operations:\n        balance += op\n        if balance < 0:\n            return True\n    return False\n"


@pytest.mark.parametrize("answer, complete", [
    (PY_BODY, False),  # the training format: a verbatim continuation (complete once a flush-left line comes)
    (f"Sure! Here it is:\n```python\n{PY_PROMPT}{PY_BODY}```\nThis keeps a running balance.", True),  # prompt repeated
    (f"```python\ndef below_zero(operations: List[int]) -> bool:\n{PY_BODY}```", True),  # signature only
    (f"```python\ndef below_zero(\n    operations: List[int],\n) -> bool:\n{PY_BODY}```", True),  # on three lines
    (f"```\nimport math\n\n\ndef below_zero(operations):\n{PY_BODY}\n\nprint(below_zero([1]))\n", True),  # a call
    (f"```python\n{PY_BODY}", False),  # the fence never closes
    ("balance = 0\nfor op in operations:\n    balance += op\n    if balance < 0:\n        return True\nreturn False\n",
     False),  # a body written flush left is indented
])
def test_python_answers_become_the_body(answer, complete):
    p = problem("python", PY_PROMPT)
    assert completion_from_output(p, "chat", answer).rstrip() == PY_BODY.rstrip()
    assert chat_answer_is_complete(p, answer) == complete


def test_a_rewritten_docstring_is_kept_and_harmless():
    p = problem("python", PY_PROMPT)
    answer = f'```python\ndef below_zero(operations):\n    """Another docstring."""\n{PY_BODY}```\nprint(1)'
    assert extract_chat_completion(p, answer) == '    """Another docstring."""\n' + PY_BODY  # before truncation
    assert completion_from_output(p, "chat", answer) == '    """Another docstring."""\n' + PY_BODY


JAVA_PROMPT = "import java.util.*;\n\nclass Solution {\n    /** Double x. */\n    public int twice(int x) {\n"


@pytest.mark.parametrize("answer, expected", [
    ("```java\nimport java.util.*;\n\nclass Solution {\n    public int twice(int x) {\n        return 2 * x;\n    }\n}\n```",
     "        return 2 * x;\n    }\n}"),
    # only the method: the class's closing brace is added back (CodeGeeX's repair)
    ("```java\npublic int twice(int x) {\n    return 2 * x;\n}\n```", "    return 2 * x;\n}\n}"),
    ("```java\npublic int twice(int x) { return 2 * x; }\n```", " return 2 * x; }\n}"),
])
def test_java_answers(answer, expected):
    assert completion_from_output(problem("java", JAVA_PROMPT), "chat", answer) == expected


def test_calls_and_prototypes_are_not_declarations():
    cpp = problem("cpp", "#include<vector>\nusing namespace std;\nint fact(int n){\n")
    body = "    if (n < 2) return 1;\n    return n * fact(n - 1);\n}\n"
    assert completion_from_output(cpp, "chat", body) == body.rstrip("\n")
    with_prototype = f"```cpp\nint fact(int n);\nint fact(int n) {{\n{body}```"
    assert completion_from_output(cpp, "chat", with_prototype) == body.rstrip("\n")
    js = problem("js", "const f = (n) => {\n")
    local = "  let f = 1\n  for (let i = 1; i <= n; i++) { f *= i }\n  return f\n}\n"
    assert completion_from_output(js, "chat", local) == local.rstrip("\n")
    arrow = f"```js\nconst f = (n) => {{\n{local}```"
    assert completion_from_output(js, "chat", arrow) == local.rstrip("\n")


def test_go_return_type_with_braces():
    p = problem("go", "// Longest string or nil.\nfunc Longest(strings []string) interface{}{\n")
    body = "    if len(strings) == 0 {\n        return nil\n    }\n    return strings[0]\n}"
    answer = f"```go\npackage main\n\nfunc Longest(strings []string) interface{{}} {{\n{body}\n```"
    assert prompt_function_name(p) == "Longest"
    assert completion_from_output(p, "chat", answer) == body


def test_split_fenced_code():
    assert split_fenced_code("a\n```py\nx = 1\n```\nb") == ("x = 1\n", True, True)
    assert split_fenced_code("```py\nx = 1\n") == ("x = 1\n", True, False)
    assert split_fenced_code("```pyt") == ("", True, False)  # the info string is still coming
    assert split_fenced_code("x = 1\n") == ("x = 1\n", False, False)


@requires_humaneval_x
@pytest.mark.parametrize("language", LANGUAGES)
def test_every_problem_extracts_its_canonical_solution(language):
    """For all 164 problems: a continuation, the prompt repeated in a fence, or the declaration alone
    followed by the solution all give the canonical solution after truncation."""
    for p in load_problems(language):
        want = truncate_generation(language, p.canonical_solution).rstrip()
        tag = FENCE_TAGS[language]
        decl = declaration_line(p)
        answers = [p.canonical_solution, f"Here:\n```{tag}\n{p.prompt}{p.canonical_solution}\n```\nDone.",
                   p.prompt + p.canonical_solution, f"```{tag}\n{decl}\n{p.canonical_solution}```\n"]
        for answer in answers:
            assert completion_from_output(p, "chat", answer).rstrip() == want, (p.task_id, answer[:200])


@requires_humaneval_x
@pytest.mark.parametrize("language", LANGUAGES)
def test_chat_early_stop_never_changes_the_result(language):
    """Streaming a fenced answer: the first prefix judged complete gives the final completion."""
    for p in load_problems(language)[::24]:
        answer = f"Here:\n```{FENCE_TAGS[language]}\n{p.prompt}{p.canonical_solution}\n```\nMore text."
        final = completion_from_output(p, "chat", answer)
        complete = [cut for cut in range(0, len(answer), 9) if chat_answer_is_complete(p, answer[:cut])]
        assert complete, p.task_id
        for cut in complete:
            assert completion_from_output(p, "chat", answer[:cut]) == final, (p.task_id, answer[:cut])


# ----------------------------------------------------------------------------- stop criterion


@requires_humaneval_x
@pytest.mark.parametrize("mode", ["completion", "chat"])
@pytest.mark.parametrize("language", LANGUAGES)
def test_stop_criterion_fires_at_the_first_complete_token(tiny_tokenizer, language, mode):
    """Fed one generated token at a time (as the decoding loop does), the criterion stops the row at the
    first token after which the output is complete, and cutting there changes nothing."""
    p = select_problems(task_ids=[MEMORIZED_TASKS[LANGUAGES.index(language)]])[0]
    answer = memorized_answers(p)[mode]
    tokens = tiny_tokenizer(answer, add_special_tokens=False)["input_ids"]
    stopper = StopWhenComplete(tiny_tokenizer, [p], mode, {tiny_tokenizer.eos_token_id})
    fired = next(n for n in range(1, len(tokens) + 1) if stopper.complete({0: tokens[:n]}) == {0})
    text = lambda n: tiny_tokenizer.decode(tokens[:n])  # noqa: E731
    assert stopper.stopped_at == {0: fired}
    assert output_is_complete(p, mode, text(fired)) and not output_is_complete(p, mode, text(fired - 1))
    assert fired < len(tokens)  # the trailing text was not needed
    assert completion_from_output(p, mode, text(fired)) == completion_from_output(p, mode, answer)
    assert completion_from_output(p, mode, answer).rstrip() == truncate_generation(language, p.canonical_solution).rstrip()


# ----------------------------------------------------------------------------- generation


def work_items(problems, mode, tokenizer, samples=1) -> list[WorkItem]:
    return [WorkItem(p, i, render_prompt_for(p, mode, tokenizer, MFTCODER)) for p in problems for i in range(samples)]


@requires_humaneval_x
def test_left_padded_batch_equals_one_at_a_time(lively):
    problems = select_problems(limit=2)  # ten prompts of 196 to 309 tokens
    items = work_items(problems, "completion", lively.tokenizer)
    assert len({len(item.prompt.ids) for item in items}) > 5
    settings = GenerationSettings(max_new_tokens=12, batch_size=len(items))
    batched = generate_batch(lively, items, "completion", settings, stop_early=False)
    alone = [generate_batch(lively, [item], "completion", settings, stop_early=False)[0] for item in items]
    assert [r["raw"] for r in batched] == [r["raw"] for r in alone]
    assert len({r["raw"] for r in batched}) > 1  # varied output, so the comparison means something


@requires_humaneval_x
def test_stop_rules_on_real_generation(lively):
    """Per language, stopping early gives what generating to max_new_tokens and truncating gives."""
    problems = select_problems(limit=2)
    items = work_items(problems, "completion", lively.tokenizer)
    settings = GenerationSettings(max_new_tokens=24, batch_size=len(items))
    early = generate_batch(lively, items, "completion", settings)
    full = generate_batch(lively, items, "completion", settings, stop_early=False)
    for stopped, unstopped, item in zip(early, full, items):
        assert stopped["generation"] == unstopped["generation"] == truncate_generation(item.problem.language,
                                                                                       stopped["raw"])
        assert unstopped["raw"].startswith(stopped["raw"])
        if stopped["stopped"] == "complete":
            assert generation_is_complete(item.problem.language, stopped["raw"])
            assert stopped["new_tokens"] < settings.max_new_tokens
        else:
            assert stopped["stopped"] == "max_new_tokens" and stopped["raw"] == unstopped["raw"]
        assert stopped["prompt"] == item.prompt.text and stopped["prompt_tokens"] == len(item.prompt.ids)
    assert {r["stopped"] for r in early if r["language"] == "python"} == {"complete"}


@requires_humaneval_x
def test_sampling_is_seeded_per_sample(lively):
    problems = select_problems(task_ids=["Python/0", "Go/3", "JavaScript/5"])
    items = work_items(problems, "completion", lively.tokenizer, samples=3)
    settings = GenerationSettings(samples_per_problem=3, temperature=0.8, top_p=0.95, max_new_tokens=8, batch_size=9)
    first = [r["raw"] for r in generate_batch(lively, items, "completion", settings, stop_early=False)]
    again = [r["raw"] for r in generate_batch(lively, items, "completion", settings, stop_early=False)]
    one_by_one = [generate_batch(lively, [item], "completion", settings, stop_early=False)[0]["raw"] for item in items]
    assert first == again == one_by_one  # reproducible, and independent of the batch a sample is in
    for start in range(0, 9, 3):
        assert len(set(first[start:start + 3])) > 1  # the n samples of a problem differ
    other_seed = dataclasses.replace(settings, seed=settings.seed + 1)
    assert [r["raw"] for r in generate_batch(lively, items, "completion", other_seed, stop_early=False)] != first
    assert sample_seed(1, "Python/0", 0) != sample_seed(1, "Python/0", 1) != sample_seed(2, "Python/0", 1)


def test_seeded_sampling_draws_from_the_nucleus():
    """Gumbel-max over temperature-scaled, top-p-filtered logits samples the renormalized nucleus."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = 4000
    sampler = SeededSampling(list(range(draws)), temperature=1.0, top_p=0.9)
    scores = sampler(torch.zeros((draws, 1), dtype=torch.long), probs.log().expand(draws, 4).clone())
    counts = torch.bincount(scores.argmax(-1), minlength=4).float() / draws
    assert counts[3] == 0  # outside the 0.9 nucleus (0.5 + 0.3 + 0.15 reach it)
    assert torch.allclose(counts[:3], probs[:3] / probs[:3].sum(), atol=0.03)
    cold = SeededSampling(list(range(draws)), temperature=0.25, top_p=1.0)
    picked = cold(torch.zeros((draws, 1), dtype=torch.long), probs.log().expand(draws, 4).clone()).argmax(-1)
    expected = probs ** 4 / (probs ** 4).sum()
    assert torch.allclose(torch.bincount(picked, minlength=4).float() / draws, expected, atol=0.03)


# ----------------------------------------------------------------------------- the generations file


@requires_humaneval_x
def test_generations_file_resumes(tmp_path, lively_llama_dir):
    problems = select_problems(languages=["python", "go"], limit=3)
    settings = GenerationSettings(max_new_tokens=6, batch_size=4)
    path = tmp_path / "generations.jsonl"
    loads = []

    def load():
        loads.append(1)
        return load_generation_model(lively_llama_dir, "fp32")

    render = lambda p, tokenizer: render_prompt_for(p, "completion", tokenizer)  # noqa: E731
    first = generate_to_file(path, "base", load, problems, "completion", settings, render, threads=1)
    assert first.generated == 6 and [r["task_id"] for r in first.records] == [p.task_id for p in problems]
    # A crashed run: two samples missing and a torn last line.
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["task_id"] not in ("Python/1", "Go/2")]
    path.write_text("".join(kept) + '{"model": "base", "task_id": "Go/2", "samp')
    second = generate_to_file(path, "base", load, problems, "completion", settings, render, threads=1)
    assert second.generated == 2 and len(loads) == 2
    records = read_generations(path)
    assert sorted((r["task_id"], r["sample_index"]) for r in records) == sorted((p.task_id, 0) for p in problems)
    assert [r["raw"] for r in second.records] == [r["raw"] for r in first.records]  # greedy: the same answers
    # Another model's samples are its own; nothing missing means the model is not even loaded.
    third = generate_to_file(path, "base", load, problems, "completion", settings, render, threads=1)
    assert third.generated == 0 and len(loads) == 2
    assert third.stats["samples"] == 6 and third.stats["new_tokens"] == sum(r["new_tokens"] for r in records)


def test_a_damaged_generations_file_is_named(tmp_path):
    path = tmp_path / "generations.jsonl"
    path.write_text('{"model": "base", "task_id": "Python/0", "sample_index": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"generations.jsonl:2: not a generation record"):
        read_generations(path)


# ----------------------------------------------------------------------------- a model that knows the answers


@pytest.mark.slow
@requires_humaneval_x
@pytest.mark.parametrize("mode", ["completion", "chat"])
def test_memorized_answers_stop_and_truncate_per_language(mode, test_cache_root, tiny_llama_dir):
    """A real model writing real code: every language stops as soon as its function is complete
    (completion: the stop rule; chat: the closing fence) and yields the canonical solution; run to
    the end, the model writes the trailing text, which the truncation cuts."""
    model = load_generation_model(memorizing_llama_folder(test_cache_root, tiny_llama_dir), "fp32")
    problems = select_problems(task_ids=list(MEMORIZED_TASKS))
    items = work_items(problems, mode, model.tokenizer)
    settings = GenerationSettings(max_new_tokens=96, batch_size=len(items))
    early = generate_batch(model, items, mode, settings)
    full = generate_batch(model, items, mode, settings, stop_early=False)
    for stopped, unstopped, p in zip(early, full, problems):
        want = truncate_generation(p.language, p.canonical_solution)
        assert stopped["generation"].rstrip() == unstopped["generation"].rstrip() == want.rstrip(), p.task_id
        assert stopped["stopped"] == "complete", (p.task_id, stopped["raw"])
        assert stopped["new_tokens"] < unstopped["new_tokens"]
        assert memorized_answers(p)[mode].startswith(stopped["raw"])
        tail = TRAILING_TEXT[p.language].strip() if mode == "completion" else "It returns the decimal part."
        assert tail in unstopped["raw"]


def test_a_family_that_declines_sdpa_still_generates(tmp_path, tiny_tokenizer):
    """Gemma 2 refuses sdpa (its soft-capped attention logits): evaluation loads its eager kernel
    instead of failing the stage."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=50.0,
                          bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                          pad_token_id=tiny_tokenizer.eos_token_id)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma2")
    tiny_tokenizer.save_pretrained(tmp_path / "gemma2")
    gm = load_generation_model(tmp_path / "gemma2", "fp32")
    assert gm.model.config._attn_implementation == "eager"
    problem = select_problems(languages=["python"], limit=1)[0]
    item = WorkItem(problem, 0, render_prompt_for(problem, "completion", gm.tokenizer))
    (record,) = generate_batch(gm, [item], "completion", GenerationSettings(max_new_tokens=4), stop_early=False)
    assert record["new_tokens"] >= 1
