from __future__ import annotations

from math import comb

import pytest

from mft_core.eval.passk import format_pass_at_k_table, pass_at_k, pass_at_k_table


def test_pass_at_k_matches_hand_computations():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - comb(3, 2) / comb(5, 2))  # 0.7
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - comb(7, 5) / comb(10, 5))  # 1 - 21/252
    assert pass_at_k(200, 37, 10) == pytest.approx(1 - comb(163, 10) / comb(200, 10))
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(4, 2, 3) == 1.0  # n - c < k: every draw of 3 contains a correct one
    assert pass_at_k(1, 1, 1) == 1.0


def test_pass_at_k_rejects_undefined_cases():
    with pytest.raises(ValueError, match="undefined"):
        pass_at_k(5, 1, 10)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)


def _records(task_id: str, outcomes: list[bool]) -> list[dict]:
    return [{"task_id": task_id, "sample_index": i, "passed": ok} for i, ok in enumerate(outcomes)]


def test_table_per_language_and_average_only_for_k_up_to_n():
    results = (_records("Python/0", [True, False, False, False])
               + _records("Python/1", [False] * 4)
               + _records("Go/0", [True, True]))
    table = pass_at_k_table(results, ks=(1, 2, 4))
    python, go = table["languages"]["python"], table["languages"]["go"]
    assert (python["problems"], python["samples"], python["passed"]) == (2, 8, 1)
    assert python["pass@1"] == pytest.approx((0.25 + 0.0) / 2)
    assert python["pass@2"] == pytest.approx((1 - comb(3, 2) / comb(4, 2)) / 2)
    assert python["pass@4"] == pytest.approx(0.5)
    assert go["pass@1"] == 1.0 and go["pass@2"] == 1.0
    assert go["pass@4"] is None  # Go has only 2 samples per problem
    # average over languages (each language weighs the same), only where defined
    assert table["average"]["pass@1"] == pytest.approx((0.125 + 1.0) / 2)
    assert table["average"]["pass@4"] == pytest.approx(0.5)
    assert table["average"]["languages@4"] == ["python"]
    text = format_pass_at_k_table(table, (1, 2, 4))
    assert "12.50%" in text and "average" in text and text.splitlines()[3].split()[-1] == "-"
