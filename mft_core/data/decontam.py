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

Speed: every benchmark word gets one character as its code, and a text becomes a string of codes
in which each word the benchmark never uses is a break (it cannot be part of a shared n-gram).
An n-gram is then an n-character substring of a run between breaks, and matching is string
slicing and dict lookups, exact (no hash collisions). The text is cut into letter-digit tokens by
bytes.translate + bytes.split, which run in C; a token's codes are computed once (normalize_words
of the token) and then looked up, as most tokens of code repeat.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

DEFAULT_NGRAM = 13


# ALLCAPS runs (not followed by lowercase: "HTTPServer" -> "HTTP", "Server"), Capitalized or
# lowercase words, digit runs. Everything else separates words.
_WORD_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")

# The code of a word the benchmark never uses: it ends a run of known words.
_BREAK = "\x00"

# Bytes that are not ASCII letters or digits become spaces, so that bytes.split() cuts a text
# into the letter-digit tokens that words come from. A non-ASCII character is a separator too,
# and every byte of its UTF-8 form is >= 0x80.
_TOKEN_BYTES = bytes(byte if bytes([byte]).isalnum() else ord(" ") for byte in range(256))

# Bound on the token-code cache (about 150 bytes per entry): the frequent tokens come early and
# stay; a token seen after the cache is full is coded again each time.
_MAX_CACHED_TOKENS = 200_000

# Header lines every benchmark item of a language shares (C++ #include block, Java's
# "import java.util.*; import java.lang.*; class Solution {", Go and Python imports). They say
# nothing about the problem; left in, their n-grams would flag ordinary C++ or Java training
# files that start the same way.
_BOILERPLATE_LINE_RE = re.compile(
    r"\s*(#include\b|using\s+namespace\b|import\b|from\s+\S+\s+import\b|package\b|class\s+Solution\b)"
)


def normalize_words(text: str) -> list[str]:
    """The normalized word stream that n-grams are taken over (see the module docstring)."""
    words = _WORD_RE.findall(text)
    # one lower() over all the words (they are ASCII and hold no newline), not one per word
    return "\n".join(words).lower().split("\n") if words else []


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
    from mft_core.benchmark import resolve_benchmark
    from mft_core.eval.problems import load_problems

    items: list[tuple[str, str]] = []
    for language in resolve_benchmark(humaneval_dir).languages:
        items += [(problem.task_id, strip_boilerplate(problem.prompt + problem.canonical_solution))
                  for problem in load_problems(language, humaneval_dir)]
    return items


def _tokens(text: str) -> list[bytes]:
    """The letter-digit tokens of text in order (bytes.translate and bytes.split run in C)."""
    # surrogatepass: a lone surrogate is non-ASCII, a separator like any other
    return text.encode("utf-8", "surrogatepass").translate(_TOKEN_BYTES).split()


class _TokenCodes(dict):
    """Token -> the codes of its words, computed on first use. The regex never matches across a
    separator, and a token ends where the text has a separator, so a text's word stream is its
    tokens' words in order."""

    def __init__(self, word_codes: dict[str, str]) -> None:
        super().__init__()
        self.word_codes = word_codes
        # the same, by the word's bytes (benchmark words are ASCII: _WORD_RE matches only ASCII)
        self.byte_codes = {word.encode("ascii"): code for word, code in word_codes.items()}

    def __missing__(self, token: bytes) -> str:
        # Most tokens are one word (lowercase, Capitalized, ALLCAPS or digits), which the regex
        # would return whole: they skip it.
        if token.isdigit() or token.isalpha() and (token.islower() or token.isupper() or token.istitle()):
            codes = self.byte_codes.get(token.lower(), _BREAK)
        else:
            codes = "".join([self.word_codes.get(word, _BREAK) for word in normalize_words(token.decode("ascii"))])
        if len(self) < _MAX_CACHED_TOKENS:
            self[token] = codes
        return codes


