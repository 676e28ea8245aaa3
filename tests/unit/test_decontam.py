"""N-gram decontamination against the real HumanEval-X data (tests/benchmark_data.py)."""

from __future__ import annotations

import gzip
import inspect
import json
import pickle
import random
import textwrap
from pathlib import Path

import pytest

from mft_core.benchmark import BenchmarkError
from mft_core.data import decontam
from mft_core.data.decontam import (
    DEFAULT_NGRAM,
    Decontaminator,
    load_benchmark_items,
    normalize_words,
    strip_boilerplate,
)




def _rows(humaneval_dir: Path, language: str) -> list[dict]:
    with gzip.open(humaneval_dir / language / f"humaneval_{language}.jsonl.gz", "rt") as lines:
        return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def decontaminator(humaneval_dir: Path) -> Decontaminator:
    found = Decontaminator.from_humaneval(humaneval_dir)
    assert found is not None
    return found


def test_normalization_ignores_case_punctuation_and_identifier_style():
    assert normalize_words("has_close_elements(numbers, 0.5)") == ["has", "close", "elements", "numbers", "0", "5"]
    assert normalize_words("hasCloseElements") == normalize_words("HasCloseElements") == ["has", "close", "elements"]
    assert normalize_words("HTTPServer.serve_forever()  # x") == ["http", "server", "serve", "forever", "x"]
    assert normalize_words("/** >>> */ \n\t") == []


def test_loads_all_five_languages_prompt_plus_solution(humaneval_dir: Path):
    items = load_benchmark_items(humaneval_dir)
    assert len(items) == 5 * 164
    names = [name for name, _ in items]
    assert {name.split("/")[0] for name in names} == {"CPP", "Go", "Java", "JavaScript", "Python"}
    python0 = _rows(humaneval_dir, "python")[0]
    text = dict(items)["Python/0"]
    assert "closer to each other" in text and python0["canonical_solution"].strip() in text
    assert "from typing import List" not in text  # header lines are stripped


def test_real_humaneval_prompt_is_contaminated_in_any_wrapping(humaneval_dir, decontaminator):
    prompt = _rows(humaneval_dir, "python")[0]["prompt"]  # has_close_elements
    assert decontaminator.contaminated(prompt)
    assert "Python/0" in decontaminator.matches(prompt)
    # Re-indented, fenced, inside a chat instruction: still found.
    wrapped = "Please implement this:\n```python\n" + textwrap.indent(prompt, "        ") + "```\nThanks!"
    assert decontaminator.contaminated(wrapped)
    # Only the docstring sentence, reflowed into one line with different punctuation.
    sentence = ("check if in given list of numbers -- are any two numbers closer to each "
                "other than given threshold?")
    assert "Python/0" in decontaminator.matches(sentence)


def test_same_problem_is_found_across_languages(humaneval_dir: Path):
    python_only = Decontaminator([row["prompt"] for row in _rows(humaneval_dir, "python")])
    java_prompt = _rows(humaneval_dir, "java")[0]["prompt"]  # hasCloseElements, Java comments
    assert python_only.matches(java_prompt) == ["benchmark[0]"]


def test_unrelated_real_code_is_kept(decontaminator):
    for function in (textwrap.dedent, json.dumps, inspect.getsource, Path.relative_to):
        assert not decontaminator.contaminated(inspect.getsource(function)), function


def test_language_boilerplate_alone_is_not_contamination(decontaminator):
    cpp = ("#include<stdio.h>\n#include<math.h>\n#include<vector>\n#include<string>\n"
           "#include<algorithm>\nusing namespace std;\nvector<float> scale(vector<float> v){ return v; }\n")
    java = ("import java.util.*;\nimport java.lang.*;\n\nclass Solution {\n    /**\n"
            "    Write a function that takes a string and returns its reverse.\n     */\n")
    assert strip_boilerplate(cpp).startswith("vector<float> scale")
    assert not decontaminator.contaminated(cpp)
    assert not decontaminator.contaminated(java)


def test_texts_shorter_than_n_match_nothing():
    decontaminator = Decontaminator(["return sorted(set(l))"])
    assert decontaminator.ngram_count == 0
    assert not decontaminator.contaminated("return sorted(set(l))")
    small_n = Decontaminator(["return sorted(set(l))"], n=3, names=["Python/34"])
    assert small_n.matches("x = sorted(set(l))") == ["Python/34"]


def test_bad_arguments_are_explained(tmp_path: Path, monkeypatch):
    with pytest.raises(ValueError, match="n-gram size"):
        Decontaminator(["a b c"], n=0)
    with pytest.raises(ValueError, match="names"):
        Decontaminator(["a b c"], names=["x", "y"])
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_benchmark_items(tmp_path / "missing")
    with pytest.raises(BenchmarkError, match="holds no problems file"):
        load_benchmark_items(tmp_path)


def test_malformed_row_names_file_and_line(tmp_path: Path):
    (tmp_path / "python").mkdir()
    bad = tmp_path / "python" / "humaneval_python.jsonl.gz"
    with gzip.open(bad, "wt") as out:
        out.write(json.dumps({"task_id": "Python/0", "prompt": "def f():\n", "canonical_solution": "  pass\n", "test": "f()"}) + "\n")
        out.write(json.dumps({"task_id": "Python/1", "question": "?"}) + "\n")
    with pytest.raises(BenchmarkError, match=rf"{bad}:2: missing field\(s\) \['prompt', 'canonical_solution', 'test'\]"):
        load_benchmark_items(tmp_path)


def test_default_ngram_is_13():
    assert DEFAULT_NGRAM == 13
    assert Decontaminator(["x"]).n == 13


def _reference_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalize_words(text)
    return {tuple(words[start:start + n]) for start in range(len(words) - n + 1)}


