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
import secrets
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
    """The full program for `problem` with `completion` (truncated first unless told not to),
    with the completion-marker harness (see MARKER_FD): it prints the marker only after the
    problem's last test has passed."""
    language = problem.language
    if truncate:
        completion = truncate_generation(language, completion)
    suffix = secrets.token_hex(4)  # harness names no completion can know in advance
    if language == "python":
        source = (_python_marker_head(suffix) + "\n".join(PYTHON_PRELUDE) + "\n" + problem.prompt + completion
                  + "\n" + problem.test + "\n" + _python_marker_tail(suffix))
    elif language == "cpp":
        helpers = "".join(f"{include}\n" for include in CPP_HELPER_INCLUDES
                          if include not in problem.prompt)
        source = (_cpp_marker_head(suffix) + helpers + "\n" + problem.prompt + completion + "\n"
                  + f"#define main mft_test_main_{suffix}\n" + problem.test + "\n" + _cpp_marker_tail(suffix))
    elif language == "java":
        test, renamed = _JAVA_TEST_CLASS.subn(f"class MftTest_{suffix}", problem.test, count=1)
        if not renamed:
            raise ValueError(f"{problem.task_id}: the test has no `public class Main` to run")
        source = problem.prompt + completion + "\n" + test + "\n" + _java_marker_main(suffix)
    elif language == "js":
        source = (_js_marker_head(suffix) + problem.prompt + completion + "\n" + problem.test + "\n"
                  + _js_marker_tail(suffix))
    elif language == "go":
        source = _with_go_marker(assemble_go_source(problem, completion), suffix)
    else:  # normalize_language guards this; kept for a clear message
        raise ValueError(f"no assembly rule for language {language!r}")
    return Program(language=language, filename=PROGRAM_FILENAMES[language], source=source)


# --------------------------------------------------------------------------------------------
# The completion marker. A program that exits with status 0 has not necessarily passed: a
# completion can exit early (`os._exit(0)`, `System.exit(0)`, `process.exit(0)`, `_exit(0)`, a Go
# `TestMain` that never calls m.Run) before any test ran. So a pass needs positive evidence: the
# runner writes a fresh random marker into the program's descriptor MARKER_FD (a pipe: the marker
# is never in the source, the argv or the environment); the harness reads it before any code of
# the completion can run (the first statement, the first static initializer, the first package
# variable; Java's Main class initializes before Solution) and prints it as the program's last
# line only after the last test has passed. What a determined completion could still do is to
# find the marker in the process's own memory (Python's gc or frames, Java reflection on Main,
# scanning C++'s data segment, reading the variable in JavaScript or Go by guessing nothing:
# the names carry a random suffix) and print it; the README says so.

MARKER_FD = 3


def _python_marker_head(suffix: str) -> str:
    return (f"import os as _mft_os_{suffix}\n"
            f"_mft_marker_{suffix} = _mft_os_{suffix}.read({MARKER_FD}, 256)\n")


def _python_marker_tail(suffix: str) -> str:
    # sys.exit inside check() raises SystemExit: the line below never runs, and there is no marker.
    return (f"import sys as _mft_sys_{suffix}\n_mft_sys_{suffix}.stdout.flush()\n"
            f"_mft_os_{suffix}.write(1, b'\\n' + _mft_marker_{suffix} + b'\\n')\n")


def _cpp_marker_head(suffix: str) -> str:
    # A namespace-scope variable initialized first in the translation unit: before any static
    # initializer of the completion.
    return ("#include <cstdio>\n#include <iostream>\n#include <unistd.h>\n"
            f"static char mft_marker_{suffix}[256];\n"
            f"static const long mft_marker_length_{suffix} = read({MARKER_FD}, mft_marker_{suffix}, 256);\n")


def _cpp_marker_tail(suffix: str) -> str:
    # The test's main is mft_test_main_<suffix>: it returns only when every assert held. Its value
    # is not used (falling off a non-main int function is undefined).
    return (f"#undef main\nint main() {{\n    mft_test_main_{suffix}();\n"
            f"    std::cout.flush();\n    std::fflush(stdout);\n    if (mft_marker_length_{suffix} > 0) {{\n"
            f"        write(1, \"\\n\", 1);\n        write(1, mft_marker_{suffix}, mft_marker_length_{suffix});\n"
            f"        write(1, \"\\n\", 1);\n    }}\n    return 0;\n}}\n")


_JAVA_TEST_CLASS = re.compile(r"\bpublic\s+class\s+Main\b")


def _java_marker_main(suffix: str) -> str:
    return (f"public class Main {{\n"
            f"    private static final byte[] mftMarker_{suffix} = mftReadMarker_{suffix}();\n\n"
            f"    private static byte[] mftReadMarker_{suffix}() {{\n"
            f"        // A read loop: readAllBytes seeks, and a pipe cannot\n"
            f"        try (java.io.InputStream in = new java.io.FileInputStream(\"/proc/self/fd/{MARKER_FD}\")) {{\n"
            f"            java.io.ByteArrayOutputStream marker = new java.io.ByteArrayOutputStream();\n"
            f"            byte[] buffer = new byte[256];\n"
            f"            for (int n; (n = in.read(buffer)) > 0; ) marker.write(buffer, 0, n);\n"
            f"            return marker.toByteArray();\n"
            f"        }} catch (java.io.IOException e) {{\n            return new byte[0];\n        }}\n    }}\n\n"
            f"    public static void main(String[] args) throws Exception {{\n"
            f"        MftTest_{suffix}.main(args);\n        System.out.flush();\n"
            f"        if (mftMarker_{suffix}.length > 0) {{\n            System.out.write('\\n');\n"
            f"            System.out.write(mftMarker_{suffix});\n            System.out.write('\\n');\n"
            f"            System.out.flush();\n        }}\n    }}\n}}\n")


def _js_marker_head(suffix: str) -> str:
    return f"const mftMarker_{suffix} = require('fs').readFileSync({MARKER_FD});\n"


def _js_marker_tail(suffix: str) -> str:
    return f"process.stdout.write(mftMarker_{suffix}.toString() + '\\n');\n"


def _with_go_marker(source: str, suffix: str) -> str:
    """The marker as the first package variable (initialized before any of the completion's) and
    a TestMain that prints it after m.Run() passed; m.Run prints PASS just before. A completion
    with its own TestMain does not compile."""
    header, body = split_go_header(source)
    if '"os"' not in header:
        header = header.replace("import (\n", 'import (\n    "os"\n', 1)
    harness = (f"var mftMarker_{suffix} = func() []byte {{\n"
               f"    f := os.NewFile({MARKER_FD}, \"marker\")\n    if f == nil {{\n        return nil\n    }}\n"
               f"    defer f.Close()\n    b := make([]byte, 256)\n    n, _ := f.Read(b)\n    return b[:n]\n}}()\n\n"
               f"func TestMain(m *testing.M) {{\n    code := m.Run()\n"
               f"    if code == 0 && len(mftMarker_{suffix}) > 0 {{\n"
               f"        os.Stdout.Write(append(append([]byte(\"\\n\"), mftMarker_{suffix}...), '\\n'))\n    }}\n"
               f"    os.Exit(code)\n}}\n\n")
    return header + harness + body


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
