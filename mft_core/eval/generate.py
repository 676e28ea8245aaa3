"""HumanEval-X generation: prompts, batched Hugging Face generation with per-language stop rules,
and the code a model's answer contributes.

Prompt modes (what the model is given, `render_prompt_for`):
- `completion`: the raw HumanEval-X prompt, encoded with the tokenizer's default special tokens
  (a BOS where the tokenizer adds one), and the model continues it. For base models.
- `chat`: the training rendering (mft_core/data/render.py `render_prompt`, the tokenize stage's
  template) around one user turn, `CHAT_INSTRUCTION`: "Complete the following {Language}
  code." + a blank line + the prompt verbatim. This is the header and the shape of the demo
  data's code-completion task (mft_core/data/demo.py), whose answers continue the prompt
  directly, so a model fine-tuned on it sees its training format. No system turn: the
  pipeline does not know which system prompt, if any, training used.
The rendered prompt (decoded from the exact ids the model saw) is stored with every generation.

From a chat answer to a completion (`extract_chat_completion`), in this order:
1. Fence: if a line starting with ``` occurs, the code is what follows that line up to the
   next line starting with ``` (or the end of the answer); otherwise the whole answer.
2. Alignment: the prompt's function is found by name (Python: the last `def` of the prompt;
   other languages: the function whose `{` the prompt leaves open). If the code declares it
   again (Python: `def name(`; others: `name` preceded on its line only by type and modifier
   words, so `return f(x)` and `x = f(y)` are calls, then parameters (JS also `= (...) =>` or
   `= function`) and a body `{` before any `;`, so a prototype is skipped), the completion is
   what follows the declaration: for Python the lines after the signature (which may span
   lines), for the brace languages the text after the body's `{` (from the next line when the
   rest of its line is blank). A leading repeat of what the prompt has after its declaration
   (the docstring or comment), compared ignoring whitespace, is dropped too; a rewritten
   docstring stays (harmless). Anything before the declaration (imports, the class line,
   repeated helpers) is dropped: the prompt has it.
3. Without a declaration the code is taken as the function's continuation; Python code whose
   first line starts at column 0 is then indented by four spaces (a body written flush left).
The per-language truncation (assemble.truncate_generation) is applied last, as for
completions.

Stop rules: generation of a row ends at EOS, at `max_new_tokens`, or as soon as more text could
not change the result (`StopWhenComplete`): in completion mode when
assemble.generation_is_complete holds for the text so far (it covers every STOP_SEQUENCES
string); in chat mode when the first fenced block is closed, or when the answer is code (a
fence is open, the declaration was found, or it starts indented) and the extracted completion
is complete. The stored `generation` is the truncated completion; `raw` is the decoded answer.

Sampling (temperature > 0) is exact temperature + top-p sampling done as Gumbel-max on top of
greedy search (`SeededSampling`): each sample draws its noise from its own generator, seeded
from (seed, task id, sample index). So a sample does not depend on which other rows share its
batch, and a resumed run reproduces exactly what an uninterrupted one would have generated.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import GenerationConfig, LogitsProcessor

from mft_core.data.render import Template, render_prompt
from mft_core.eval.assemble import generation_is_complete, mask_comments_and_strings, truncate_generation
from mft_core.eval.problems import Problem

log = logging.getLogger("mft.evaluate")

PROMPT_MODES = ("completion", "chat")
LANGUAGE_NAMES = {"python": "Python", "cpp": "C++", "java": "Java", "js": "JavaScript", "go": "Go"}
CHAT_INSTRUCTION = "Complete the following {language} code.\n\n{prompt}"
STOP_REASONS = ("eos", "complete", "max_new_tokens")


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class GenerationSettings:
    """How many samples per problem and how they are decoded (the evaluate config's keys)."""

    samples_per_problem: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 384
    batch_size: int = 8
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.samples_per_problem < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"samples_per_problem, max_new_tokens and batch_size must be >= 1: {self}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1: {self}")
        if self.temperature == 0 and self.samples_per_problem > 1:
            raise ValueError("temperature 0 is greedy decoding: every sample would be the same; "
                             "set samples_per_problem 1 or a temperature > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_seed(seed: int, task_id: str, sample_index: int) -> int:
    """The seed of one sample's noise: a hash, so that nearby seeds give unrelated streams."""
    digest = hashlib.sha256(f"{seed}\0{task_id}\0{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class RenderedPrompt:
    text: str  # the ids decoded, special tokens included: exactly what the model saw
    ids: list[int]


def chat_instruction(problem: Problem) -> str:
    return CHAT_INSTRUCTION.format(language=LANGUAGE_NAMES[problem.language], prompt=problem.prompt)


def render_prompt_for(problem: Problem, mode: str, tokenizer, template: Template | None = None,
                      eos_id: int | None = None) -> RenderedPrompt:
    """The prompt of `problem` in `mode` ('completion' or 'chat'); chat needs the training template."""
    if mode == "completion":
        ids = list(tokenizer(problem.prompt)["input_ids"])
    elif mode == "chat":
        if template is None:
            raise ValueError("chat prompts need the training template (template.json of the tokenize stage, "
                             "or TokenizerChatTemplate for the model tokenizer's own chat template)")
        ids = render_prompt([{"role": "user", "content": chat_instruction(problem)}], tokenizer, template, eos_id)
    else:
        raise ValueError(f"unknown prompt mode {mode!r}; expected one of {', '.join(PROMPT_MODES)}")
    return RenderedPrompt(tokenizer.decode(ids, skip_special_tokens=False), ids)


# ----------------------------------------------------------------------------- chat answers -> completions

_FENCE_LINE = re.compile(r"[ \t]*```")
_PY_DEF = r"^[ \t]*(?:async[ \t]+)?def[ \t]+{name}[ \t]*\("
# How the function being completed is named on its declaration line, most specific first.
_NAME_PATTERNS = (re.compile(r"\bfunction\s+(\w+)"), re.compile(r"\b(?:const|let|var)\s+(\w+)\s*="),
                  re.compile(r"\bfunc\s+(\w+)\s*\("), re.compile(r"(\w+)\s*\("))
# What may precede a function's name on its declaration line in C++, Java, JS and Go: keywords,
# types, generics, pointers ("public static List<Integer> ", "func ", "const ", "vector<int> ").
_DECLARATION_PREFIX = re.compile(r"[\w\s<>\[\]*&:,.?]+")
_NOT_A_DECLARATION = {"return", "else", "new", "case", "throw", "yield", "await", "go", "defer", "delete", "typeof"}


def split_fenced_code(answer: str) -> tuple[str, bool, bool]:
    """(code, whether a fence was opened, whether it was closed): the first ``` block, else all."""
    lines = answer.splitlines(keepends=True)
    for start, line in enumerate(lines):
        if _FENCE_LINE.match(line):
            if not line.endswith("\n"):
                return "", True, False  # the info string is still being written
            body = []
            for inner in lines[start + 1:]:
                if _FENCE_LINE.match(inner):
                    return "".join(body), True, True
                body.append(inner)
            return "".join(body), True, False
    return answer, False, False


def prompt_function_name(problem: Problem) -> str | None:
    """Name of the function the prompt leaves open (None if it cannot be told)."""
    if problem.language == "python":
        names = re.findall(r"^[ \t]*(?:async[ \t]+)?def[ \t]+(\w+)[ \t]*\(", problem.prompt, re.MULTILINE)
        return names[-1] if names else None
    masked = mask_comments_and_strings(problem.prompt, problem.language)
    open_braces: list[int] = []
    for index, char in enumerate(masked):
        if char == "{":
            open_braces.append(index)
        elif char == "}" and open_braces:
            open_braces.pop()
    if not open_braces:
        return None
    brace = open_braces[-1]
    line = masked[masked.rfind("\n", 0, brace) + 1:brace]
    for pattern in _NAME_PATTERNS:
        match = pattern.search(line)
        if match:
            return match.group(1)
    return None


def _closing_paren(text: str, open_paren: int) -> int | None:
    """Index just past the `)` matching the `(` at `open_paren`, None while it is unclosed."""
    depth = 0
    for index in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index + 1
    return None


def _after_declaration(code: str, language: str, name: str) -> str | None:
    """What follows the declaration of `name` in `code`: None when `code` does not declare it,
    "" while the declaration is still being written.

    Python: the lines after the signature (which may span lines). Brace languages: the text after
    the body's `{` (from the next line when the rest of its line is blank).
    """
    if language == "python":
        match = re.search(_PY_DEF.format(name=re.escape(name)), code, re.MULTILINE)
        if not match:
            return None
        end = _closing_paren(code, match.end() - 1)
        line_end = code.find("\n", end) if end is not None else -1
        return "" if line_end < 0 else code[line_end + 1:]
    masked = mask_comments_and_strings(code, language)
    for match in re.finditer(rf"\b{re.escape(name)}\b", masked):
        before = masked[masked.rfind("\n", 0, match.start()) + 1:match.start()].strip()
        if not (before and _DECLARATION_PREFIX.fullmatch(before)) or _NOT_A_DECLARATION.intersection(before.split()):
            continue  # a call (`return n * f(x)`, `x = f(y)`, `f(z);`), not a declaration
        rest = masked[match.end():]
        if not rest.strip():
            return ""
        if not re.match(r"\s*(?:\(|=\s*(?:async\s+)?(?:\(|function\b|\w+\s*=>))", rest):
            continue  # not followed by parameters, nor (JS) by a function value: `let f = 1`
        open_paren = masked.find("(", match.end())
        end = _closing_paren(masked, open_paren) if open_paren >= 0 else None
        if end is None:
            return ""
        brace = end
        while True:  # the body's `{`; `{}` pairs belong to types such as Go's interface{}
            brace = masked.find("{", brace)
            if brace < 0 or not masked.startswith("{}", brace):
                break
            brace += 2
        semicolon = masked.find(";", end)
        if semicolon >= 0 and (brace < 0 or semicolon < brace):
            continue  # a prototype or a statement, not the definition
        if brace < 0:
            return ""
        line_end = code.find("\n", brace)
        if line_end < 0:
            return "" if not code[brace + 1:].strip() else code[brace + 1:]
        return code[line_end + 1:] if not code[brace + 1:line_end].strip() else code[brace + 1:]
    return None


def _skip_repeated_prompt_tail(rest: str, tail: str) -> str | None:
    """`rest` without a leading repeat of `tail` (what the prompt has after its declaration, e.g. the
    docstring), compared ignoring whitespace; `rest` unchanged when it does not repeat it, None while
    it is still a repeat in progress. The cut goes to the end of the line the repeat ends on."""
    position = 0
    for char in tail:
        if char.isspace():
            continue
        while position < len(rest) and rest[position].isspace():
            position += 1
        if position == len(rest):
            return None  # so far, a faithful repeat
        if rest[position] != char:
            return rest
        position += 1
    if not tail.strip():
        return rest
    line_end = rest.find("\n", position)
    return None if line_end < 0 else rest[line_end + 1:]


@dataclass(frozen=True)
class Extraction:
    completion: str
    declaration_found: bool


def _extract(problem: Problem, code: str) -> Extraction:
    name = prompt_function_name(problem)
    rest = _after_declaration(code, problem.language, name) if name else None
    if rest is not None:
        tail = _after_declaration(problem.prompt, problem.language, name) or ""
        rest = _skip_repeated_prompt_tail(rest, tail) if rest else rest
        return Extraction(rest or "", True)
    if problem.language == "python" and code.strip() and not _starts_indented(code):
        code = "".join(("    " + line if line.strip() else line) for line in code.splitlines(keepends=True))
    return Extraction(code, False)


def extract_chat_completion(problem: Problem, answer: str) -> str:
    """The completion (continuation of the prompt) a chat answer contributes; not yet truncated."""
    return _extract(problem, split_fenced_code(answer)[0]).completion


def _starts_indented(code: str) -> bool:
    first = next((line for line in code.splitlines() if line.strip()), "")
    return bool(first) and first[0] in " \t"


def chat_answer_is_complete(problem: Problem, answer: str) -> bool:
    """True when more answer text could not change the truncated completion (see the module doc)."""
    code, opened, closed = split_fenced_code(answer)
    if closed:
        return True
    extraction = _extract(problem, code)
    is_code = opened or extraction.declaration_found or _starts_indented(code)
    return is_code and generation_is_complete(problem.language, extraction.completion)


def output_is_complete(problem: Problem, mode: str, text: str) -> bool:
    if mode == "chat":
        return chat_answer_is_complete(problem, text)
    return generation_is_complete(problem.language, text)


def completion_from_output(problem: Problem, mode: str, text: str) -> str:
    """What gets executed: the chat extraction (chat mode), then the language's truncation."""
    completion = extract_chat_completion(problem, text) if mode == "chat" else text
    return truncate_generation(problem.language, completion)


# ----------------------------------------------------------------------------- generation pieces


class StopWhenComplete:
    """Per row: whether the output is complete for its problem (the stop rules; EOS is checked
    by the decoding loop). `stopped_at[row]` is the number of generated tokens when the row was
    judged complete."""

    def __init__(self, tokenizer, problems: Sequence[Problem], mode: str, stop_ids: set[int]):
        self.tokenizer = tokenizer
        self.problems = list(problems)
        self.mode = mode
        self.stop_ids = stop_ids
        self.stopped_at: dict[int, int] = {}

    def complete(self, generated: dict[int, list[int]]) -> set[int]:
        """The rows among `generated` (row -> its generated tokens) that are complete now."""
        rows = [row for row, ids in generated.items() if not self.stop_ids.intersection(ids)]
        decoded = self.tokenizer.batch_decode([generated[row] for row in rows], skip_special_tokens=False) if rows else []
        done = set()
        for row, text in zip(rows, decoded):
            if output_is_complete(self.problems[row], self.mode, text):
                self.stopped_at[row] = len(generated[row])
                done.add(row)
        return done


class SeededSampling(LogitsProcessor):
    """Temperature + top-p sampling as Gumbel-max: greedy search over these scores samples each row
    from softmax(logits / T) restricted to its top-p nucleus, with noise from the row's own
    generator (so a row's sample does not depend on its batch)."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        if temperature <= 0:
            raise ValueError("SeededSampling needs temperature > 0 (use plain greedy search for 0)")
        self.seeds = list(seeds)
        self.temperature = temperature
        self.top_p = top_p
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            drop_sorted = mass_before >= self.top_p  # keeps the smallest prefix reaching top_p (at least one)
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        if self.generators is None:
            self.generators = [torch.Generator(device=logits.device).manual_seed(s) for s in self.seeds]
        uniform = torch.stack([torch.rand(logits.shape[-1], generator=g, device=logits.device)
                               for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
        return logits + gumbel

    def keep(self, rows: Sequence[int]) -> None:
        """Only these rows (indices into the current batch) go on: the others finished."""
        self.seeds = [self.seeds[i] for i in rows]
        if self.generators is not None:
            self.generators = [self.generators[i] for i in rows]


# ----------------------------------------------------------------------------- the model


@dataclass
class GenerationModel:
    """A causal LM ready to generate: on its device, in eval mode, with its tokenizer."""

    model: Any
    tokenizer: Any
    device: torch.device
    precision: str  # "fp32" or "bf16" (autocast, as in training)
    eos_id: int  # the training EOS; also the pad id (training pads with EOS)
    stop_ids: set[int]  # eos_id plus any EOS the model's own generation config names
    folder: Path

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()


def load_generation_model(folder: Path, precision: str = "auto", eos_id: int | None = None,
                          trust_remote_code: bool = False) -> GenerationModel:
    """Load a HF model folder for generation in `precision` (the one training resolved): on a GPU
    bf16 means bf16 weights; on a CPU fp32 weights under bf16 autocast, as training computed.

    The model's own generation_config (sampling defaults, repetition penalties) is replaced by an
    empty one: only the evaluate settings decide how it decodes. Its EOS ids are kept as stops.
    """
    from transformers import AutoModelForCausalLM

    from mft_core.modeling import load_pretrained, load_tokenizer, resolve_special_tokens
    from mft_core.train.model import resolve_precision

    folder = Path(folder)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    tokenizer = load_tokenizer(folder, trust_remote_code)  # trust_remote_code: model.trust_remote_code
    precision = resolve_precision(precision, on_gpu)
    dtype = torch.bfloat16 if on_gpu and precision == "bf16" else torch.float32
    try:
        model = load_pretrained(AutoModelForCausalLM, folder, trust_remote_code, dtype=dtype, attn_implementation="sdpa")
    except ValueError as error:  # a family that declines sdpa (Gemma 2's soft-capped attention): its eager kernel
        if "scaled_dot_product_attention" not in str(error):
            raise
        model = load_pretrained(AutoModelForCausalLM, folder, trust_remote_code, dtype=dtype, attn_implementation="eager")
    model.to(device).eval()
    if eos_id is None:
        eos_id, _ = resolve_special_tokens(tokenizer, model.config)
    stop_ids = {int(eos_id)}
    own = model.generation_config.eos_token_id
    stop_ids.update(int(i) for i in (own if isinstance(own, (list, tuple)) else [own]) if i is not None)
    model.generation_config = GenerationConfig()
    return GenerationModel(model, tokenizer, device, precision, int(eos_id), stop_ids, folder)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Set torch's intra-op threads for the block (default: the CPUs this process may use)."""
    wanted = threads or len(os.sched_getaffinity(0))
    previous = torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class WorkItem:
    problem: Problem
    sample_index: int
    prompt: RenderedPrompt

    @property
    def key(self) -> tuple[str, int]:
        return (self.problem.task_id, self.sample_index)


def generate_batch(gm: GenerationModel, items: Sequence[WorkItem], mode: str, settings: GenerationSettings,
                   stop_early: bool = True) -> list[dict[str, Any]]:
    """Generate one left-padded batch; one record per item (without the model tag).

    Our own decoding loop rather than `model.generate`: a row that is finished (EOS, or its stop
    rule says the function is complete) leaves the batch at once, its key/value cache rows too,
    so the remaining steps run on fewer rows; generate would keep computing every finished row
    until the longest one ends. The cache is reused across steps; positions and masks follow the
    left padding exactly as generate sets them, so each row's tokens are those it would get
    alone (tested)."""
    pad_id = gm.eos_id
    width = max(len(item.prompt.ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):  # left padding: every prompt ends at the same column
        input_ids[row, width - len(item.prompt.ids):] = torch.tensor(item.prompt.ids)
        attention[row, width - len(item.prompt.ids):] = 1
    watch = StopWhenComplete(gm.tokenizer, [item.problem for item in items], mode, gm.stop_ids)
    sampler = None if settings.greedy else SeededSampling(
        [sample_seed(settings.seed, item.problem.task_id, item.sample_index) for item in items],
        settings.temperature, settings.top_p)
    generated: list[list[int]] = [[] for _ in items]
    stopped: dict[int, str] = {}
    active = list(range(len(items)))  # rows still generating, in batch order
    started = time.perf_counter()
    with torch.no_grad(), gm.autocast():
        attention = attention.to(gm.device)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        # logits_to_keep=1: only the last position's logits ([rows, vocab], not [rows, prompt, vocab]),
        # where the model takes it (transformers' own families do)
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(gm.model.forward).parameters else {}
        output = gm.model(input_ids=input_ids.to(gm.device), attention_mask=attention, position_ids=positions,
                          use_cache=True, **last_only)
        cache = output.past_key_values
        for _ in range(settings.max_new_tokens):
            scores = output.logits[:, -1, :].float()
            if sampler is not None:
                scores = sampler(None, scores)
            next_tokens = scores.argmax(-1)
            for index, row in enumerate(active):
                generated[row].append(int(next_tokens[index]))
            finished = {row for row in active if generated[row][-1] in gm.stop_ids}
            stopped.update((row, "eos") for row in finished)
            if stop_early:
                complete = watch.complete({row: generated[row] for row in active if row not in finished})
                stopped.update((row, "complete") for row in complete)
                finished |= complete
            keep = [index for index, row in enumerate(active) if row not in finished]
            if not keep:
                break
            if len(keep) < len(active):  # finished rows leave the batch, and their cache rows
                chosen = torch.tensor(keep, device=gm.device)
                cache.batch_select_indices(chosen)
                attention, next_tokens = attention[chosen], next_tokens[chosen]
                if sampler is not None:
                    sampler.keep(keep)
                active = [active[index] for index in keep]
            if len(generated[active[0]]) == settings.max_new_tokens:
                break  # no forward pass for a token nobody will take
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=-1)
            output = gm.model(input_ids=next_tokens[:, None], attention_mask=attention,
                              position_ids=attention.sum(-1, keepdim=True) - 1, past_key_values=cache, use_cache=True)
    seconds = time.perf_counter() - started
    records = []
    for row, item in enumerate(items):
        reason = stopped.get(row, "max_new_tokens")
        tokens = generated[row][:-1] if reason == "eos" else generated[row]
        raw = gm.tokenizer.decode(tokens, skip_special_tokens=False)
        records.append({
            "task_id": item.problem.task_id,
            "sample_index": item.sample_index,
            "language": item.problem.language,
            "prompt_mode": mode,
            "prompt": item.prompt.text,
            "prompt_tokens": len(item.prompt.ids),
            "raw": raw,
            "generation": completion_from_output(item.problem, mode, raw),
            "new_tokens": len(tokens) + (reason == "eos"),
            "stopped": reason,
            "seconds": round(seconds / len(items), 4),  # this row's share of the batch's wall time
        })
    return records


def plan_work(problems: Sequence[Problem], prompts: dict[str, RenderedPrompt], samples_per_problem: int,
              done: set[tuple[str, int]]) -> list[WorkItem]:
    """Every (problem, sample) not in `done`, longest prompts first (similar lengths share a batch,
    and a batch that does not fit in memory fails at the start, not at the end)."""
    items = [WorkItem(p, index, prompts[p.task_id]) for p in problems for index in range(samples_per_problem)
             if (p.task_id, index) not in done]
    items.sort(key=lambda item: (-len(item.prompt.ids), item.problem.task_id, item.sample_index))
    return items


# ----------------------------------------------------------------------------- the generations file


def read_generations(path: Path) -> list[dict[str, Any]]:
    """Records of a generations file; a torn last line (a killed writer) is cut off the file."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - keep)
        with open(path, "r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    records = []
    for line_number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["task_id"], record["sample_index"], record["model"]  # noqa: B018 (required keys)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{line_number}: not a generation record ({error}); "
                             f"delete the file to generate again") from None
        records.append(record)
    return records


@dataclass
class GenerationRun:
    """What `generate_to_file` did for one model."""

    records: list[dict[str, Any]]  # every record of this model, in problem/sample order
    generated: int = 0  # samples generated by this call (the rest were in the file already)
    stats: dict[str, Any] = field(default_factory=dict)


def generate_to_file(path: Path, model_tag: str, load_model: Callable[[], GenerationModel],
                     problems: Sequence[Problem], mode: str, settings: GenerationSettings,
                     render: Callable[[Problem, Any], RenderedPrompt], threads: int | None = None,
                     on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
                     stop_early: bool = True, elsewhere: "BatchesElsewhere | None" = None) -> GenerationRun:
    """Generate every missing sample of `model_tag` and append each record to `path` as it is done.

    Resumable: records of this model already in the file are kept and not generated again; the
    model is not even loaded when nothing is missing. `render(problem, tokenizer)` gives a
    problem's prompt. `on_batch` gets each batch's records once they are written (a batch
    finishes all at once: one progress report, not one per record). Returns all of this model's
    records (earlier and new). `elsewhere`: the batches are generated by other processes (the
    cluster's workers, eval.on_ray), the same batches as here, so the same records.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        try:  # two writers would generate the same samples twice
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{path} is being written by another run; wait for it to finish") from None
        existing = {(r["task_id"], r["sample_index"]): r for r in read_generations(path) if r["model"] == model_tag}
        wanted = [(p.task_id, index) for p in problems for index in range(settings.samples_per_problem)]
        missing = [key for key in wanted if key not in existing]
        run = GenerationRun(records=[])
        if missing:
            log.info("%s: generating %d of %d samples (%s prompts, %s)", model_tag, len(missing), len(wanted), mode,
                     "greedy" if settings.greedy else f"T={settings.temperature}, top_p={settings.top_p}")
            with torch_threads(threads):
                if elsewhere is None:
                    gm = load_model()
                    tokenizer = gm.tokenizer

                    def run_batches(batches):
                        return (generate_batch(gm, batch, mode, settings, stop_early) for batch in batches)
                else:
                    gm, tokenizer, run_batches = None, elsewhere.tokenizer(), elsewhere.run
                prompts = {p.task_id: render(p, tokenizer) for p in problems}
                items = plan_work(problems, prompts, settings.samples_per_problem, set(existing))
                batches = [items[first:first + settings.batch_size] for first in range(0, len(items), settings.batch_size)]
                started, tokens = time.perf_counter(), 0
                for batch_records in run_batches(batches):
                    records = [{"model": model_tag, **record} for record in batch_records]
                    for record in records:
                        handle.write(json.dumps(record) + "\n")
                        handle.flush()
                        existing[(record["task_id"], record["sample_index"])] = record
                        tokens += record["new_tokens"]
                        run.generated += 1
                    if on_batch:
                        on_batch(records)
                    elapsed = time.perf_counter() - started
                    log.info("%s: %d/%d samples generated, %.1f new tokens/s", model_tag, run.generated,
                             len(items), tokens / max(elapsed, 1e-9))
                del gm
            os.fsync(handle.fileno())
        run.records = [existing[key] for key in wanted]
    run.stats = generation_stats(run.records)
    return run


class BatchesElsewhere(Protocol):
    """Generation in other processes: `tokenizer()` renders the prompts here, `run(batches)` gives
    each batch's records (in any order, a batch's records together)."""

    def tokenizer(self): ...

    def run(self, batches: list[list[WorkItem]]) -> Iterator[list[dict[str, Any]]]: ...


def generate_batches(folder: str, precision: str, eos_id: int | None, trust_remote_code: bool,
                     batches: list[list[WorkItem]], mode: str, settings: GenerationSettings, stop_early: bool,
                     threads: int | None) -> list[list[dict[str, Any]]]:
    """Load the model and generate these batches, each as generate_to_file would: one list of
    records per batch (a cluster worker's job, eval.on_ray)."""
    with torch_threads(threads):
        gm = load_generation_model(Path(folder), precision, eos_id, trust_remote_code)
        return [generate_batch(gm, batch, mode, settings, stop_early) for batch in batches]


def generation_stats(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Token and time totals of a model's generations (a resumed run counts every part)."""
    tokens = sum(r["new_tokens"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    stopped = {reason: sum(r["stopped"] == reason for r in records) for reason in STOP_REASONS}
    return {"samples": len(records), "new_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None, "stopped": stopped}