class Decontaminator:
    """Flags texts that share an n-gram of normalized words with any benchmark text.

    ``names`` label the benchmark texts in ``matches`` (default "benchmark[i]"). Texts shorter
    than n words have no n-gram and can match nothing (no HumanEval-X item is that short).
    Plain data, so it pickles: a worker process can check its share of the records.
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
        # benchmark word -> its one-character code (never _BREAK)
        word_codes: dict[str, str] = {}
        # n-gram (n codes) -> indices of the benchmark texts that contain it (a tuple, shared by all
        # the n-grams that only one text has: built, pickled and sent faster than a list each)
        self._ngram_items: dict[str, tuple[int, ...]] = {}
        table = self._ngram_items
        for index, text in enumerate(benchmark_texts):
            words = normalize_words(text)
            for word in dict.fromkeys(words):
                if word not in word_codes:
                    word_codes[word] = chr(len(word_codes) + 1)
            codes = "".join(map(word_codes.__getitem__, words))
            ngrams = {codes[start:start + n] for start in range(len(codes) - n + 1)}
            for ngram in [ngram for ngram in ngrams if ngram in table]:  # also in an earlier text
                table[ngram] += (index,)
            # set.difference(dict) looks each n-gram up (a keys view would be copied whole)
            table.update(dict.fromkeys(ngrams.difference(table), (index,)))
        self._token_codes = _TokenCodes(word_codes)
        self._long_run = re.compile(f"[^{_BREAK}]{{{n},}}")  # n or more known words in a row
        self.saved_at: Path | None = None  # where saved_index saved it: other processes read it there

    @classmethod
    def from_humaneval(
        cls, humaneval_dir: Path | None = None, n: int = DEFAULT_NGRAM
    ) -> Decontaminator | None:
        """Built from the benchmark with task ids as names; None when there is no benchmark."""
        items = load_benchmark_items(humaneval_dir)
        if not items:
            return None
        return cls([text for _, text in items], n=n, names=[name for name, _ in items])

    def state(self) -> tuple:
        """What the index is made of, as plain data (for marshal: saved_index)."""
        return self.n, self.names, self._token_codes.word_codes, self._ngram_items

    @classmethod
    def from_state(cls, state: tuple) -> Decontaminator:
        n, names, word_codes, ngram_items = state
        decontaminator = cls.__new__(cls)
        decontaminator.n, decontaminator.names, decontaminator._ngram_items = n, names, ngram_items
        decontaminator._token_codes = _TokenCodes(word_codes)
        decontaminator._long_run = re.compile(f"[^{_BREAK}]{{{n},}}")
        decontaminator.saved_at = None
        return decontaminator

    @classmethod
    def read(cls, path: Path) -> Decontaminator:
        """The index saved_index wrote to `path` (OSError, EOFError, ValueError, TypeError when it
        cannot be read)."""
        decontaminator = cls.from_state(marshal.loads(Path(path).read_bytes()))
        decontaminator.saved_at = Path(path)
        return decontaminator

    @property
    def ngram_count(self) -> int:
        return len(self._ngram_items)

    def _ngrams(self, text: str) -> Iterator[str]:
        """The n-grams of text made only of benchmark words, as code strings."""
        n = self.n
        codes = "".join(map(self._token_codes.__getitem__, _tokens(text)))
        # Most texts have no run of n known words: one regex scan finds the runs that do.
        for run in self._long_run.findall(codes):
            for start in range(len(run) - n + 1):
                yield run[start:start + n]

    def contaminated(self, text: str) -> bool:
        """True when text shares at least one n-gram with a benchmark text."""
        table = self._ngram_items
        return any(ngram in table for ngram in self._ngrams(text))

    def matches(self, text: str) -> list[str]:
        """Names of the benchmark texts that text overlaps, in benchmark order ([] when none)."""
        table = self._ngram_items
        hit: set[int] = set()
        for ngram in self._ngrams(text):
            if ngram in table:
                hit.update(table[ngram])
        return [self.names[index] for index in sorted(hit)]


def saved_index(folder: Path, humaneval_dir: Path | None, n: int, digest_of: Callable[[Path], str]) -> Decontaminator | None:
    """Decontaminator.from_humaneval, saved in `folder` the first time and read from there after:
    indexing HumanEval-X's 820 items takes about 0.1 s, reading the index back a seventh of that.
    The file's name is a hash of the benchmark files' contents (digest_of), n, the Python version
    (marshal's format) and the source of the code that builds the index, so any change there makes
    a new index. Saved with marshal: plain data, nothing runs when it is read."""
    from mft_core.benchmark import resolve_benchmark

    benchmark = resolve_benchmark(humaneval_dir)
    key = hashlib.sha256(f"{n}:{sys.version_info[:2]}".encode())
    for source in (Path(__file__), Path(__file__).parents[1] / "eval" / "problems.py"):
        key.update(source.read_bytes())
    for language in benchmark.languages:
        key.update(f"{language}:{digest_of(benchmark.data_file(language))}".encode())
    path = folder / f"decontam-{key.hexdigest()[:32]}.marshal"
    try:
        return Decontaminator.read(path)
    except (OSError, EOFError, ValueError, TypeError):  # not saved yet, or damaged: build it again
        pass
    decontaminator = Decontaminator.from_humaneval(humaneval_dir, n=n)
    if decontaminator is not None:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(marshal.dumps(decontaminator.state()))
        os.replace(partial, path)  # whole or not at all, whoever else writes it
        decontaminator.saved_at = path
    return decontaminator
