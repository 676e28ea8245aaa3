"""The embedded demo data set: three code tasks and a preference task mined from the installed Python stdlib.

``build_demo_data`` walks the standard library of the running interpreter, takes every
module-level function and method that has a real docstring, and turns each into records of
three tasks in MFTCoder's chatML format (reference/mftcoder.md §1.1), one JSONL file per task:

- text-to-code: the docstring and the signature -> the whole function;
- code-completion: the signature, the docstring and 0+ first body lines -> the rest, verbatim
  (human prompt text + bot answer is exactly the function's source, HumanEval style);
- docstring-generation: the function without its docstring -> the docstring text.

- code-preference (for the align stage): a text-to-code prompt; chosen: the function; rejected:
  a broken variant that still parses (a `return` without its value, two lines swapped, a wrong
  name), in MFTCoder's preference format.

Every task draws from its own share of the functions (a seeded shuffle dealt round-robin), so
no function's docstring is both an input in one task and a target in another. Records that
overlap HumanEval / HumanEval-X are dropped (decontam.py) and counted in demo_stats.json.

Deterministic: files are read in sorted order, every random choice comes from an RNG seeded
from ``seed`` (string seeds are hashed with SHA-512, not with Python's randomized hash), and JSON
is written with fixed settings, so the same Python version (the same stdlib) and the
same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import platform
import random
import sys
import sysconfig
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

from mft_core.data.decontam import DEFAULT_NGRAM, Decontaminator, load_benchmark_items

log = logging.getLogger(__name__)

TASKS = ("text-to-code", "code-completion", "docstring-generation")

# Path components that are never mined: test suites (they are mostly assertions, and
# lib2to3's test data is deliberately unparseable), IDLE's GUI code, third-party packages.
EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})

# Size limits, so that a record fits a 1024-token training sequence. SmolLM2's tokenizer gives
# 3.7 characters per token on these records (measured on the full build, with MFTCoder's role
# markers: longest record 842 tokens, 99th percentile 641); MAX_RECORD_CHARS (system + human +
# bot) stays under 1024 tokens even at 3 characters per token. The function and docstring
# limits are what actually bind: with them no record reaches MAX_RECORD_CHARS.
MAX_FUNCTION_CHARS = 1800
MAX_FUNCTION_LINES = 60
MAX_RECORD_CHARS = 3000
# A docstring must say something: "Return self." or "Deprecated." teach nothing.
MIN_DOCSTRING_CHARS = 30
MIN_DOCSTRING_WORDS = 5
MAX_DOCSTRING_CHARS = 700
# The body after the docstring must have some substance for completion to make sense.
MIN_BODY_LINES = 1

# Probability that a completion prompt stops right after the docstring (exactly the shape of
# a HumanEval prompt); otherwise it also shows some first body lines.
COMPLETION_AFTER_DOCSTRING = 0.35

SYSTEM_PROMPT = (
    "You are a helpful programming assistant. You write correct, idiomatic Python "
    "and explain code accurately."
)

# Instruction wordings, picked per record by the seeded RNG. {name}, {context}, {docstring},
# {signature}, {code} are filled in; code stays in ```python fences.
TEXT_TO_CODE_PROMPTS = (
    "Write a Python function `{name}`{context}.\n\nWhat it must do:\n{docstring}\n\n"
    "Use this signature:\n```python\n{signature}\n```",
    "Implement the following Python function{context}. Its documentation says:\n\n"
    "{docstring}\n\nSignature:\n```python\n{signature}\n```",
    "I need `{name}`{context} written in Python.\n\n{docstring}\n\n"
    "Start from:\n```python\n{signature}\n```\nPlease give the complete function, "
    "docstring included.",
    "Complete the implementation of this function{context}:\n\n```python\n{signature}\n```\n\n"
    "Requirements:\n{docstring}",
)
# Completion prompts are a header line, a blank line, then the code prefix verbatim: the bot
# answer continues it directly, as a HumanEval completion does.
CODE_COMPLETION_HEADERS = (
    "Complete the following Python code.",
    "Continue this Python function. Reply with the remaining code only.",
    "# language: Python",
    "Finish the implementation below{context}.",
)
DOCSTRING_PROMPTS = (
    "Write a docstring for the following Python function{context}:\n\n```python\n{code}\n```",
    "What does this function do? Answer in the form of its docstring.\n\n"
    "```python\n{code}\n```",
    "Document this Python code{context}. Reply with the docstring text only.\n\n"
    "```python\n{code}\n```",
    "```python\n{code}\n```\n\nGenerate the docstring for `{name}`.",
)


@dataclass(frozen=True)
class MinedFunction:
    """One documented function from the stdlib, dedented, in the pieces the tasks need."""

    module: str          # "json.decoder"
    qualname: str        # "JSONDecoder.decode" or "dumps"
    name: str
    source: str          # whole function, decorators included, dedented, no trailing newline
    signature: str       # decorators + "def ...:" header lines
    docstring: str       # cleaned (inspect.cleandoc) and stripped docstring text
    head_lines: int      # number of source lines up to and including the docstring
    without_docstring: str  # source with the docstring statement removed

    @property
    def context(self) -> str:
        """Where the function lives, for the instruction text."""
        if "." in self.qualname:
            owner = self.qualname.rsplit(".", 1)[0]
            return f" (a method of class `{owner}` in module `{self.module}`)"
        return f" (from module `{self.module}`)"


def stdlib_dir() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_source_files(root: Path) -> list[Path]:
    """Sorted *.py files under root, minus tests, IDLE and site-packages."""
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(relative.parts[:-1]):
            continue
        if relative.name.startswith("test_"):
            continue
        files.append(path)
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or relative.stem


def _documented_defs(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualname, node) for module-level functions and methods of (nested) classes.

    Functions nested in functions are skipped: they depend on their enclosing scope.
    """
    found = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((prefix + node.name, node))
            elif isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, "")
    return found


