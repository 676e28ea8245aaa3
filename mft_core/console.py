"""What a person sees while the pipeline runs, and the run log that keeps everything else.

The console shows, per stage, a start line and a one-line result (or that it was cached), a live
training line (step/total, loss, tokens/s, time left), evaluation progress per language, every
`mft.*` warning and error and, under Prefect, the engine's own lines (flow and task states).
Everything else goes only to the run log, `<runs_root>/logs/<UTC time>-<pid>.log`, named on the
console when the run starts and when it ends: other libraries' loggers and Python warnings
(transformers, peft, bitsandbytes, DeepSpeed, httpx, ...) and the trainer's full output. Progress
bars of weight loading and conversion are switched off: the stage lines say the same.

No Prefect here. Under a flow, Prefect's console handler sits on the root logger and gets the
same filter (`on_console`); records that a stage task forwards into Prefect's logger carry the
decision with them (tasks/_common.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("mft.console")

CONSOLE = {"console": True}  # `extra=` of an INFO record a person should see on the console
MFT_LOGGERS = ("mft", "mft_core")  # mft_core.*: modules that name their logger by __name__
# Read when tqdm and huggingface_hub are imported: set before the stages import them.
NO_PROGRESS_BARS = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

_active_log: Path | None = None


def announce(logger: logging.Logger, stage: str, text: str) -> None:
    """A stage's line on the console (and in the run log), e.g. `[train] start: 16 steps, ...`."""
    logger.info("[%s] %s", stage, text, extra=CONSOLE)


def on_console(record: logging.LogRecord) -> bool:
    """Whether a person should see `record` on the console (everything goes to the run log)."""
    marked = getattr(record, "console", None)
    if marked is not None:  # ours, or forwarded by a Prefect task that decided already
        return bool(marked) or record.levelno >= logging.WARNING
    top = record.name.split(".")[0]
    if top in MFT_LOGGERS:
        return record.levelno >= logging.WARNING
    if top == "prefect":  # flow and task states ("Finished in state Cached"), the temporary server
        return True
    return record.levelno >= logging.ERROR  # another library's warning is noise to a person, not an error


class _RunLogFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)-7s %(origin)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # A record a stage task forwarded into Prefect's logger keeps the name it was logged under;
        # Prefect's own say which task or flow run they are about ("Finished in state Completed()").
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        record.origin = getattr(record, "mft_logger", record.name) + (f" ({run})" if run else "")
        return super().format(record)


class _OnlyToRunLog(logging.Filter):
    """For a logger that prints through a console handler of its own, added when its library is
    imported (DeepSpeed: a stdout handler, propagation off): its records go to the run log only.
    A logger's filters survive that set-up, so this can be put in place before the import."""

    def __init__(self, run_log: logging.Handler):
        super().__init__()
        self.run_log = run_log

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.run_log.level:
            self.run_log.handle(record)
        return False


def _console_handlers(root: logging.Logger) -> list[logging.Handler]:
    """The root logger's handlers that print to the terminal (Prefect's), not into a file or a
    test's capture."""
    return [h for h in root.handlers if getattr(getattr(h, "stream", None), "name", None) in ("<stderr>", "<stdout>")]


