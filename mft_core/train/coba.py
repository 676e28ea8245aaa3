"""CoBa, the Convergence Balancer (arXiv 2410.06741): task weights from validation-loss slopes.

Before training, the loop gives `CoBa.set_normalizers` each task's loss over one full validation
pass. Then it measures per-task validation losses every `update_interval` optimizer steps, always
on the SAME validation micro-batches (`measurement_batches`: a fixed subset that holds every task,
the first measurement at step 0, before any update), and calls `CoBa.update(step, losses)`; the returned weights (on the
simplex) are the task weights of the case3 loss for the following steps. Each task's validation
curve, divided by its normalizer, gets a least-squares slope alpha_k over the last
`history_length` measurements, then:

  RCS_k = softmax_k( K alpha_k / sum_j |alpha_j| )             relative convergence score: a task
                                                               converging more slowly than the
                                                               others (larger slope) gains weight
  ACS_k = softmax_k( -n alpha_k / sum_{s in window} |alpha_k(s)| )
                                                               absolute convergence score: a task
                                                               whose current slope is bad against
                                                               its own last n slopes loses weight
  DF    = clip( m softmax_s( -tau m A_s / sum_s |A_s| )[last], 0, 1 )
                                                               divergence factor over the history
                                                               A of the worst (largest) task slope:
                                                               1 while convergence goes on as
                                                               usual, towards 0 once it turns up
  w     = floor + (1 - K floor) softmax_k( K (DF RCS_k + (1 - DF) ACS_k) )

This follows MFTCoder's CoBaStatus (reference/mftcoder.md §3.7) with its defects fixed:
  * every point of the slope window is measured on the same micro-batches: MFTCoder's first point
    is the full validation pass and the later ones cycle through micro-batches of different task
    mixes and lengths, so its slopes fit which samples were measured as much as training; the
    full pass here is only the normalizer;
  * slopes are fitted against the TRUE step of each measurement; a task missing from a
    measurement (nan) is left out of its own fit (masked least squares), instead of dropping
    its zeros and shifting the remaining points left;
  * both windows count measurements: the loss window holds the last `history_length`
    measurements and the ACS window the last `history_length` slope vectors (MFTCoder sliced
    the slope history with a step count), so with update_interval i the windows span about
    history_length * i steps;
  * DF is clipped to [0, 1] (a mixing factor; unclipped, ACS could get a negative coefficient);
  * A_s is the largest per-task slope of update s (the worst-converging task). MFTCoder fits a
    slope to the column-wise max of the loss curves, which with missing measurements jumps from
    task to task, and which follows the highest curve rather than the worst trend;
  * the floor is applied always (a smooth map onto {w >= floor, sum w = 1}); MFTCoder mixes only
    when some weight is below the floor, so weights jump when one crosses it;
  * any update_interval works, warmup need not be a multiple of it, and `state_dict` holds
    everything, so a run resumed after warmup continues exactly as an uninterrupted one.

Warmup: weights stay uniform (1/K) while step < warmup_steps or fewer than 2 measurements
exist. Slope and max-slope histories start at the first update after warmup (as in MFTCoder),
and the max-slope history used by DF grows for the whole run (one float per update), as in the
paper. A task with fewer than 2 finite measurements in the window has no slope; it gets the
mean slope of the fitted tasks (neutral in RCS) and is left out of the max. If no task has a
slope, the weights do not change. A task without a normalizer (no validation data) or without
tokens in the measurement batches has no curve: it keeps the mean slope.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger("mft.train")

_STATE_FORMAT = "mft-coba-1"
_HYPERPARAMETERS = ("num_tasks", "warmup_steps", "history_length", "tau", "update_interval", "min_weight")


class CoBa:
    """Convergence-balanced task weights; see the module docstring for the exact rules.

    per_task_valid_loss given to `update` must be the token-weighted per-task mean validation
    losses over ALL ranks (sum of losses and of tokens all-reduced, then divided: see
    losses.per_task_loss_sums / all_reduce_sum / task_mean_losses), with nan for a task that had
    no validation token in this measurement. Every rank then computes the same weights.
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        warmup_steps: int = 100,
        history_length: int = 200,
        tau: float = 5.0,
        update_interval: int = 1,
        min_weight: float | None = None,
    ):
        if num_tasks < 1:
            raise ValueError(f"CoBa needs at least one task, got num_tasks={num_tasks}")
        if warmup_steps < 0:
            raise ValueError(f"coba warmup_steps must be >= 0, got {warmup_steps}")
        if history_length < 2:
            raise ValueError(f"coba history_length must be >= 2 (a slope needs two points), got {history_length}")
        if not tau >= 0:
            raise ValueError(f"coba tau must be >= 0, got {tau}")
        if update_interval < 1:
            raise ValueError(f"coba update_interval must be >= 1, got {update_interval}")
        if min_weight is None:
            min_weight = 1.0 / (10 * num_tasks)  # MFTCoder's floor
        if not 0 <= min_weight <= 1.0 / num_tasks:
            raise ValueError(f"coba min_weight must be in [0, 1/num_tasks = {1.0 / num_tasks:g}], got {min_weight}")
        self.num_tasks = num_tasks
        self.warmup_steps = warmup_steps
        self.history_length = history_length
        self.tau = float(tau)
        self.update_interval = update_interval
        self.min_weight = float(min_weight)

        k = num_tasks
        self._normalizers = torch.full((k,), float("nan"), dtype=torch.float64)
        self._history_steps = torch.zeros(0, dtype=torch.int64)  # last history_length measurements
        self._history_losses = torch.zeros(0, k, dtype=torch.float64)  # normalized, nan = missing
        self._slope_history = torch.zeros(0, k, dtype=torch.float64)  # last history_length slope vectors
        self._max_slope_history = torch.zeros(0, dtype=torch.float64)  # every update since warmup
        self._weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        self._last_step: int | None = None
        self._diagnostics: dict[str, Any] | None = None

    # ------------------------------------------------------------------------- public

    @property
    def weights(self) -> torch.Tensor:
        """Current task weights, float64 [K], on the simplex (a copy)."""
        return self._weights.clone()

    @property
    def diagnostics(self) -> dict[str, Any] | None:
        """The last active update's step, slopes, RCS, ACS and divergence factor (None before)."""
        if self._diagnostics is None:
            return None
        return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in self._diagnostics.items()}

    def set_normalizers(self, full_pass_loss: torch.Tensor) -> None:
        """Each task's loss over one full validation pass before training (nan: no validation
        token), the divisor of its curve; call it once, before the first `update`."""
        losses = torch.as_tensor(full_pass_loss).detach().to("cpu", torch.float64).reshape(-1)
        if losses.numel() != self.num_tasks or bool((~torch.isnan(losses) & ~(torch.isfinite(losses) & (losses > 0))).any()):
            raise ValueError(f"CoBa.set_normalizers: expected {self.num_tasks} losses > 0 (or nan), got {losses.tolist()}")
        self._normalizers = losses.clone()

    def should_update(self, step: int) -> bool:
        """Whether the loop should measure validation losses and call `update` after `step`."""
        return step % self.update_interval == 0

    def update(self, step: int, per_task_valid_loss: torch.Tensor) -> torch.Tensor:
        """Record the validation losses measured after `step` optimizer steps; return the weights
        to use from the next step on (float64 [K])."""
        losses = self._checked_losses(step, per_task_valid_loss)
        if self._last_step is None:  # the first measurement: say which tasks will have no curve
            unmeasured = (torch.isnan(losses) & ~torch.isnan(self._normalizers)).nonzero().flatten().tolist()
            if unmeasured:
                log.warning("CoBa: task(s) %s have no token in the measurement batches and get no slope: "
                            "raise train.coba.valid_batches", unmeasured)
        normalized = losses / self._normalizers  # nan stays nan (missing, or no normalizer)

        keep = self.history_length - 1
        self._history_steps = torch.cat([self._history_steps[-keep:], torch.tensor([step])])
        self._history_losses = torch.cat([self._history_losses[-keep:], normalized[None]])
        self._last_step = step
        if step < self.warmup_steps or self._history_steps.numel() < 2:
            return self.weights

        slopes, fitted = window_slopes(self._history_steps, self._history_losses)
        if not bool(fitted.any()):
            return self.weights
        slopes = torch.where(fitted, slopes, slopes[fitted].mean())
        self._slope_history = torch.cat([self._slope_history[-keep:], slopes[None]])
        self._max_slope_history = torch.cat([self._max_slope_history, slopes[fitted].max()[None]])

        k = self.num_tasks
        rcs = torch.softmax(k * _safe_divide(slopes, slopes.abs().sum()), dim=0)
        window = self._slope_history
        acs = torch.softmax(-window.shape[0] * _safe_divide(slopes, window.abs().sum(dim=0)), dim=0)
        history = self._max_slope_history
        m = history.numel()
        scores = -self.tau * m * _safe_divide(history, history.abs().sum())
        divergence = (m * torch.softmax(scores, dim=0)[-1]).clamp(0.0, 1.0)
        mixed = torch.softmax(k * (divergence * rcs + (1 - divergence) * acs), dim=0)
        self._weights = self.min_weight + (1 - k * self.min_weight) * mixed
        self._diagnostics = {
            "step": step, "slopes": slopes, "rcs": rcs, "acs": acs, "divergence_factor": float(divergence),
        }
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: hyperparameters, normalizers, histories, weights."""
        return {
            "format": _STATE_FORMAT,
            **{name: getattr(self, name) for name in _HYPERPARAMETERS},
            "normalizers": self._normalizers.clone(),
            "history_steps": self._history_steps.clone(),
            "history_losses": self._history_losses.clone(),
            "slope_history": self._slope_history.clone(),
            "max_slope_history": self._max_slope_history.clone(),
            "weights": self._weights.clone(),
            "last_step": self._last_step,
            "diagnostics": self.diagnostics,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; the hyperparameters must equal this object's."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a CoBa state (format {state.get('format')!r}, expected {_STATE_FORMAT!r})")
        for name in _HYPERPARAMETERS:
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"the saved CoBa state has {name}={state[name]!r} but this run has {getattr(self, name)!r}: "
                    "resume with the same CoBa settings, or start a new run"
                )
        k = self.num_tasks
        shapes = {
            "normalizers": (k,), "weights": (k,),
            "history_losses": (state["history_steps"].numel(), k), "slope_history": (state["slope_history"].shape[0], k),
        }
        for name, shape in shapes.items():
            if tuple(state[name].shape) != shape:
                raise ValueError(f"CoBa state {name!r} has shape {tuple(state[name].shape)}, expected {shape}")
        self._normalizers = state["normalizers"].to(torch.float64).clone()
        self._history_steps = state["history_steps"].to(torch.int64).clone()
        self._history_losses = state["history_losses"].to(torch.float64).clone()
        self._slope_history = state["slope_history"].to(torch.float64).clone()
        self._max_slope_history = state["max_slope_history"].to(torch.float64).clone()
        self._weights = state["weights"].to(torch.float64).clone()
        self._last_step = state["last_step"]
        diagnostics = state["diagnostics"]
        self._diagnostics = None if diagnostics is None else dict(diagnostics)

    # ------------------------------------------------------------------------- private

    def _checked_losses(self, step: int, per_task_valid_loss: torch.Tensor) -> torch.Tensor:
        if step < 0:
            raise ValueError(f"CoBa.update: step must be >= 0, got {step}")
        if not self.should_update(step):
            raise ValueError(
                f"CoBa.update at step {step}: updates happen every {self.update_interval} steps; "
                "call it only when should_update(step) is true"
            )
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"CoBa.update: steps must increase, got step {step} after step {self._last_step}")
        if bool(torch.isnan(self._normalizers).all()):
            raise ValueError("CoBa.update before set_normalizers: give it the losses of a full validation pass first")
        given = torch.as_tensor(per_task_valid_loss).detach()
        if given.numel() != self.num_tasks:
            raise ValueError(f"CoBa.update: expected {self.num_tasks} per-task losses, got shape {tuple(given.shape)}")
        losses = given.to("cpu", torch.float64).reshape(-1)
        bad = ~torch.isnan(losses) & ~(torch.isfinite(losses) & (losses > 0))
        if bool(bad.any()):
            raise ValueError(
                f"CoBa.update at step {step}: validation losses must be > 0 and finite, or nan for a task without "
                f"validation tokens; got {losses.tolist()}"
            )
        return losses


def measurement_batches(batches: list, count: int, tasks_of: Callable[[Any], set]) -> list:
    """The validation micro-batches every CoBa measurement uses: first, greedily, batches that add
    the most tasks not yet measured until every task of the plan is in (a task missing from them
    would have no curve), then batches evenly spread over the rest of the plan, up to `count` in
    all (more when covering the tasks takes more; all of them when the plan has no more).
    Deterministic: every process can compute every process's choice."""
    chosen: list[int] = []
    covered: set = set()
    while True:
        gain, negative_index = max(((len(tasks_of(batch) - covered), -i) for i, batch in enumerate(batches)
                                    if i not in chosen), default=(0, 0))
        if gain == 0:
            break
        chosen.append(-negative_index)
        covered |= tasks_of(batches[-negative_index])
    rest = [i for i in range(len(batches)) if i not in chosen]
    left = min(len(rest), max(0, count - len(chosen)))
    chosen += [rest[(j * len(rest)) // left] for j in range(left)]
    return [batches[i] for i in sorted(chosen)]


def window_slopes(steps: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares slope of each column of values [n, K] against steps [n], skipping nan
    entries column by column (each task keeps its true x positions).

    Returns (slopes [K] float64, fitted [K] bool); a column with fewer than 2 finite values (or
    all at one step) is not fitted and gets slope 0.
    """
    x = steps.to(torch.float64)
    x = (x - x[-1])[:, None]  # centred on the newest step: keeps the sums small and exact-ish
    y = values.to(torch.float64)
    seen = ~torch.isnan(y)
    count = seen.sum(dim=0)
    safe_count = count.clamp_min(1)
    x_mean = torch.where(seen, x, 0.0).sum(dim=0) / safe_count
    y_mean = torch.where(seen, y, 0.0).sum(dim=0) / safe_count
    dx = torch.where(seen, x - x_mean, 0.0)
    dy = torch.where(seen, y - y_mean, 0.0)
    sxx = (dx * dx).sum(dim=0)
    sxy = (dx * dy).sum(dim=0)
    fitted = (count >= 2) & (sxx > 0)
    slopes = torch.where(fitted, sxy / torch.where(fitted, sxx, 1.0), 0.0)
    return slopes, fitted


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where the denominator is 0 (all slopes 0: no signal, uniform scores)."""
    return torch.where(denominator > 0, numerator / torch.where(denominator > 0, denominator, 1.0), 0.0)