def _dedent(lines: list[str], indent: int) -> list[str] | None:
    """Strip the def line's `indent` leading columns from every line, and trailing blanks.

    None when a non-blank line does not start with that indentation (e.g. a multi-line string
    whose lines start at column 0): such a function cannot be dedented without changing it.
    """
    prefix = lines[0][:indent]
    if prefix.strip():
        return None
    out = []
    for line in lines:
        if not line.strip():
            out.append("")
        elif line.startswith(prefix):
            out.append(line[indent:].rstrip())
        else:
            return None
    return out


def _is_placeholder(statements: list[ast.stmt]) -> bool:
    """A body that only says "not implemented here": pass, ..., raise NotImplementedError."""
    if len(statements) != 1:
        return False
    statement = statements[0]
    if isinstance(statement, ast.Pass):
        return True
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        return statement.value.value is Ellipsis
    if isinstance(statement, ast.Raise) and statement.exc is not None:
        exc = statement.exc.func if isinstance(statement.exc, ast.Call) else statement.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _usable_docstring(docstring: str | None) -> bool:
    """A real docstring: says something, and is not a whole manual page."""
    return (
        docstring is not None
        and MIN_DOCSTRING_CHARS <= len(docstring.strip()) <= MAX_DOCSTRING_CHARS
        and len(docstring.split()) >= MIN_DOCSTRING_WORDS
    )


def mine_function(
    source_lines: list[str],
    node: ast.FunctionDef | ast.AsyncFunctionDef,
    module: str,
    qualname: str,
) -> MinedFunction | None:
    """The function as a MinedFunction, or None when it does not make a good sample."""
    body = node.body
    if not _usable_docstring(ast.get_docstring(node)) or len(body) < 2 or _is_placeholder(body[1:]):
        return None  # no real docstring, nothing but a docstring, or an abstract placeholder
    doc_node, first_statement = body[0], body[1]
    # The docstring must sit on its own lines: after the header, before the next statement.
    if doc_node.lineno <= node.lineno or first_statement.lineno <= doc_node.end_lineno:
        return None
    start = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
    # ast line numbers are 1-based and count only "\n" (sources are read with universal
    # newlines), so a plain split matches them; the decorators' "@" lines precede node.lineno.
    span = source_lines[start - 1:node.end_lineno]
    if len(span) > MAX_FUNCTION_LINES:
        return None
    lines = _dedent(span, node.col_offset)
    if lines is None or "```" in "\n".join(lines):
        return None
    head = doc_node.end_lineno - start + 1          # lines up to the docstring's last line
    doc_first = doc_node.lineno - start             # index of the docstring's first line
    signature = "\n".join(lines[:doc_first]).rstrip()
    body_lines = [line for line in lines[head:] if line.strip()]
    if not signature.endswith(":") or len(body_lines) < MIN_BODY_LINES:
        return None
    source = "\n".join(lines).rstrip()
    if len(source) > MAX_FUNCTION_CHARS:
        return None
    rest = lines[head:]
    while rest and not rest[0].strip():
        rest = rest[1:]  # the blank line that usually follows a docstring goes with it
    without_docstring = "\n".join(lines[:doc_first] + rest).rstrip()
    # The dedented pieces must still be valid Python defining this one function.
    parsed = []
    for code in (source, without_docstring):
        try:
            tree = ast.parse(code)
        except SyntaxError:
            return None
        if len(tree.body) != 1 or getattr(tree.body[0], "name", None) != node.name:
            return None
        parsed.append(tree.body[0])
    if ast.get_docstring(parsed[1]) is not None:
        return None  # the next statement is a string literal that would become the docstring
    # Taken from the dedented code, so it is exactly the docstring the records show; cleandoc
    # can leave trailing blanks ('"""Text.\n    """'), hence strip().
    docstring = ast.get_docstring(parsed[0], clean=True).strip()
    if not _usable_docstring(docstring):
        return None
    return MinedFunction(
        module=module,
        qualname=qualname,
        name=node.name,
        source=source,
        signature=signature,
        docstring=docstring,
        head_lines=head,
        without_docstring=without_docstring,
    )