def new_log_path(runs_root: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Path(runs_root) / "logs" / f"{stamp}-{os.getpid()}.log"


@contextlib.contextmanager
def run_log(runs_root: Path) -> Iterator[Path]:
    """Route this process's logging for one run: the console as described above, everything into
    a new run log file. Nested use (`mft run` opens it, then the flow asks again) reuses it."""
    global _active_log
    if _active_log is not None:
        yield _active_log
        return
    path = new_log_path(runs_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    with contextlib.ExitStack() as undo:
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(_RunLogFormatter())
        undo.callback(file_handler.close)
        root.addHandler(file_handler)
        undo.callback(root.removeHandler, file_handler)

        consoles = _console_handlers(root)  # Prefect's, under a flow
        if not consoles:  # a stage alone (`mft train`): our own
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
            root.addHandler(handler)
            undo.callback(root.removeHandler, handler)
            consoles = [handler]
        for handler in consoles:
            handler.addFilter(on_console)
            undo.callback(handler.removeFilter, on_console)

        if root.getEffectiveLevel() > logging.INFO:  # Prefect sets WARNING: libraries' INFO belongs in the file
            undo.callback(root.setLevel, root.level)
            root.setLevel(logging.INFO)
        logging.captureWarnings(True)  # warnings.warn -> logger py.warnings -> the file only
        undo.callback(logging.captureWarnings, False)
        for name, value in NO_PROGRESS_BARS.items():
            if name not in os.environ:  # the trainer subprocess inherits them too
                os.environ[name] = value
                undo.callback(os.environ.pop, name, None)
        _quiet_libraries(file_handler, undo)

        _active_log = path
        undo.callback(_forget_active_log)
        log.info("full log: %s", path, extra=CONSOLE)
        try:
            yield path
        finally:
            log.info("full log: %s", path, extra=CONSOLE)


def _forget_active_log() -> None:
    global _active_log
    _active_log = None


def _quiet_libraries(file_handler: logging.Handler, undo: contextlib.ExitStack) -> None:
    """Libraries that bypass the root logger: route them into it (or straight into the file)."""
    # transformers prints its warnings through a stderr handler of its own, propagation off, and
    # draws progress bars ("Loading weights", "Writing model shards") unless told not to.
    import transformers.utils.logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()
    undo.callback(hf_logging.enable_default_handler)
    undo.callback(hf_logging.disable_propagation)
    if bars_were_on:
        undo.callback(hf_logging.enable_progress_bar)
    # DeepSpeed is imported by accelerate whenever it is installed, deepspeed backend or not
    # (extract_model_from_parallel, which transformers' save_pretrained calls), and then logs
    # "Setting accelerator to CPU" through its own stdout handler.
    only_to_file = _OnlyToRunLog(file_handler)
    logging.getLogger("DeepSpeed").addFilter(only_to_file)
    undo.callback(logging.getLogger("DeepSpeed").removeFilter, only_to_file)


# ----------------------------------------------------------------------------- progress lines


def format_duration(seconds: float) -> str:
    """42s, 4m12s, 1h05m: what a person reads at a glance."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Throttle:
    """Decides when a progress line is due, so that a long run prints a few lines, not one per
    sample: at the end, after `fraction` more of the total (at most one line per `min_gap`
    seconds, which merges a batch finishing at once), and after `seconds` without a line."""

    def __init__(self, fraction: float = 0.1, seconds: float = 30.0, min_gap: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.fraction, self.seconds, self.min_gap, self.clock = fraction, seconds, min_gap, clock
        self.last_done, self.last_time = 0, clock()

    def due(self, done: int, total: int) -> bool:
        now = self.clock()
        waited = now - self.last_time
        due = (done >= total or waited >= self.seconds
               or (done - self.last_done >= self.fraction * total and waited >= self.min_gap))
        if due:
            self.last_done, self.last_time = done, now
        return due


class TrainingProgress:
    """The live training line from the trainer's reports: `step 3/16: loss 1.93, 262 tokens/s,
    ETA 2m10s`. Time left = remaining steps x the wall time per step since the first report (so
    evaluations and checkpoints count); a resumed run starts counting at its first report."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, throttle: Throttle | None = None):
        self.clock = clock
        self.throttle = throttle or Throttle(clock=clock)
        self.first: tuple[int, float] | None = None  # (step, time) of the first report

    def eta(self, step: int, total: int) -> float | None:
        if self.first is None or step <= self.first[0]:
            return None
        first_step, first_time = self.first
        return (self.clock() - first_time) / (step - first_step) * (total - step)

    def update(self, step: int, total: int, loss: float | None = None, tokens_per_s: float | None = None) -> str | None:
        """The line to show for this report, or None when none is due (throttled)."""
        if self.first is None:
            self.first = (step, self.clock())
            return None  # nothing trained yet: the start line said what is coming
        if not self.throttle.due(step, total):
            return None
        return training_line(step, total, loss, tokens_per_s, self.eta(step, total))


def training_line(step: int, total: int, loss: float | None, tokens_per_s: float | None, eta: float | None) -> str:
    parts = [f"loss {loss:.3g}" if loss is not None else None,
             f"{tokens_per_s:.0f} tokens/s" if tokens_per_s is not None else None,
             f"ETA {format_duration(eta)}" if eta is not None and step < total else None]
    details = ", ".join(part for part in parts if part)
    return f"step {step}/{total}" + (f": {details}" if details else "")
