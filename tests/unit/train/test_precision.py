"""Precision `auto` on CPU: bf16 autocast only where this CPU has the instructions and a bf16
matmul measures clearly faster than fp32; resolved once, by the stage, for every process."""

import math

import pytest

from mft_core.train import model as train_model
from mft_core.train.model import BF16_MIN_SPEEDUP, cpu_bf16_speedup, cpu_has_native_bf16, resolve_precision


def test_the_measured_speedup_is_a_real_ratio_and_decides_auto(caplog):
    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no AMX/AVX512-BF16: auto is fp32 without measuring")
    speedup = cpu_bf16_speedup()
    assert math.isfinite(speedup) and speedup > 0
    with caplog.at_level("INFO", logger="mft.train"):
        resolved = resolve_precision("auto", on_gpu=False)
    assert resolved == ("bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32")
    assert f"{speedup:.2f}x" in caplog.text


# The CPU under test is fixed, so other CPUs' answers are stood in for (a measurement or flags we
# cannot produce on this machine); the real measurement is the test above.
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