def mine_functions(root: Path) -> tuple[list[MinedFunction], dict[str, int]]:
    """Every usable documented function under root, in file and source order, plus counts."""
    functions: list[MinedFunction] = []
    counts = {"files_scanned": 0, "files_unparseable": 0, "functions_seen": 0}
    for path in iter_source_files(root):
        counts["files_scanned"] += 1
        try:
            with tokenize.open(path) as handle:  # honours coding cookies
                source = handle.read()
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            counts["files_unparseable"] += 1
            continue
        source_lines = source.split("\n")
        module = _module_name(path.relative_to(root))
        for qualname, node in _documented_defs(tree):
            counts["functions_seen"] += 1
            mined = mine_function(source_lines, node, module, qualname)
            if mined is not None:
                functions.append(mined)
    return functions, counts


# ----------------------------------------------------------------------------- rendering


def _chat_record(record_id: int, task: str, human: str, bot: str) -> dict:
    return {
        "id": record_id,
        "data_name": task,
        "chat_rounds": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "human", "content": human},
            {"role": "bot", "content": bot},
        ],
    }


def render_text_to_code(function: MinedFunction, rng: random.Random) -> tuple[str, str]:
    """(human, bot): docstring + signature -> the whole function in a python fence."""
    human = rng.choice(TEXT_TO_CODE_PROMPTS).format(
        name=function.name,
        context=function.context,
        docstring=function.docstring,
        signature=function.signature,
    )
    return human, f"```python\n{function.source}\n```"


def render_code_completion(function: MinedFunction, rng: random.Random) -> tuple[str, str]:
    """(human, bot): header, blank line, code prefix -> the rest of the function, verbatim.

    The prefix ends after the docstring (the HumanEval prompt shape) or after some first body
    lines; it always ends with a newline and the answer starts on a non-blank line, so
    prefix + answer == function.source.
    """
    lines = function.source.split("\n")
    # Candidate split points: indices of non-blank lines after the docstring.
    splits = [index for index in range(function.head_lines, len(lines)) if lines[index].strip()]
    if len(splits) == 1 or rng.random() < COMPLETION_AFTER_DOCSTRING:
        split = splits[0]
    else:
        split = rng.choice(splits[1:])
    prefix = "\n".join(lines[:split]) + "\n"
    header = rng.choice(CODE_COMPLETION_HEADERS).format(context=function.context)
    return f"{header}\n\n{prefix}", "\n".join(lines[split:])


def render_docstring_generation(function: MinedFunction, rng: random.Random) -> tuple[str, str]:
    """(human, bot): the function without its docstring -> the docstring text."""
    human = rng.choice(DOCSTRING_PROMPTS).format(
        name=function.name, context=function.context, code=function.without_docstring
    )
    return human, function.docstring


RENDERERS = {
    "text-to-code": render_text_to_code,
    "code-completion": render_code_completion,
    "docstring-generation": render_docstring_generation,
}


# ----------------------------------------------------------------------------- the preference task
# A small preference task for the align stage (data.tasks[].kind: preference): the text-to-code
# prompt of a function; chosen: the function; rejected: a broken variant that still parses. The
# pair is packed whole into one training row, so both sides together must fit 1024 tokens.

PREFERENCE_TASK = "code-preference"
PREFERENCE_PAIRS = 400
MAX_PREFERENCE_SIDE_CHARS = 1700  # system + prompt + answer of one side (~460 tokens at 3.7 chars/token)


