"""N-gram overlap decontamination against the benchmark the evaluate stage uses (HumanEval-X, or
OpenAI's Python HumanEval when that is all there is: mft_core/benchmark.py).

A training record is *contaminated* when it shares at least one run of ``n`` consecutive
normalized words with a benchmark item (prompt + canonical solution).

Normalization turns text into a stream of lowercase words:
- only ASCII letter/digit runs count; punctuation, operators, whitespace and non-ASCII
  characters merely separate words, so code formatting and comment markers (``#``, ``//``,
  ``/** */``, ``>>>``) do not hide an overlap;
- identifiers are split at underscores and camelCase boundaries (``has_close_elements``,
  ``hasCloseElements`` and ``HasCloseElements`` all become ``has close elements``), so the
  same problem is recognized in all five HumanEval-X languages.

Why n = 13: it is the common choice since GPT-3 (Brown et al. 2020) and later LLM reports.
After identifier splitting 13 words is about one docstring sentence or two lines of code:
long enough that ordinary code idioms (``for i in range(len(numbers)):``) do not trigger it,
short enough that a copied problem statement or solution always does.

Speed: the benchmark's n-grams are hashed once into a dict. A record's words are first mapped
to benchmark vocabulary ids; a word the benchmark never uses cannot be part of a shared
n-gram, so only runs of known words are hashed at all. Hashes are of integer tuples, which
Python does not randomize, so results are the same in every process.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from mft_core.benchmark import resolve_benchmark

DEFAULT_NGRAM = 13


# ALLCAPS runs (not followed by lowercase: "HTTPServer" -> "HTTP", "Server"), Capitalized or
# lowercase words, digit runs. Everything else separates words.
_WORD_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")

_UNKNOWN = -1

# Header lines every benchmark item of a language shares (C++ #include block, Java's
# "import java.util.*; import java.lang.*; class Solution {", Go and Python imports). They say
# nothing about the problem; left in, their n-grams would flag ordinary C++ or Java training
# files that start the same way.
_BOILERPLATE_LINE_RE = re.compile(
    r"\s*(#include\b|using\s+namespace\b|import\b|from\s+\S+\s+import\b|package\b|class\s+Solution\b)"
)


def normalize_words(text: str) -> list[str]:
    """The normalized word stream that n-grams are taken over (see the module docstring)."""
    return [word.lower() for word in _WORD_RE.findall(text)]


def strip_boilerplate(text: str) -> str:
    """text without its language header lines (includes, imports, package, class Solution)."""
    kept = []
    in_go_import_block = False
    for line in text.split("\n"):
        if in_go_import_block:
            in_go_import_block = line.strip() != ")"
            continue
        if _BOILERPLATE_LINE_RE.match(line):
            in_go_import_block = line.strip().startswith("import (") and not line.strip().endswith(")")
            continue
        kept.append(line)
    return "\n".join(kept)


def load_benchmark_items(humaneval_dir: Path | None = None) -> list[tuple[str, str]]:
    """(task_id, prompt + canonical_solution) of every problem of the benchmark the evaluate stage
    uses (mft_core/benchmark.py: all five HumanEval-X languages, or the Python fallback), with the
    language header lines removed (strip_boilerplate). [] when there is no benchmark at all."""
    from mft_core.eval.problems import load_problems

    items: list[tuple[str, str]] = []
    for language in resolve_benchmark(humaneval_dir).languages:
        items += [(problem.task_id, strip_boilerplate(problem.prompt + problem.canonical_solution))
                  for problem in load_problems(language, humaneval_dir)]
    return items


class Decontaminator:
    """Flags texts that share an n-gram of normalized words with any benchmark text.

    ``names`` label the benchmark texts in ``matches`` (default "benchmark[i]"). Texts shorter
    than n words have no n-gram and can match nothing (no HumanEval-X item is that short).
    """

    def __init__(
        self,
        benchmark_texts: Sequence[str],
        n: int = DEFAULT_NGRAM,
        names: Sequence[str] | None = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"n-gram size must be >= 1, got {n}")
        if names is not None and len(names) != len(benchmark_texts):
            raise ValueError(
                f"{len(names)} names for {len(benchmark_texts)} benchmark texts; "
                f"give one name per text or none"
            )
        self.n = n
        self.names = list(names) if names is not None else [
            f"benchmark[{index}]" for index in range(len(benchmark_texts))
        ]
        self._vocab: dict[str, int] = {}
        # n-gram hash -> indices of the benchmark texts that contain it
        self._ngram_items: dict[int, list[int]] = {}
        for index, text in enumerate(benchmark_texts):
            ids = [self._vocab.setdefault(word, len(self._vocab)) for word in normalize_words(text)]
            for key in set(self._hash_ngrams(ids)):
                self._ngram_items.setdefault(key, []).append(index)

    @classmethod
    def from_humaneval(
        cls, humaneval_dir: Path | None = None, n: int = DEFAULT_NGRAM
    ) -> Decontaminator | None:
        """Built from the benchmark with task ids as names; None when there is no benchmark."""
        items = load_benchmark_items(humaneval_dir)
        if not items:
            return None
        return cls([text for _, text in items], n=n, names=[name for name, _ in items])

    @property
    def ngram_count(self) -> int:
        return len(self._ngram_items)

    def _hash_ngrams(self, ids: list[int]) -> Iterator[int]:
        """Hashes of every n-gram of ids that holds no unknown word."""
        n = self.n
        run_start = 0
        for position in range(len(ids) + 1):
            if position == len(ids) or ids[position] == _UNKNOWN:
                for start in range(run_start, position - n + 1):
                    yield hash(tuple(ids[start:start + n]))
                run_start = position + 1

    def _text_ngrams(self, text: str) -> Iterator[int]:
        vocab = self._vocab
        ids = [vocab.get(word, _UNKNOWN) for word in normalize_words(text)]
        return self._hash_ngrams(ids)

    def contaminated(self, text: str) -> bool:
        """True when text shares at least one n-gram with a benchmark text."""
        table = self._ngram_items
        return any(key in table for key in self._text_ngrams(text))

    def matches(self, text: str) -> list[str]:
        """Names of the benchmark texts that text overlaps, in benchmark order."""
        hit: set[int] = set()
        for key in self._text_ngrams(text):
            hit.update(self._ngram_items.get(key, ()))
        return [self.names[index] for index in sorted(hit)]
