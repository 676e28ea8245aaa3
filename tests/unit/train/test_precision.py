"""Precision `auto` on CPU: bf16 autocast only where this CPU has the instructions and a bf16
matmul measures clearly faster than fp32; resolved once, by the stage, for every process."""

import math

import pytest

from mft_core.train import model as train_model
from mft_core.train.model import BF16_MIN_SPEEDUP, cpu_bf16_speedup, cpu_has_native_bf16, resolve_precision


def test_auto_on_this_cpu_follows_its_flags_and_a_real_measurement(caplog):
    with caplog.at_level("INFO", logger="mft.train"):
        resolved = resolve_precision("auto", on_gpu=False)
    if not cpu_has_native_bf16():
        assert resolved == "fp32" and "without AMX/AVX512-BF16" in caplog.text
        return
    speedup = cpu_bf16_speedup()  # cached: the value resolve_precision decided with
    assert math.isfinite(speedup) and speedup > 0
    assert resolved == ("bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32")
    assert f"{speedup:.2f}x" in caplog.text


# The CPU under test is fixed, so other CPUs' answers are stood in for (flags and a measurement
# this machine cannot produce); the real measurement is the test above.
@pytest.mark.parametrize("flags, speedup, expected", [
    (False, None, "fp32"),  # AVX2 only: not even measured (bf16 measured ~20x slower there)
    (True, 0.6, "fp32"),    # AVX512-BF16 without AMX (measured here: 0.6x)
    (True, 2.1, "bf16"),    # AMX
])
def test_auto_on_cpu_follows_flags_then_measurement(monkeypatch, flags, speedup, expected):
    monkeypatch.setattr(train_model, "cpu_has_native_bf16", lambda: flags)

    def measured():
        assert flags, "measured without the instructions"
        return speedup

    monkeypatch.setattr(train_model, "cpu_bf16_speedup", measured)
    assert resolve_precision("auto", on_gpu=False) == expected


def test_an_explicit_precision_is_kept():
    assert resolve_precision("fp32", on_gpu=False) == "fp32"
    assert resolve_precision("bf16", on_gpu=False) == "bf16"
