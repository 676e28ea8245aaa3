"""What a person sees on the console, and the run log that keeps the rest (mft_core/console.py):
progress-line arithmetic by hand, the console filter, and a real `mft run` / `mft train` whose
console must be free of library noise while its run log keeps it."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mft_core.console import (CONSOLE, Throttle, TrainingProgress, format_duration, on_console, run_log,
                              training_line)
from mft_core.train.launch import StepReport, parse_progress, run_trainer

REPO = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ----------------------------------------------------------------------------- progress lines


def test_durations_read_at_a_glance():
    assert [format_duration(s) for s in (0, 0.4, 42.4, 59.6, 252, 3599.4, 3900, 2 * 3600 + 59)] == \
        ["0s", "0s", "42s", "1m00s", "4m12s", "59m59s", "1h05m", "2h00m"]


def test_training_line_has_step_loss_speed_and_time_left():
    assert training_line(3, 16, 1.9347, 262.4, 130) == "step 3/16: loss 1.93, 262 tokens/s, ETA 2m10s"
    assert training_line(16, 16, 1.41, 250.0, 0) == "step 16/16: loss 1.41, 250 tokens/s"  # nothing left
    assert training_line(1, 16, None, None, None) == "step 1/16"


def test_eta_is_the_wall_time_per_step_since_the_first_report_times_the_steps_left():
    clock = FakeClock()
    progress = TrainingProgress(clock=clock, throttle=Throttle(fraction=0, min_gap=0, clock=clock))
    assert progress.update(0, 16) is None  # the trainer's report before step 1: starts the clock
    clock.now = 10.0
    assert progress.update(1, 16, 2.5, 100.0) == "step 1/16: loss 2.5, 100 tokens/s, ETA 2m30s"  # 10 s x 15
    clock.now = 30.0
    assert progress.update(3, 16, 2.0, 120.0) == "step 3/16: loss 2, 120 tokens/s, ETA 2m10s"  # 30 s / 3 x 13


def test_a_resumed_run_counts_from_its_first_report():
    clock = FakeClock()
    progress = TrainingProgress(clock=clock, throttle=Throttle(fraction=0, min_gap=0, clock=clock))
    clock.now = 100.0
    assert progress.update(8, 16) is None  # resumed at step 8 (the checkpoint's steps took no time now)
    clock.now = 120.0
    assert progress.eta(10, 16) == pytest.approx(60.0)  # 20 s for 2 steps, 6 left


def test_throttle_prints_every_tenth_at_most_once_a_second_at_least_every_30_s_and_the_end():
    clock = FakeClock()
    throttle = Throttle(fraction=0.1, seconds=30, min_gap=1.0, clock=clock)
    seen = []
    for now, done in [(0.5, 20), (2, 21), (3, 25), (10, 31), (39, 32), (41, 33), (41.1, 100)]:
        clock.now = now
        seen.append(throttle.due(done, 100))
    # 20: a tenth, but 0.5 s after the start (a batch finishing at once); 21: due; 25: 4 more;
    # 31: 10 more; 32: 1 more, 29 s; 33: 31 s without a line; 100: the end, always
    assert seen == [False, True, False, True, False, True, True]


def test_trainer_progress_reports_are_parsed_with_and_without_loss():
    assert parse_progress("progress step=0 total=16") == StepReport(0, 16)
    assert parse_progress("progress step=3 total=16 loss=1.9347 tokens_per_s=262.4") == StepReport(3, 16, 1.9347, 262.4)
    assert parse_progress("INFO mft.train: progress is good") is None


def test_the_trainers_own_warnings_reach_the_console_and_the_rest_of_its_output_the_log(tmp_path, caplog):
    output = ["INFO mft.train: attention auto -> sdpa_varlen",
              "WARNING bitsandbytes.backends.cpu.ops: No module named 'kernels'",
              "/x/modeling_utils.py:3303: FutureWarning: `is_gradient_checkpointing` is deprecated",
              "progress step=0 total=2",
              "WARNING mft.train: no validation data",
              "progress step=1 total=2 loss=2.5 tokens_per_s=100.0"]
    trainer = [sys.executable, "-c", f"print({chr(10).join(output)!r})"]  # a real subprocess printing as the trainer does
    reports = []
    with caplog.at_level(logging.DEBUG, logger="mft.train"):
        run_trainer(trainer, dict(os.environ), tmp_path / "train.log", reports.append)
    assert reports == [StepReport(0, 2), StepReport(1, 2, 2.5, 100.0)]
    shown = [r.getMessage() for r in caplog.records if on_console(r)]
    assert shown == ["[trainer] WARNING mft.train: no validation data"]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("[trainer]")] == \
        [f"[trainer] {line}" for line in output]  # all of it in the run log, in order
    assert (tmp_path / "train.log").read_text() == "\n".join(output) + "\n"


# ----------------------------------------------------------------------------- the console filter


def record(name: str, level: int, **extra) -> logging.LogRecord:
    item = logging.LogRecord(name, level, __file__, 1, "message", None, None)
    item.__dict__.update(extra)
    return item


@pytest.mark.parametrize("item, shown", [
    (record("mft.train", logging.INFO), False),  # detail: the run log
    (record("mft.train", logging.INFO, **CONSOLE), True),  # a stage line
    (record("mft_core.eval.execute", logging.WARNING), True),  # every mft warning and error
    (record("mft.preflight", logging.ERROR), True),
    (record("prefect.task_runs", logging.INFO), True),  # Prefect's own: "Finished in state Cached"
    (record("prefect.task_runs", logging.INFO, console=False), False),  # an mft detail forwarded by a task
    (record("prefect.task_runs", logging.WARNING, console=False), True),
    (record("py.warnings", logging.WARNING), False),  # FutureWarning and the like
    (record("bitsandbytes.backends.cpu.ops", logging.WARNING), False),
    (record("httpx", logging.INFO), False),
    (record("transformers.modeling_utils", logging.ERROR), True),  # a library's error is news
])
def test_what_reaches_the_console(item, shown):
    assert on_console(item) is shown


def test_run_log_keeps_library_noise_in_its_file_and_off_the_console(tmp_path, capsys):
    library = logging.getLogger("bitsandbytes.backends.cpu.ops")
    # DeepSpeed's logger prints through its own stdout handler with propagation off (added when
    # deepspeed is imported, which accelerate does during the run): set up as that import does.
    deepspeed = logging.getLogger("DeepSpeed")
    show_warning, handlers = warnings.showwarning, list(logging.getLogger().handlers)
    with run_log(tmp_path / "runs") as path:
        own_handler = logging.StreamHandler(sys.stdout)
        deepspeed.addHandler(own_handler)
        deepspeed.propagate = False
        try:
            logging.getLogger("mft.test").info("[stage] start: something", extra=CONSOLE)
            logging.getLogger("mft.test").info("a detail")
            logging.getLogger("mft.test").warning("an mft warning")
            library.warning("Failed to load CPU gemm_4bit_forward: No module named 'kernels'")
            deepspeed.warning("Setting accelerator to CPU.")
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
        finally:
            deepspeed.removeHandler(own_handler)
            deepspeed.propagate = True
    console = capsys.readouterr()
    console = console.out + console.err
    assert path.parent == tmp_path / "runs" / "logs" and re.fullmatch(r"\d{8}T\d{6}Z-\d+\.log", path.name)
    assert console.count(f"full log: {path}") == 2  # at the start and at the end
    assert "[stage] start: something" in console and "an mft warning" in console
    for noise in ("a detail", "kernels", "Setting accelerator", "FutureWarning"):
        assert noise not in console
    text = path.read_text()
    for line in ("[stage] start: something", "a detail", "WARNING mft.test: an mft warning", "kernels",
                 "WARNING DeepSpeed: Setting accelerator to CPU", "FutureWarning: `is_gradient_checkpointing`"):
        assert line in text
    # All undone: nothing of the run is left on the root logger, warnings print as before.
    assert logging.getLogger().handlers == handlers
    assert warnings.showwarning is show_warning and not deepspeed.filters


# ----------------------------------------------------------------------------- a real run


def write_project(root: Path, model_dir: Path) -> Path:
    for task in ("alpha", "beta"):
        (root / task).mkdir(parents=True)
        lines = [json.dumps({"chat_rounds": [{"role": "human", "content": f"{task} question {i}: " + "word " * (i % 5)},
                                             {"role": "bot", "content": f"def f{i}(x):\n    return x + {i}"}]})
                 for i in range(40)]
        (root / task / "data.jsonl").write_text("\n".join(lines) + "\n")
    (root / "alpha" / "notes.txt").write_text("not data\n")  # an mft warning, which must stay visible
    shutil.copy(REPO / "prefect.toml", root / "prefect.toml")  # Prefect's home in the project, not ~/.prefect
    config = root / "pipeline.yaml"
    config.write_text(
        "runs_root: runs\n"
        "data:\n  tasks: [{path: alpha}, {path: beta}]\n"
        f"model: {{path: '{model_dir}'}}\n"
        "ingest: {decontaminate: {enabled: false}, min_valid: 2}\n"
        "tokenize: {seq_length: 64, num_workers: 1}\n"
        "train: {max_steps: 3, warmup_steps: 0, grad_accum: 1, eval_every: 3, checkpoint_every: 3, precision: fp32, threads: 1}\n"
        "merge: {check_samples: 2}\n"
        "evaluate: {languages: [python], limit: 1, max_new_tokens: 16, evaluate_base: false}\n"
    )
    return config


def mft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    return subprocess.run([str(Path(sys.prefix) / "bin" / "mft"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# What made `make demo`'s console hard to follow; none of it may reach the console again.
NOISE = ("FutureWarning", "warnings.warn", "Setting accelerator", "kernels", "Loading weights", "it/s]", "█",
         "\r", "[trainer]", "HTTP Request")


def assert_quiet_console_and_full_log(console: str) -> Path:
    for noise in NOISE:
        assert noise not in console, f"{noise!r} on the console:\n{console}"
    paths = re.findall(r"full log: (\S+\.log)", console)
    assert len(paths) == 2 and paths[0] == paths[1], console
    return Path(paths[0])


@pytest.mark.slow
def test_a_run_shows_stage_lines_and_training_progress_and_keeps_library_noise_in_the_log(tmp_path, tiny_llama_dir):
    import torch

    write_project(tmp_path, tiny_llama_dir)
    run = mft("run", cwd=tmp_path)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-3000:]
    for stage in ("ingest", "tokenize", "train", "merge", "evaluate"):
        assert re.search(rf"\[{stage}\] start: .+", console), stage
        assert re.search(rf"\[{stage}\] done in \d+(m\d\ds)?s?: .+", console), stage
    assert re.search(r"\[train\] start: 3 steps, LoRA r16 on .+, fp32, 1 process", console)
    assert re.search(r"\[train\] step 1/3: loss [\d.]+, \d+ tokens/s, ETA \S+", console), console
    assert re.search(r"\[train\] done in .+: 3 steps, loss [\d.]+ → [\d.]+, \d+ tokens/s", console)
    assert re.search(r"\[evaluate\] fine-tuned: generated python 1/1", console)
    assert re.search(r"\[evaluate\] fine-tuned: executed python 1/1 \(\d passed\)", console)
    assert "Finished in state Completed" in console  # Prefect's state lines stay
    assert "files not read" in console  # an mft warning stays
    assert "=== mft-pipeline results ===" in console and "final valid loss" in console  # the tables too
    log_file = assert_quiet_console_and_full_log(console)
    log = log_file.read_text()
    # The library warnings this run produced are in the log, with the trainer's whole output.
    assert "FutureWarning" in log and "[trainer] progress step=3 total=3" in log
    if not torch.cuda.is_available():  # deepspeed says it through its own handler, imported or not by us
        assert "Setting accelerator to CPU" in log

    # One stage alone, without Prefect: the same console.
    alone = mft("train", "--force", cwd=tmp_path)
    console = alone.stdout + alone.stderr
    assert alone.returncode == 0, console[-3000:]
    assert re.search(r"\[train\] start: 3 steps", console) and re.search(r"\[train\] step 1/3: .+ETA", console)
    assert re.search(r"\[train\] done in .+: 3 steps, loss", console) and "Finished in state" not in console
    assert "FutureWarning" in assert_quiet_console_and_full_log(console).read_text()
