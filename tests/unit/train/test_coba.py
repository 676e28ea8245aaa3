"""CoBa task weights (mft_core.train.coba) on synthetic validation-loss histories."""

from __future__ import annotations

import io
import math

import pytest
import torch

from mft_core.train.coba import CoBa, measurement_batches, window_slopes

torch.set_num_threads(1)
NAN = float("nan")


def run(coba: CoBa, curves, steps):
    """Feed loss curves (one function of the step per task) at the given steps; return the weights.
    A fresh CoBa is normalized by the curves' first values (as if the full pass measured those)."""
    if coba.state_dict()["last_step"] is None:
        coba.set_normalizers(torch.tensor([curve(steps[0]) for curve in curves], dtype=torch.float64))
    out = []
    for step in steps:
        out.append(coba.update(step, torch.tensor([curve(step) for curve in curves], dtype=torch.float64)))
    return out


def linear(start, slope):
    return lambda step: start + slope * step


def diverging_after(turn, start=1.0, down=-0.03, up=0.01, floor=0.5):
    """exp-shaped convergence, then a steady rise from step `turn` on (overfitting)."""
    def curve(step):
        if step < turn:
            return math.exp(down * step) * start + floor
        return math.exp(down * turn) * start + floor + up * (step - turn)
    return curve


