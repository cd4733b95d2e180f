"""Paired bootstrap intervals: the vectorised metrics equal scikit-learn/SciPy's, the interval covers the
observed difference, shrinks with more items, and excludes zero only for a real difference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, matthews_corrcoef

from reslora.lab.stats import METRICS, paired_difference


def test_vectorised_metrics_equal_the_reference_implementations():
    rng = np.random.default_rng(0)
    y = rng.integers(2, size=200)
    preds = rng.integers(2, size=(3, 200))
    np.testing.assert_allclose(METRICS["accuracy"](preds, y), [accuracy_score(y, p) for p in preds])
    np.testing.assert_allclose(METRICS["matthews"](preds, y), [matthews_corrcoef(y, p) for p in preds])
    scores, gold = rng.normal(size=(3, 200)), rng.normal(size=200)
    np.testing.assert_allclose(METRICS["pearson"](scores, gold), [pearsonr(s, gold)[0] for s in scores])
    assert METRICS["matthews"](np.zeros((1, 10)), y[:10])[0] == 0.0  # undefined -> 0, as scikit-learn


def records(method_accuracy: float, n: int, seeds=(0, 1, 2), seed_offset: int = 0) -> list[dict]:
    out = []
    for s in seeds:
        rng = np.random.default_rng(100 * s + seed_offset)
        label = np.random.default_rng(7).integers(2, size=n)
        right = rng.random(n) < method_accuracy
        pred = np.where(right, label, 1 - label)
        out.append({"seed": s, "headline_mode": "plain", "predictions": {"plain": {"test": {
            "id": list(range(n))[::-1], "prediction": pred[::-1].tolist(), "label": label[::-1].tolist()}}}})
    return out


def test_a_real_difference_is_resolved_and_no_difference_is_not():
    better, worse = records(0.8, 1000, seed_offset=1), records(0.6, 1000, seed_offset=2)
    d = paired_difference(better, worse, "accuracy")
    assert d.resolved() and d.low < d.mean < d.high and 0.15 < d.mean < 0.25 and d.won == 3 and d.items == 1000
    same = paired_difference(records(0.7, 200, seed_offset=3), records(0.7, 200, seed_offset=4), "accuracy")
    assert same.low < 0 < same.high and not same.resolved()


def test_more_items_give_a_narrower_interval_and_the_same_seed_gives_the_same_interval():
    small = paired_difference(records(0.75, 100, seed_offset=1), records(0.7, 100, seed_offset=2), "accuracy")
    large = paired_difference(records(0.75, 2000, seed_offset=1), records(0.7, 2000, seed_offset=2), "accuracy")
    assert large.high - large.low < small.high - small.low
    again = paired_difference(records(0.75, 100, seed_offset=1), records(0.7, 100, seed_offset=2), "accuracy")
    assert again == small


def test_reasoning_records_use_their_correct_flags_and_missing_predictions_give_none():
    def flags(values):
        return [{"seed": 0, "headline_mode": "plain", "predictions": {"plain": {"test": {
            "id": [0, 1, 2, 3], "prediction": ["1", "2", None, "4"], "correct": values}}}}]
    d = paired_difference(flags([True, True, True, False]), flags([True, False, False, False]), "accuracy")
    assert d.mean == pytest.approx(0.5)
    assert paired_difference([{"seed": 0, "headline_mode": "plain"}], flags([True] * 4), "accuracy") is None