def _body_statement_lines(function: MinedFunction) -> list[int]:
    """Indices (in source lines) of the one-line statements directly in the function's body, after its docstring."""
    tree = ast.parse(function.source).body[0]  # the source starts at line 1 (decorators included)
    return [statement.lineno - 1 for statement in tree.body[1:] if statement.lineno == statement.end_lineno]


def corrupt_function(function: MinedFunction, rng: random.Random) -> tuple[str, str] | None:
    """(kind, broken source) of a variant that still parses but is wrong: the value of a `return`
    dropped, two adjacent one-line statements swapped, or the function under another name."""
    lines = function.source.split("\n")
    candidates: list[tuple[str, list[str]]] = []
    returns = [i for i in range(function.head_lines, len(lines)) if lines[i].lstrip().startswith("return ")]
    if returns:
        i = rng.choice(returns)
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        candidates.append(("missing_return", lines[:i] + [indent + lines[i].lstrip()[len("return "):]] + lines[i + 1:]))
    singles = _body_statement_lines(function)
    adjacent = [(a, b) for a, b in zip(singles, singles[1:]) if b == a + 1 and lines[a].strip() != lines[b].strip()]
    if adjacent:
        a, b = rng.choice(adjacent)
        candidates.append(("swapped_lines", lines[:a] + [lines[b], lines[a]] + lines[b + 1:]))
    rng.shuffle(candidates)
    # A wrong name (the prompt gives the signature) only where the code offers no other breakage.
    renamed = function.source.replace(f"def {function.name}(", f"def {function.name}_2(", 1)
    candidates.append(("wrong_name", renamed.split("\n")))
    for kind, broken_lines in candidates:
        broken = "\n".join(broken_lines)
        if broken == function.source:
            continue
        try:
            ast.parse(broken)
        except SyntaxError:
            continue
        return kind, broken
    return None


def preference_record(human: str, chosen: str, rejected: str) -> dict:
    """MFTCoder's preference format: two chat conversations that differ in their last turn."""
    turns = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": human}]
    return {"chosen": turns + [{"role": "assistant", "content": chosen}],
            "rejected": turns + [{"role": "assistant", "content": rejected}]}