def test_first_active_update_matches_the_formulas_by_hand():
    # Normalized curves 1 - 0.01 t and 1 - 0.005 t (raw 2 - 0.02 t and 1 - 0.005 t):
    # slopes a = (-0.01, -0.005), sum |a| = 0.015.
    # RCS = softmax(2 a / 0.015) = softmax(-4/3, -2/3) = (0.33924363123418283, 0.6607563687658172)
    # ACS: one slope in the window: softmax(-1 * a / |a|) = softmax(1, 1) = (0.5, 0.5)
    # DF: one max-slope so far: 1 * softmax([z])[0] = 1
    # mixed = softmax(2 * RCS) = (0.3445629472027003, 0.6554370527972997)
    # w = 0.05 + 0.9 * mixed (floor 1/(10 K) = 0.05)
    coba = CoBa(2, warmup_steps=4, history_length=10)
    weights = run(coba, [linear(2.0, -0.02), linear(1.0, -0.005)], range(5))
    for early in weights[:4]:
        assert early.tolist() == [0.5, 0.5]  # warmup: uniform
    torch.testing.assert_close(weights[4], torch.tensor([0.3601066524824303, 0.6398933475175698], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    info = coba.diagnostics
    torch.testing.assert_close(info["slopes"], torch.tensor([-0.01, -0.005], dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(info["rcs"], torch.tensor([0.33924363123418283, 0.6607563687658172], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert info["acs"].tolist() == pytest.approx([0.5, 0.5], abs=1e-12)
    assert info["divergence_factor"] == 1.0


def test_slower_converging_task_gains_weight():
    coba = CoBa(3, warmup_steps=10, history_length=20)
    weights = run(coba, [linear(1.0, -0.004), linear(1.0, -0.001), linear(1.0, -0.002)], range(60))
    final = weights[-1]
    assert final[1] > final[2] > final[0]  # slowest first
    # Steady (linear) convergence: every max-slope equals the last, so DF = 1 exactly (RCS only).
    assert coba.diagnostics["divergence_factor"] == pytest.approx(1.0, abs=1e-12)


def test_diverging_task_loses_weight_and_divergence_factor_drops():
    coba = CoBa(2, warmup_steps=10, history_length=20)
    weights = run(coba, [diverging_after(10_000), diverging_after(35)], range(70))
    # Before the turn, task 1 is the same curve as task 0.
    assert weights[30][0].item() == pytest.approx(weights[30][1].item(), abs=1e-12)
    assert coba.diagnostics["divergence_factor"] < 1e-3  # ACS has taken over
    assert weights[-1][1] < 0.25 < 0.75 < weights[-1][0]
    assert coba.diagnostics["acs"][1] < coba.diagnostics["acs"][0]


def test_divergence_factor_is_clipped_to_one_when_convergence_accelerates():
    # Losses falling faster and faster: the current max-slope is the steepest ever, so
    # m * softmax(...)[last] exceeds 1; as a mixing factor it is clipped to exactly 1.
    coba = CoBa(2, warmup_steps=5, history_length=5)
    run(coba, [lambda t: 10.0 - 0.01 * t * t, lambda t: 10.0 - 0.02 * t * t], range(20))
    info = coba.diagnostics
    assert info["divergence_factor"] == 1.0


def test_weights_stay_on_the_simplex_above_the_floor():
    curves = [diverging_after(12, up=0.2), linear(1.0, -0.0001), diverging_after(10_000, down=-0.2), linear(5.0, -0.01)]
    for floor in (0.0, 0.02, 0.25):
        coba = CoBa(4, warmup_steps=5, history_length=8, min_weight=floor)
        for weights in run(coba, curves, range(40)):
            assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
            assert float(weights.min()) >= floor - 1e-15
    # floor = 1/K pins the weights to uniform.
    assert coba.weights.tolist() == pytest.approx([0.25] * 4, abs=1e-15)
    with pytest.raises(ValueError, match="min_weight must be in"):
        CoBa(4, min_weight=0.3)


def test_the_full_pass_normalises_and_the_curves_are_the_same_batches_measured_again():
    """The full validation pass before training divides the curves and is no point of them: with
    nothing trained, the measurement batches give the same losses at every step, the curves are
    flat, and the weights stay uniform (a full pass of 2.0 then batches of 1.5 would be a slope)."""
    coba = CoBa(2, warmup_steps=1, history_length=5)
    coba.set_normalizers(torch.tensor([2.0, 4.0]))
    weights = [coba.update(step, torch.tensor([1.5, 3.0])) for step in range(5)]
    assert coba.state_dict()["history_losses"].tolist() == [[0.75, 0.75]] * 5
    assert coba.diagnostics["slopes"].tolist() == [0.0, 0.0]
    assert all(w.tolist() == pytest.approx([0.5, 0.5], abs=1e-15) for w in weights)


def test_measurement_batches_hold_every_task_then_spread_over_the_plan():
    # ten micro-batches (the tasks each holds): task 2 only in batch 7, task 1 only in 4 and 8
    tasks = [{0}, {0}, {0}, {0}, {0, 1}, {0}, {0}, {0, 2}, {1}, {0}]
    plan = list(range(10))
    of = lambda batch: tasks[batch]
    assert measurement_batches(plan, 2, of) == [4, 7]  # the fewest batches that hold every task
    assert measurement_batches(plan, 1, of) == [4, 7]  # more than asked: every task needs a curve
    assert measurement_batches(plan, 4, of) == [0, 4, 5, 7]  # then evenly over the others (0, 5)
    assert measurement_batches(plan, 4, of) == measurement_batches(plan, 4, of)  # fixed
    assert measurement_batches(plan, 12, of) == plan  # fewer than asked: all of them


def test_missing_measurements_keep_their_true_step_positions():
    steps = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    line = 1.0 - 0.01 * steps.double()
    values = torch.stack([line, line], dim=1)
    values[[1, 2, 5], 0] = NAN  # task 0 missing at steps 1, 2 and 5
    values[:7, 1] = NAN  # task 1 seen once: no slope
    slopes, fitted = window_slopes(steps, values)
    assert fitted.tolist() == [True, False]
    assert slopes[0].item() == pytest.approx(-0.01, abs=1e-15)  # MFTCoder's shifted x gives -0.017

    # Through CoBa: a task absent from some measurements still gets its exact slope.
    coba = CoBa(2, warmup_steps=6, history_length=10)
    coba.set_normalizers(torch.tensor([1.0, 2.0]))
    for step in range(10):
        task0 = NAN if step in (2, 3, 7) else 1.0 - 0.01 * step
        coba.update(step, torch.tensor([task0, 2.0 - 0.01 * step], dtype=torch.float64))
    assert coba.diagnostics["slopes"].tolist() == pytest.approx([-0.01, -0.005], abs=1e-14)


def test_task_without_slope_gets_the_mean_slope_and_is_left_out_of_the_max():
    coba = CoBa(3, warmup_steps=2, history_length=4)
    coba.set_normalizers(torch.tensor([1.0, 1.0, 1.0]))
    for step in range(4):
        losses = [1.0 - 0.01 * step, 1.0 - 0.03 * step, 1.0 if step == 0 else NAN]
        coba.update(step, torch.tensor(losses, dtype=torch.float64))
    assert coba.diagnostics["slopes"].tolist() == pytest.approx([-0.01, -0.03, -0.02], abs=1e-14)


def test_update_interval_above_one_uses_true_steps():
    coba = CoBa(2, warmup_steps=12, history_length=10, update_interval=5)  # warmup not a multiple of 5
    assert [coba.should_update(s) for s in (0, 5, 7, 10)] == [True, True, False, True]
    weights = run(coba, [linear(2.0, -0.02), linear(1.0, -0.005)], range(0, 30, 5))
    assert [w.tolist() for w in weights[:3]] == [[0.5, 0.5]] * 3  # steps 0, 5, 10 < warmup
    # Slopes are per optimizer step, whatever the interval; same weights as the hand example.
    assert coba.diagnostics["slopes"].tolist() == pytest.approx([-0.01, -0.005], abs=1e-14)
    torch.testing.assert_close(weights[3], torch.tensor([0.3601066524824303, 0.6398933475175698], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="every 5 steps"):
        coba.update(32, torch.tensor([1.0, 1.0]))


def test_bad_inputs_get_clear_errors():
    coba = CoBa(2)
    with pytest.raises(ValueError, match="before set_normalizers"):
        coba.update(3, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="expected 2 losses > 0"):
        coba.set_normalizers(torch.tensor([0.0, 2.0]))
    coba.set_normalizers(torch.tensor([1.0, 2.0]))
    coba.update(3, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="steps must increase"):
        coba.update(3, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="expected 2 per-task losses"):
        coba.update(4, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="must be > 0 and finite"):
        coba.update(4, torch.tensor([-1.0, 2.0]))
    with pytest.raises(ValueError, match="must be > 0 and finite"):
        coba.update(4, torch.tensor([float("inf"), 2.0]))
    with pytest.raises(ValueError, match="history_length must be >= 2"):
        CoBa(2, history_length=1)


def gappy_curves():
    """Three tasks, one diverging, one missing from every third measurement."""
    up = diverging_after(30)
    return [
        lambda t: NAN if t % 3 == 1 else 1.5 * math.exp(-0.02 * t) + 0.2,
        up,
        lambda t: 0.8 - 0.002 * t + 0.01 * math.sin(t),
    ]


def test_state_round_trip():
    coba = CoBa(3, warmup_steps=10, history_length=6, update_interval=2)
    run(coba, gappy_curves(), range(0, 40, 2))
    state = coba.state_dict()
    restored = CoBa(3, warmup_steps=10, history_length=6, update_interval=2)
    restored.load_state_dict(state)
    again = restored.state_dict()
    assert state.keys() == again.keys()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(again[key], value, rtol=0, atol=0, equal_nan=True)
        elif key != "diagnostics":
            assert again[key] == value
    assert again["diagnostics"]["divergence_factor"] == state["diagnostics"]["divergence_factor"]
    assert torch.equal(restored.weights, coba.weights)

    with pytest.raises(ValueError, match="tau=5.0 but this run has 3.0"):
        CoBa(3, warmup_steps=10, history_length=6, update_interval=2, tau=3.0).load_state_dict(state)
    with pytest.raises(ValueError, match="not a CoBa state"):
        restored.load_state_dict({"weights": state["weights"]})


def test_resume_after_warmup_equals_an_uninterrupted_run():
    settings = dict(warmup_steps=10, history_length=6, update_interval=2)
    steps = list(range(0, 80, 2))
    uninterrupted = run(CoBa(3, **settings), gappy_curves(), steps)

    first = CoBa(3, **settings)
    before = run(first, gappy_curves(), steps[:20])  # up to step 38, well past warmup
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # what a checkpoint does
    buffer.seek(0)
    resumed = CoBa(3, **settings)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    after = run(resumed, gappy_curves(), steps[20:])

    assert len(before + after) == len(uninterrupted)
    for got, expected in zip(before + after, uninterrupted):
        assert torch.equal(got, expected)
    assert not torch.equal(uninterrupted[-1], uninterrupted[10])  # the weights did move
