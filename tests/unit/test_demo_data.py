"""The embedded demo data set, mined from the real stdlib of this interpreter.

Unit tests mine one stdlib package (email: ~30 files, ~170 usable functions) to stay fast;
the full-stdlib build is the slow test at the end.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from mft_core.benchmark import BenchmarkError
from mft_core.data.demo import (
    MAX_PREFERENCE_SIDE_CHARS,
    PREFERENCE_TASK,
    MAX_RECORD_CHARS,
    TASKS,
    build_demo_data,
    iter_source_files,
    main,
    mine_functions,
    stdlib_dir,
)
from mft_core.data.records import parse_line

SUBSET = stdlib_dir() / "email"




@pytest.fixture(scope="module")
def built(tmp_path_factory, humaneval_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    stats = build_demo_data(out, per_task=40, seed=0, humaneval_dir=humaneval_dir, source_dir=SUBSET)
    return out, stats


@pytest.fixture(scope="module")
def mined_sources() -> dict[str, str]:
    """function source -> docstring, for every usable function of the subset."""
    functions, _ = mine_functions(SUBSET)
    return {function.source: function.docstring for function in functions}


def _records(out: Path, task: str) -> list[dict]:
    lines = (out / task / "data.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _fenced_code(text: str) -> str:
    found = re.search(r"```python\n(.*?)\n```", text, re.DOTALL)
    assert found, f"no ```python block in {text[:200]!r}"
    return found.group(1)


def test_two_builds_are_byte_identical_and_the_seed_matters(tmp_path: Path, humaneval_dir: Path):
    first, second, other_seed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((first, 0), (second, 0), (other_seed, 1)):
        build_demo_data(out, per_task=25, seed=seed, humaneval_dir=humaneval_dir, source_dir=SUBSET)
    files = [f"{task}/data.jsonl" for task in (*TASKS, PREFERENCE_TASK)] + ["demo_stats.json"]
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "text-to-code/data.jsonl").read_bytes() != (other_seed / "text-to-code/data.jsonl").read_bytes()


def test_counts_and_stats(built, mined_sources):
    out, stats = built
    assert json.loads((out / "demo_stats.json").read_text()) == {k: v for k, v in stats.items() if k != "build_seconds"}
    assert stats["files_scanned"] == len(iter_source_files(SUBSET)) > 20
    assert stats["source_dir"] == str(SUBSET)
    assert stats["functions_usable"] == len(mined_sources) > 120
    assert stats["decontamination"] == {"enabled": True, "benchmark_items": 820, "ngram": 13}
    # Every function is dealt to exactly one task.
    assert sum(stats["tasks"][task]["candidates"] for task in TASKS) == stats["functions_usable"]
    for task in TASKS:
        task_stats = stats["tasks"][task]
        records = _records(out, task)
        assert len(records) == task_stats["records"] == 40
        assert [record["id"] for record in records] == list(range(40))
        assert task_stats["contaminated"] == 0  # the stdlib's email package is not HumanEval


def test_per_task_larger_than_the_source_takes_everything(tmp_path: Path, humaneval_dir: Path):
    stats = build_demo_data(tmp_path, per_task=10_000, humaneval_dir=humaneval_dir, source_dir=stdlib_dir() / "json")
    for task in TASKS:
        task_stats = stats["tasks"][task]
        assert task_stats["records"] == task_stats["candidates"] - task_stats["contaminated"] - task_stats["too_long"]
        assert len(_records(tmp_path, task)) == task_stats["records"] > 0


def test_records_are_valid_mftcoder_chatml(built):
    out, _ = built
    for task in TASKS:
        path = out / task / "data.jsonl"
        for line in path.read_bytes().splitlines():
            record = json.loads(line)
            assert set(record) == {"id", "data_name", "chat_rounds"}
            assert record["data_name"] == task
            roles = [turn["role"] for turn in record["chat_rounds"]]
            assert roles == ["system", "human", "bot"]  # system first, alternation, ends with bot
            for turn in record["chat_rounds"]:
                assert set(turn) == {"role", "content"}
                assert isinstance(turn["content"], str) and turn["content"].strip()
            assert sum(len(turn["content"]) for turn in record["chat_rounds"]) <= MAX_RECORD_CHARS
            # ...and the project's ingest accepts it as such.
            assert [m["role"] for m in parse_line(line)["messages"]] == ["system", "user", "assistant"]


def test_instruction_wording_varies(built):
    out, _ = built
    for task in TASKS:
        first_lines = {record["chat_rounds"][1]["content"].split("\n")[0][:25] for record in _records(out, task)}
        assert len(first_lines) >= 3, (task, first_lines)


def test_text_to_code_answer_defines_the_function_asked_for(built, mined_sources):
    out, _ = built
    for record in _records(out, "text-to-code"):
        human, bot = record["chat_rounds"][1]["content"], record["chat_rounds"][2]["content"]
        signature = _fenced_code(human)
        name = re.search(r"def (\w+)\(", signature).group(1)
        assert bot.startswith("```python\n") and bot.endswith("\n```")
        code = _fenced_code(bot)
        tree = ast.parse(code)
        assert len(tree.body) == 1 and tree.body[0].name == name
        assert code.startswith(signature)
        docstring = ast.get_docstring(tree.body[0]).strip()
        assert docstring in human  # the instruction carries the real docstring
        assert mined_sources[code] == docstring


def test_completion_prompt_plus_answer_is_the_function(built, mined_sources):
    out, _ = built
    right_after_docstring = 0
    for record in _records(out, "code-completion"):
        human, bot = record["chat_rounds"][1]["content"], record["chat_rounds"][2]["content"]
        header, prefix = human.split("\n\n", 1)
        assert "\n" not in header and prefix.endswith("\n") and bot.strip()
        source = prefix + bot
        assert source in mined_sources  # exactly a real stdlib function, dedented
        tree = ast.parse(source)
        assert len(tree.body) == 1 and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))
        # The prefix always holds the whole docstring: the split is in the body.
        assert mined_sources[source] == ast.get_docstring(tree.body[0]).strip()
        docstring_end = tree.body[0].body[0].end_lineno
        assert prefix.count("\n") >= docstring_end
        right_after_docstring += prefix.rstrip("\n").count("\n") + 1 == docstring_end
    assert 0 < right_after_docstring < 40  # both HumanEval-shaped prompts and longer prefixes


def test_docstring_generation_asks_for_the_removed_docstring(built, mined_sources):
    out, _ = built
    by_docstring = {docstring: source for source, docstring in mined_sources.items()}
    for record in _records(out, "docstring-generation"):
        human, bot = record["chat_rounds"][1]["content"], record["chat_rounds"][2]["content"]
        code = _fenced_code(human)
        function = ast.parse(code).body[0]
        assert ast.get_docstring(function) is None
        assert bot in by_docstring  # the answer is the real cleaned docstring
        original = ast.parse(by_docstring[bot]).body[0]
        original.body = original.body[1:]
        assert ast.dump(original) == ast.dump(function)  # the same function minus its docstring


def test_function_copied_from_humaneval_is_removed_and_counted(tmp_path: Path, humaneval_dir: Path):
    source = tmp_path / "src"
    shutil.copytree(stdlib_dir() / "json", source / "json")
    with gzip.open(humaneval_dir / "python" / "humaneval_python.jsonl.gz", "rt") as lines:
        has_close_elements = json.loads(next(lines))
    assert has_close_elements["task_id"] == "Python/0"
    (source / "leaked.py").write_text(has_close_elements["prompt"] + has_close_elements["canonical_solution"])
    functions, _ = mine_functions(source)
    assert "has_close_elements" in [function.name for function in functions]

    stats = build_demo_data(tmp_path / "out", per_task=1000, humaneval_dir=humaneval_dir, source_dir=source)
    contaminated = [(task, stats["tasks"][task]) for task in TASKS if stats["tasks"][task]["contaminated"]]
    assert len(contaminated) == 1
    task, task_stats = contaminated[0]
    assert task_stats["contaminated"] == 1
    example = task_stats["contaminated_examples"][0]
    assert example["function"] == "leaked.has_close_elements" and "Python/0" in example["matches"]
    # Everything else is kept.
    assert sum(stats["tasks"][t]["records"] for t in TASKS) == len(functions) - 1
    for t in TASKS:
        assert "closer to each other" not in (tmp_path / "out" / t / "data.jsonl").read_text()


def test_missing_benchmark_directory_is_an_error_when_named(tmp_path: Path):
    with pytest.raises(BenchmarkError, match="HumanEval-X directory .* does not exist"):
        build_demo_data(tmp_path, per_task=5, humaneval_dir=tmp_path / "nope", source_dir=SUBSET)
    with pytest.raises(FileNotFoundError, match="source directory"):
        build_demo_data(tmp_path, per_task=5, source_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="per_task"):
        build_demo_data(tmp_path, per_task=0, source_dir=SUBSET)


def test_command_line(tmp_path: Path, humaneval_dir: Path, capsys):
    argv = ["--out", str(tmp_path), "--per-task", "7", "--seed", "3",
            "--source-dir", str(stdlib_dir() / "logging"), "--humaneval-dir", str(humaneval_dir)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "text-to-code" in printed and "records=    7" in printed
    assert len(_records(tmp_path, "docstring-generation")) == 7


@pytest.mark.slow
def test_full_stdlib_build(tmp_path: Path, humaneval_dir: Path):
    stats = build_demo_data(tmp_path, humaneval_dir=humaneval_dir)
    assert stats["files_scanned"] > 500 and stats["files_unparseable"] == 0
    for task in TASKS:
        assert stats["tasks"][task]["records"] > 1000
        lines = (tmp_path / task / "data.jsonl").read_bytes().splitlines()
        assert len(lines) == stats["tasks"][task]["records"]
        for line in lines:
            parse_line(line)


def test_the_preference_task_pairs_a_function_with_a_broken_variant_that_still_parses(built, mined_sources):
    """code-preference: the text-to-code prompt of a function, the function as chosen and a broken
    variant as rejected (a return without its value, two lines swapped, another name), in MFTCoder's
    format; every pair is valid for ingest and both sides fit one 1024-token row together."""
    import ast

    from mft_core.data.records import normalize_preference

    out, stats = built
    pairs = _records(out, PREFERENCE_TASK)
    kinds = stats["preference"][PREFERENCE_TASK]["kinds"]
    assert len(pairs) == stats["preference"][PREFERENCE_TASK]["pairs"] == sum(kinds.values()) > 20
    assert set(kinds) <= {"missing_return", "swapped_lines", "wrong_name"} and kinds.get("missing_return", 0) > 0
    for pair in pairs:
        record = normalize_preference(pair)
        chosen, rejected = _fenced_code(record["chosen"]), _fenced_code(record["rejected"])
        assert chosen in mined_sources and chosen != rejected
        ast.parse(rejected)  # broken in meaning, not in syntax
        assert record["messages"][-1]["content"].count(chosen.split("(")[0].split("def ")[-1]) >= 1
        assert max(sum(len(m["content"]) for m in pair[side]) for side in ("chosen", "rejected")) <= MAX_PREFERENCE_SIDE_CHARS
