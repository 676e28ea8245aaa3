"""From a model's completion to a runnable HumanEval-X program, per language.

Two steps, both pure functions so that the generation half can reuse them:

1. `truncate_generation(language, text)`: where a completion ends. Models keep writing after the
   function (tests, a `main`, another problem); those rules cut it back. They are applied to
   every completion before assembly (canonical solutions included, which they leave intact up
   to trailing whitespace). `generation_is_complete` says when generation can stop early, and
   `STOP_SEQUENCES` are literal stop strings that never cut more than the truncation would.

2. `assemble_program(problem, completion)`: the program text and its file name, exactly as
   shared/reference/humaneval-x.md section 3 describes (CodeGeeX's assembly, with the
   corrected Go import rule).

Brace counting (C++, Java, JavaScript, Go) runs over a masked copy of the code in which
comments and string/char/template literals are blanked, so a `"}"` or a `// }` never counts.
Not handled: JavaScript regex literals and C++ raw strings containing braces (rare in
completions; the worst case is a cut in the wrong place, i.e. a failed sample).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mft_core.eval.problems import Problem, normalize_language

# CodeGeeX codegeex/benchmark/utils.py IMPORT_HELPER["python"]: prepended to every program.
PYTHON_PRELUDE = (
    "import math", "import re", "import sys", "import copy", "import datetime",
    "import itertools", "import collections", "import heapq", "import statistics",
    "import functools", "import hashlib", "import numpy", "import numpy as np", "import string",
    "from typing import *", "from collections import *",
)
# CodeGeeX IMPORT_HELPER["cpp"]: each is prepended unless it already appears in the prompt.
CPP_HELPER_INCLUDES = (
    "#include<stdlib.h>", "#include<algorithm>", "#include<math.h>", "#include<stdio.h>",
    "#include<vector>", "#include<string>", "#include<climits>", "#include<cstring>",
    "#include<iostream>",
)
# CodeGeeX IMPORT_HELPER["go"]: packages a completion may use without importing them.
GO_HELPER_PACKAGES = (
    "math", "strings", "fmt", "strconv", "time", "bytes", "regexp", "sort", "math/rand",
    "crypto/md5",
)
GO_ALWAYS_IMPORTED = ("testing", "github.com/stretchr/testify/assert")

# File name of the assembled program per language (Go test files must end in _test.go).
PROGRAM_FILENAMES = {
    "python": "program.py",
    "cpp": "test.cpp",
    "java": "Main.java",
    "js": "test.js",
    "go": "main_test.go",
}

# Braces the prompt leaves open: the function (C++, JS, Go) or class + method (Java).
_OPEN_BRACES_IN_PROMPT = {"cpp": 1, "js": 1, "go": 1, "java": 2}

# Literal stop strings for generation. Each marks, at the start of a line, text the truncation
# below cuts anyway (a new top-level statement or a clashing definition), so stopping there
# does not change the truncated result (unless a function body has such a line unindented).
STOP_SEQUENCES: dict[str, tuple[str, ...]] = {
    "python": ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n@", "\nassert "),
    "cpp": ("\nint main",),
    "java": ("\npublic class Main", "\nclass Main"),
    "js": ("\nconsole.log(", "\nmodule.exports", "\nconst test"),
    "go": ("\nfunc main(", "\nfunc Test", "\npackage "),
}

_CPP_MAIN = re.compile(r"\bint\s+main\s*\(")


# --------------------------------------------------------------------------------------------
# Masking comments and literals

def mask_comments_and_strings(code: str, language: str) -> str:
    """`code` with comments and string/char/template literal contents replaced by spaces.

    Same length as `code` (newlines are kept), so an index in the mask is an index in the code.
    Handles // and /* */ comments, "..." and '...' literals with backslash escapes (ended at a
    newline when unterminated), Java text blocks, and backtick literals (JavaScript templates,
    Go raw strings; a template's ${...} is masked with it).
    """
    out = list(code)
    i, n = 0, len(code)

    def blank(start: int, end: int) -> None:
        for k in range(start, min(end, n)):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = code[i]
        nxt = code[i + 1] if i + 1 < n else ""
        if c == "/" and nxt == "/":
            end = code.find("\n", i)
            end = n if end == -1 else end
            blank(i, end)
            i = end
        elif c == "/" and nxt == "*":
            end = code.find("*/", i + 2)
            end = n if end == -1 else end + 2
            blank(i, end)
            i = end
        elif language == "java" and code.startswith('"""', i):
            end = code.find('"""', i + 3)
            end = n if end == -1 else end + 3
            blank(i + 3, end - 3 if end < n else end)
            i = end
        elif c in "\"'":
            k = i + 1
            while k < n and code[k] != c and code[k] != "\n":
                k += 2 if code[k] == "\\" else 1
            blank(i + 1, k)
            i = k + 1
        elif c == "`" and language in ("js", "go"):
            k = i + 1
            while k < n and code[k] != "`":
                k += 2 if (code[k] == "\\" and language == "js") else 1
            blank(i + 1, k)
            i = k + 1
        else:
            i += 1
    return "".join(out)


def _brace_close_index(masked: str, language: str) -> tuple[int | None, int]:
    """(index just past the brace that closes the prompt's open blocks or None, final depth)."""
    depth = _OPEN_BRACES_IN_PROMPT[language]
    for index, char in enumerate(masked):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1, 0
    return None, depth


# Top-level definitions a completion may add after the function (helpers), per language, and
# the ones it must not add because they clash with the test harness.
_HELPER_DEFINITION = {
    "go": re.compile(r"(?:func|type|var|const)\b"),
    "js": re.compile(r"(?:async\s+function|function|const|let|var|class)\b"),
    "java": re.compile(r"(?:(?:abstract|final)\s+)?(?:class|interface|enum|record)\b"),
}
_CLASHING_DEFINITION = {
    "go": re.compile(r"func\s+(?:main|Test\w*)\s*\(|func\s+init\s*\("),
    "js": re.compile(r"(?:async\s+function|function|const|let|var|class)\s+test"),
    "java": re.compile(r"(?:(?:abstract|final)\s+)?class\s+Main\b"),
}
_OPENERS, _CLOSERS = "({[", ")}]"
_CONTINUATION_CHARS = set("=,+-*/%&|.(:?<>!{[^~")


def _definition_end(masked: str, start: int) -> int | None:
    """End (exclusive) of the top-level definition starting at `start`, None if unfinished.

    It ends at the first newline outside all brackets whose line does not end in a character
    that continues an expression (`=`, `,`, `=>`, an operator, an opening bracket).
    """
    depth = 0
    last_code_char = ""
    for index in range(start, len(masked)):
        char = masked[index]
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
            if depth < 0:
                return None  # closes a block it did not open: not a definition of ours
        if char == "\n" and depth == 0 and last_code_char and last_code_char not in _CONTINUATION_CHARS:
            return index
        if not char.isspace():
            last_code_char = char
    if depth == 0 and last_code_char and last_code_char not in _CONTINUATION_CHARS:
        return len(masked)
    return None


def _scan_braced(text: str, language: str) -> tuple[int | None, bool]:
    """(where a brace-language completion ends or None if the function never closes,
    whether that end is final, i.e. more generated text could not extend it)."""
    masked = mask_comments_and_strings(text, language)
    main = _CPP_MAIN.search(masked) if language == "cpp" else None
    if main:
        masked = masked[:main.start()]
    end, _ = _brace_close_index(masked, language)
    if end is None:
        return (main.start(), True) if main else (None, False)
    if language == "cpp":  # a C++ helper after the function could not be used by it
        return end, True
    keep = position = end
    skip = re.compile(r"[ \t\r\n;]*")
    while True:
        position = skip.match(masked, position).end()
        if position >= len(masked):
            return keep, False
        if _CLASHING_DEFINITION[language].match(masked, position):
            return keep, True
        if not _HELPER_DEFINITION[language].match(masked, position):
            # Any other top-level statement ends the completion; final once its line is known
            # in full (a partial "con" could still become "const").
            return keep, "\n" in masked[position:]
        definition_end = _definition_end(masked, position)
        if definition_end is None:
            return keep, False
        keep = position = definition_end


def truncate_generation(language: str, text: str) -> str:
    """Cut a completion where the problem's code ends. Rules per language:

    - python: keep everything before the first non-empty line that starts without a space or
      tab (a new top-level statement ends the function body; the CodeGeeX rule).
    - cpp: cut at the first `int main` (a completion's own main clashes with the test's), then
      right after the `}` that closes the function the prompt opened (a C++ helper defined
      after the function could not be called from it).
    - java, js, go: keep the function the prompt opened (for Java: class Solution, i.e. two
      braces) up to its closing `}`, then any further top-level helper definitions (Go: func,
      type, var, const; JS: function, const, let, var, class; Java: class, interface, enum,
      record), and cut at the first other top-level statement (`console.log(...)`, a call, a
      `module.exports`), at a definition that clashes with the test harness (Go `func main`,
      `func Test...`; JS names starting with `test`; Java `class Main`), or after the last
      complete helper when the text runs out. Go/72's canonical solution needs such a helper.
    - java repair (CodeGeeX): a completion that closes the method but not the class gets the
      missing `}` appended.
    A completion that never closes the function is returned unchanged (it fails to compile).
    Comments and string literals never count (see `mask_comments_and_strings`).
    """
    language = normalize_language(language)
    if not text:
        return ""
    if language == "python":
        lines = text.splitlines(keepends=True)
        for index, line in enumerate(lines):
            if line.strip() and line[0] not in " \t":
                return "".join(lines[:index])
        return text
    end, _ = _scan_braced(text, language)
    if end is not None:
        return text[:end]
    if language == "java":
        _, depth = _brace_close_index(mask_comments_and_strings(text, language), language)
        if depth == 1:
            return text.rstrip() + "\n}"
    return text


def generation_is_complete(language: str, text: str) -> bool:
    """True when no further generated text could change `truncate_generation(language, text)`.

    Python: a non-indented line has started. C++: the function is closed (or `int main`
    appeared). Java, JS, Go: the function is closed and a top-level statement that is not a
    helper definition (or a clashing definition) has appeared. Callers that want to stop as
    soon as the function itself is closed (cheaper, but loses helpers written after it) can
    use `function_is_closed`.
    """
    language = normalize_language(language)
    if language == "python":
        return any(line.strip() and line[0] not in " \t" for line in text.splitlines())
    return _scan_braced(text, language)[1]


def function_is_closed(language: str, text: str) -> bool:
    """True once the block(s) the prompt opened are closed (always False for Python)."""
    language = normalize_language(language)
    if language == "python":
        return False
    masked = mask_comments_and_strings(text, language)
    return _brace_close_index(masked, language)[0] is not None


# --------------------------------------------------------------------------------------------
# Assembly

@dataclass(frozen=True)
class Program:
    """An assembled program: write `source` to `filename` in the sample's work directory."""

    language: str
    filename: str
    source: str

    @property
    def links_crypto(self) -> bool:
        """C++ needs -lcrypto when it includes OpenSSL (only CPP/162 does)."""
        return self.language == "cpp" and "openssl" in self.source


def assemble_program(problem: Problem, completion: str, truncate: bool = True) -> Program:
    """The full program for `problem` with `completion` (truncated first unless told not to)."""
    language = problem.language
    if truncate:
        completion = truncate_generation(language, completion)
    if language == "python":
        source = ("\n".join(PYTHON_PRELUDE) + "\n" + problem.prompt + completion + "\n"
                  + problem.test + "\n")
    elif language == "cpp":
        helpers = "".join(f"{include}\n" for include in CPP_HELPER_INCLUDES
                          if include not in problem.prompt)
        source = helpers + "\n" + problem.prompt + completion + "\n" + problem.test
    elif language in ("java", "js"):
        source = problem.prompt + completion + "\n" + problem.test
    elif language == "go":
        source = assemble_go_source(problem, completion)
    else:  # normalize_language guards this; kept for a clear message
        raise ValueError(f"no assembly rule for language {language!r}")
    return Program(language=language, filename=PROGRAM_FILENAMES[language], source=source)


_GO_IMPORT_SPEC = re.compile(r'^\s*(?:[A-Za-z_.][\w]*\s+)?"([^"]+)"\s*$')


def go_import_paths(import_text: str) -> list[str]:
    """Package paths in Go import declarations (`import "x"`, `import (...)`), in order."""
    paths = []
    for raw in import_text.splitlines():
        line = raw.strip()
        if line.startswith("import"):
            line = line[len("import"):].strip()
        line = line.strip("()").strip()
        match = _GO_IMPORT_SPEC.match(line)
        if match and match.group(1) not in paths:
            paths.append(match.group(1))
    return paths


def split_go_header(code: str) -> tuple[str, str]:
    """(the leading package clause and import declarations, the rest of the code)."""
    pattern = re.compile(r'\s*(?:package\s+\w+[^\n]*\n'
                         r'|import\s*\([^)]*\)[^\n]*(?:\n|$)'
                         r'|import\s+(?:[A-Za-z_.]\w*\s+)?"[^"]*"[^\n]*(?:\n|$))')
    position = 0
    while True:
        match = pattern.match(code, position)
        if not match or match.end() == position:
            break
        position = match.end()
    return code[:position], code[position:]


def go_short_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def assemble_go_source(problem: Problem, completion: str) -> str:
    """`package main`, one import block, the prompt without its imports, completion, test.

    Import candidates: test_setup's imports, the problem's `import` field and CodeGeeX's helper
    packages. `testing` and testify are always kept; every other candidate is kept exactly when
    its short name followed by `.` occurs outside comments and strings of prompt + completion +
    test. This fixes CodeGeeX's rule, which only searched the completion (tests using math or
    strconv failed to compile), took imports test_setup has but nobody uses ("imported and not
    used"), and matched "math" inside "math/rand".
    """
    test_setup = problem.extra.get("test_setup", "")
    setup_header, setup_rest = split_go_header(test_setup)
    prompt_header, prompt_body = split_go_header(problem.prompt)
    candidates: list[str] = []
    for path in (*GO_ALWAYS_IMPORTED, *go_import_paths(setup_header),
                 *go_import_paths(problem.extra.get("import", "")),
                 *go_import_paths(prompt_header), *GO_HELPER_PACKAGES):
        if path not in candidates:
            candidates.append(path)
    body = setup_rest + prompt_body + completion + "\n" + problem.test
    masked = mask_comments_and_strings(body, "go")
    used = [path for path in candidates
            if path in GO_ALWAYS_IMPORTED
            or re.search(rf"(?<![\w.]){re.escape(go_short_name(path))}\.", masked)]
    imports = "".join(f'    "{path}"\n' for path in used)
    return f"package main\n\nimport (\n{imports})\n" + body