# ----------------------------------------------------------------------------- building


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """Write atomically: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    partial.replace(path)


def build_demo_data(
    out_dir: Path,
    per_task: int = 3000,
    seed: int = 0,
    humaneval_dir: Path | None = None,
    source_dir: Path | None = None,
    max_contaminated_examples: int = 10,
) -> dict:
    """Mine the demo tasks into out_dir/<task>/data.jsonl and out_dir/demo_stats.json.

    source_dir: where to mine (default: the running interpreter's stdlib). humaneval_dir: the
    decontamination reference (default: the benchmark mft_core/benchmark.py resolves, the Python
    fallback included); when there is none the data is written undecontaminated, with a warning
    and "enabled": false in stats.

    Each function goes to exactly one task (seeded shuffle, dealt round-robin), so a task gets
    at most a third of the usable functions: about 1600 each from the CPython 3.11 stdlib.
    Returns the stats written to demo_stats.json plus "build_seconds" (kept out of the file
    so that the file is byte-identical between builds too).
    """
    if per_task < 1:
        raise ValueError(f"per_task must be >= 1, got {per_task}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    root = Path(source_dir) if source_dir is not None else stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"source directory {root} does not exist; pass a directory of .py files")

    benchmark = load_benchmark_items(humaneval_dir)
    decontaminator = None
    if benchmark:
        decontaminator = Decontaminator(
            [text for _, text in benchmark], n=DEFAULT_NGRAM, names=[name for name, _ in benchmark]
        )
    else:
        log.warning(
            "no benchmark data at all (`mft data humaneval-x` downloads HumanEval-X): "
            "the demo data is NOT decontaminated"
        )

    functions, counts = mine_functions(root)
    rng = random.Random(seed)
    order = list(range(len(functions)))
    rng.shuffle(order)

    task_stats: dict[str, dict] = {}
    for task_index, task in enumerate(TASKS):
        # A separate RNG per task: the wording of one task does not depend on another's size.
        task_rng = random.Random(f"{seed}:{task}")
        render = RENDERERS[task]
        records: list[dict] = []
        stats = {"records": 0, "candidates": 0, "too_long": 0, "contaminated": 0,
                 "contaminated_examples": []}
        # All candidates are rendered and checked (not only the first per_task) so the
        # contaminated count describes the whole source, independent of per_task.
        for function_index in order[task_index::len(TASKS)]:
            function = functions[function_index]
            human, bot = render(function, task_rng)
            stats["candidates"] += 1
            if len(SYSTEM_PROMPT) + len(human) + len(bot) > MAX_RECORD_CHARS:
                stats["too_long"] += 1
                continue
            if decontaminator is not None:
                matched = decontaminator.matches(human + "\n" + bot)
                if matched:
                    stats["contaminated"] += 1
                    if len(stats["contaminated_examples"]) < max_contaminated_examples:
                        stats["contaminated_examples"].append(
                            {"function": f"{function.module}.{function.qualname}", "matches": matched}
                        )
                    continue
            if len(records) < per_task:
                records.append(_chat_record(len(records), task, human, bot))
        stats["records"] = len(records)
        _write_jsonl(out_dir / task / "data.jsonl", records)
        task_stats[task] = stats
        if len(records) < per_task:
            log.info("%s: %d records (fewer than the %d asked: the source has no more)",
                     task, len(records), per_task)

    # The preference task: functions of text-to-code's share (its prompts, a wording of their own).
    preference_rng = random.Random(f"{seed}:{PREFERENCE_TASK}")
    pairs: list[dict] = []
    preference_stats = {"pairs": 0, "candidates": 0, "too_long": 0, "contaminated": 0, "kinds": {}}
    for function_index in order[0::len(TASKS)]:
        if len(pairs) >= min(per_task, PREFERENCE_PAIRS):
            break
        function = functions[function_index]
        human, chosen = render_text_to_code(function, preference_rng)
        broken = corrupt_function(function, preference_rng)
        preference_stats["candidates"] += 1
        if broken is None:
            continue
        rejected = f"```python\n{broken[1]}\n```"
        if len(SYSTEM_PROMPT) + len(human) + max(len(chosen), len(rejected)) > MAX_PREFERENCE_SIDE_CHARS:
            preference_stats["too_long"] += 1
            continue
        if decontaminator is not None and decontaminator.matches(human + "\n" + chosen + "\n" + rejected):
            preference_stats["contaminated"] += 1
            continue
        pairs.append(preference_record(human, chosen, rejected))
        preference_stats["kinds"][broken[0]] = preference_stats["kinds"].get(broken[0], 0) + 1
    preference_stats["pairs"] = len(pairs)
    preference_stats["kinds"] = dict(sorted(preference_stats["kinds"].items()))
    _write_jsonl(out_dir / PREFERENCE_TASK / "data.jsonl", pairs)

    result = {
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "source_dir": str(root),
        "seed": seed,
        "per_task": per_task,
        **counts,
        "functions_usable": len(functions),
        "decontamination": {
            "enabled": decontaminator is not None,
            "benchmark_items": len(benchmark),
            "ngram": DEFAULT_NGRAM,
        },
        "tasks": task_stats,
        "preference": {PREFERENCE_TASK: preference_stats},
    }
    stats_path = out_dir / "demo_stats.json"
    stats_path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    result["build_seconds"] = round(time.perf_counter() - started, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    """python -m mft_core.data.demo --out DIR [--per-task N] [--seed S] [--source-dir D] [--humaneval-dir D]"""
    parser = argparse.ArgumentParser(
        prog="python -m mft_core.data.demo",
        description="Mine the demo tasks (MFTCoder chatML JSONL) from the Python standard library.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (one sub-directory per task)")
    parser.add_argument("--per-task", type=int, default=3000, help="records per task at most (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source-dir", type=Path, default=None,
                        help="directory of Python sources to mine (default: this interpreter's stdlib)")
    parser.add_argument("--humaneval-dir", type=Path, default=None,
                        help="HumanEval-X directory for decontamination (default: as the pipeline "
                             "resolves it, see mft_core/benchmark.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    stats = build_demo_data(args.out, per_task=args.per_task, seed=args.seed,
                            humaneval_dir=args.humaneval_dir, source_dir=args.source_dir)
    for task, task_stats in stats["tasks"].items():
        print(f"{task:22s} records={task_stats['records']:5d} candidates={task_stats['candidates']:5d} "
              f"contaminated={task_stats['contaminated']:3d} too_long={task_stats['too_long']:3d}")
    print(f"{stats['files_scanned']} files scanned, Python {stats['python_version']}, "
          f"{stats['build_seconds']:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