def _reference_matches(benchmark_ngrams: list[set[tuple[str, ...]]], text: str, n: int) -> list[int]:
    """The definition, the slow obvious way: the benchmark texts sharing an n-gram of
    normalize_words with text."""
    mine = _reference_ngrams(text, n)
    return [index for index, theirs in enumerate(benchmark_ngrams) if not mine.isdisjoint(theirs)]


def _restyled(words: list[str], rng: random.Random) -> str:
    """words written the ways normalization must see through: identifier styles, case, and any
    separator (punctuation, non-ASCII, DEL, NUL, a lone surrogate)."""
    style = rng.randrange(6)
    if style == 0:
        return "_".join(words)
    if style == 1:
        return words[0] + "".join(word.capitalize() for word in words[1:])  # camelCase
    if style == 2:
        return "".join(word.capitalize() for word in words)  # PascalCase
    if style == 3:
        return " ".join(word.upper() for word in words)
    separators = [" ", "\n", "\t", ", ", "(", ") ", ".", "::", "->", "é", "—", "中", "😀", "\x7f", "\x00", "\ud800"]
    return "".join(word + rng.choice(separators) for word in words)


def _random_texts(benchmark: list[str], count: int, seed: int) -> list[str]:
    """Texts around the n-gram threshold: windows of 1 to 16 benchmark words (restyled, cut
    into pieces, between unknown words, digits and letter-digit tokens such as x1 or HTTPServer)."""
    rng = random.Random(seed)
    noise = ["zebra", "quux", "x1", "1x", "HTTPServer", "getHTTPResponse", "ABCdef", "a1b2", "42", "Ünïcode", "  "]
    texts = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randrange(1, 4)):
            words = normalize_words(rng.choice(benchmark))
            start = rng.randrange(max(1, len(words)))
            pieces.append(_restyled(words[start:start + rng.randrange(1, 17)] or ["empty"], rng))
            pieces.append(" ".join(rng.choice(noise) for _ in range(rng.randrange(0, 3))))
        texts.append(rng.choice([" ", "\n", ""]).join(pieces))
    return texts


@pytest.mark.parametrize("n", [13, 4, 1])
def test_fast_matching_equals_the_reference_definition(n):
    """Decontaminator (token codes, cached, runs found by regex) against _reference_matches on
    texts built from the benchmark the evaluate stage uses (HumanEval-X where found)."""
    benchmark = [text for _, text in load_benchmark_items()]
    decontaminator = Decontaminator(benchmark, n=n)
    benchmark_ngrams = [_reference_ngrams(text, n) for text in benchmark]
    texts = _random_texts(benchmark, 1500, seed=n) + benchmark[:50] + ["", "x", "\ud800\x7f"]
    found = 0
    for text in texts:
        expected = [f"benchmark[{index}]" for index in _reference_matches(benchmark_ngrams, text, n)]
        assert decontaminator.matches(text) == expected, text
        assert decontaminator.contaminated(text) == bool(expected), text
        found += bool(expected)
    assert 0 < found < len(texts)  # both verdicts occur
    if n == DEFAULT_NGRAM:
        assert 0.2 * len(texts) < found < 0.8 * len(texts), found


def test_a_pickled_decontaminator_and_an_uncached_one_give_the_same_verdicts(monkeypatch):
    """A worker process gets the decontaminator pickled; past its cache bound, tokens are coded
    on every use. Both must decide as the original does."""
    benchmark = [text for _, text in load_benchmark_items()]
    texts = _random_texts(benchmark, 300, seed=7)
    original = Decontaminator(benchmark)
    expected = [original.matches(text) for text in texts]
    assert any(expected)
    copy = pickle.loads(pickle.dumps(original))
    assert [copy.matches(text) for text in texts] == expected
    monkeypatch.setattr(decontam, "_MAX_CACHED_TOKENS", 0)
    uncached = Decontaminator(benchmark)
    assert [uncached.matches(text) for text in texts] == expected
    assert len(uncached._token_codes) == 0


def test_the_saved_index_decides_as_a_built_one_and_follows_the_benchmark(tmp_path, monkeypatch):
    """decontam.saved_index: built and saved the first time, read back after (the builder is not
    called), deciding as the built one; other benchmark contents (digest_of) or another n make a
    new index; a damaged file is built again."""
    built = []
    from_humaneval = Decontaminator.from_humaneval.__func__

    def counting(cls, humaneval_dir=None, n=DEFAULT_NGRAM):
        built.append(n)
        return from_humaneval(cls, humaneval_dir, n)

    monkeypatch.setattr(Decontaminator, "from_humaneval", classmethod(counting))
    folder = tmp_path / "index"
    first = decontam.saved_index(folder, None, 13, lambda path: "contents-a")
    again = decontam.saved_index(folder, None, 13, lambda path: "contents-a")
    assert built == [13] and first.saved_at == again.saved_at and first.saved_at.parent == folder
    benchmark = [text for _, text in load_benchmark_items()]
    texts = _random_texts(benchmark, 300, seed=11)
    assert [again.matches(text) for text in texts] == [first.matches(text) for text in texts]
    assert any(first.matches(text) for text in texts) and again.names == first.names
    decontam.saved_index(folder, None, 13, lambda path: "contents-b")  # the benchmark changed
    decontam.saved_index(folder, None, 8, lambda path: "contents-a")  # another n
    assert built == [13, 13, 8] and len(list(folder.glob("decontam-*.marshal"))) == 3
    first.saved_at.write_bytes(first.saved_at.read_bytes()[:100])  # damaged
    repaired = decontam.saved_index(folder, None, 13, lambda path: "contents-a")
    assert built == [13, 13, 8, 13] and [repaired.matches(text) for text in texts[:50]] == [
        first.matches(text) for text in texts[:50]]
