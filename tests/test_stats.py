"""Paired statistics: the vectorised metrics equal scikit-learn/SciPy's, the seed-level t interval is SciPy's, the
bootstrap's weighted metrics equal the metrics of a resample, its Monte Carlo error is honest, Holm and the
detectable difference are statsmodels', and pairs whose seeds, items or labels differ are refused."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, ttest_1samp
from sklearn.metrics import accuracy_score, matthews_corrcoef

from reslora.lab.stats import (METRICS, PairedDifference, compare, constant_baseline, holm, item_terms,
                               paired_difference, weighted_metric)


def test_vectorised_metrics_equal_the_reference_implementations():
    rng = np.random.default_rng(0)
    y = rng.integers(2, size=200)
    preds = rng.integers(2, size=(3, 200))
    np.testing.assert_allclose(METRICS["accuracy"](preds, y), [accuracy_score(y, p) for p in preds])
    np.testing.assert_allclose(METRICS["matthews"](preds, y), [matthews_corrcoef(y, p) for p in preds])
    scores, gold = rng.normal(size=(3, 200)), rng.normal(size=200)
    np.testing.assert_allclose(METRICS["pearson"](scores, gold), [pearsonr(s, gold)[0] for s in scores])
    assert METRICS["matthews"](np.zeros((1, 10)), y[:10])[0] == 0.0  # undefined -> 0, as scikit-learn


@pytest.mark.parametrize("metric", ["accuracy", "matthews", "pearson"])
def test_weighted_sums_give_the_metric_of_the_resample_they_count(metric):
    rng = np.random.default_rng(1)
    label = rng.integers(2, size=300).astype(float) if metric != "pearson" else rng.normal(size=300)
    pred = rng.integers(2, size=(4, 300)).astype(float) if metric != "pearson" else label + rng.normal(size=(4, 300))
    picks = rng.integers(300, size=300)
    counts = np.bincount(picks, minlength=300).astype(float)
    sums = item_terms(metric, pred, label) @ counts
    np.testing.assert_allclose(weighted_metric(metric, sums, 300), METRICS[metric](pred[:, picks], label[picks]),
                               atol=1e-12)
    constant = np.zeros((1, 300))  # no variance: 0, as the metric where it is undefined
    assert weighted_metric(metric, item_terms(metric, constant, label) @ counts, 300)[0] == pytest.approx(
        METRICS[metric](constant, label[picks])[0])


def records(method_accuracy: float, n: int, seeds=(0, 1, 2), seed_offset: int = 0, method: str = "m") -> list[dict]:
    out = []
    for s in seeds:
        rng = np.random.default_rng(100 * s + seed_offset)
        label = np.random.default_rng(7).integers(2, size=n)
        right = rng.random(n) < method_accuracy
        pred = np.where(right, label, 1 - label)
        out.append({"task": "t", "method": method, "seed": s, "headline_mode": "plain", "predictions": {"plain": {
            "test": {"id": list(range(n))[::-1], "prediction": pred[::-1].tolist(), "label": label[::-1].tolist()}}}})
    return out


def test_a_real_difference_is_resolved_and_no_difference_is_not():
    better, worse = records(0.8, 1000, seed_offset=1), records(0.6, 1000, seed_offset=2)
    d = paired_difference(better, worse, "accuracy")
    low, high = d.interval
    assert d.resolved() and low < d.mean < high and 0.15 < d.mean < 0.25 and d.won == 3 and d.items == 1000
    assert d.boot_resolved() and d.boot_low < d.mean < d.boot_high and not d.borderline
    same = paired_difference(records(0.7, 200, seed_offset=3), records(0.7, 200, seed_offset=4), "accuracy")
    assert same.interval[0] < 0 < same.interval[1] and not same.resolved()


def test_the_seed_level_interval_and_p_are_scipys_t_over_the_per_seed_differences():
    d = PairedDifference((0, 1, 2), (0.07, 0.07, 0.02))  # Fig. 3 bs − LoRA: +7, +7, +2 points
    reference = ttest_1samp(d.per_seed, 0)
    np.testing.assert_allclose(d.interval, reference.confidence_interval(0.95), rtol=1e-12)
    assert d.p == pytest.approx(reference.pvalue) and not d.resolved()  # [-1.84, +12.50]: covers 0
    assert round(100 * d.interval[0], 2) == -1.84 and round(100 * d.interval[1], 2) == 12.50
    assert d.interval is d.interval and d.p is d.p  # computed once (cached_property on the frozen dataclass)
    one = PairedDifference((0,), (0.05,))
    assert np.isnan(one.interval).all() and np.isnan(one.p) and not one.resolved() and np.isnan(one.detectable)


def test_detectable_difference_and_holm_are_statsmodels():
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.power import TTestPower

    d = PairedDifference(tuple(range(10)), tuple(np.linspace(-0.02, 0.04, 10)))
    effect = TTestPower().solve_power(nobs=10, alpha=0.05, power=0.8, alternative="two-sided")
    assert d.detectable == pytest.approx(effect * np.std(d.per_seed, ddof=1))
    # at the detectable difference, the test has 80% power
    assert TTestPower().power(d.detectable / d.sd, nobs=10, alpha=0.05) == pytest.approx(0.8, abs=1e-6)
    ps = [0.01, 0.04, float("nan"), 0.03]
    adjusted = holm(ps)
    np.testing.assert_allclose([adjusted[i] for i in (0, 1, 3)], multipletests([0.01, 0.04, 0.03], method="holm")[1])
    assert np.isnan(adjusted[2])


def test_the_bootstrap_is_reproducible_and_its_monte_carlo_error_covers_other_draws():
    row, base = records(0.75, 300, seed_offset=1), records(0.7, 300, seed_offset=2)
    draws = [paired_difference(row, base, "accuracy", seed=s) for s in range(8)]
    assert paired_difference(row, base, "accuracy") == draws[0]  # the default draw is seed 0, every time
    lows = np.array([d.boot_low for d in draws])
    error = np.mean([d.boot_error for d in draws])
    assert 0 < error < 0.01 and lows.std() > 0  # the endpoints move with the draw, by about their error
    assert np.abs(lows - np.median(lows)).max() < 3 * error


def test_a_verdict_that_hangs_on_the_draw_is_borderline():
    label = np.ones(100)
    def diff(row_only: int, base_only: int, seed: int = 0):
        pa, pb = np.zeros((3, 100)), np.zeros((3, 100))
        pa[:, :row_only], pb[:, row_only:row_only + base_only] = 1, 1
        return compare(pa, pb, label, "accuracy", (0, 1, 2), seed=seed)
    flipping = [diff(12, 4, s) for s in range(10)]  # the lower endpoint sits at 0 (or +1 point)
    assert len({d.boot_resolved() for d in flipping}) == 2 and flipping[0].borderline
    assert not diff(12, 2).borderline and diff(12, 2).boot_resolved()  # clear of 0 on every draw


def test_pairs_whose_seeds_items_or_labels_differ_are_refused_naming_what_differs():
    ten, three = records(0.7, 50, seeds=range(10), method="lora"), records(0.7, 50, seed_offset=5, method="adalora")
    with pytest.raises(ValueError, match=r"seeds differ .*7 only in the row .*pass seeds="):
        paired_difference(ten, three, "accuracy")
    d = paired_difference(ten, three, "accuracy", seeds=[0, 1, 2])  # pairing on the common seeds, explicitly
    assert d.seeds == (0, 1, 2) and len(d.per_seed) == 3
    with pytest.raises(ValueError, match=r"seeds \[5\] are not in both"):
        paired_difference(ten, three, "accuracy", seeds=[0, 5])
    fewer = records(0.7, 40, method="adalora")
    with pytest.raises(ValueError, match="test item ids differ"):
        paired_difference(three, fewer, "accuracy")
    relabelled = records(0.7, 50, method="adalora")
    for r in relabelled:
        r["predictions"]["plain"]["test"]["label"][0] = 1 - r["predictions"]["plain"]["test"]["label"][0]
    with pytest.raises(ValueError, match="labels of 1 items differ"):
        paired_difference(three, relabelled, "accuracy")
    mixed = records(0.7, 50, seeds=(0,)) + records(0.7, 40, seeds=(1,))
    with pytest.raises(ValueError, match="seed 1 holds other test items than seed 0"):
        paired_difference(mixed, mixed, "accuracy")


def test_the_constant_baseline_is_the_majority_class_or_no_correlation():
    runs = records(0.9, 400)
    d, constant, value = constant_baseline(runs, "accuracy")
    label = np.array(runs[0]["predictions"]["plain"]["test"]["label"])
    assert constant == float(np.bincount(label).argmax()) and value == pytest.approx(np.mean(label == constant))
    assert d.mean == pytest.approx(np.mean([METRICS["accuracy"](np.array(r["predictions"]["plain"]["test"][
        "prediction"]), label) for r in runs]) - value) and d.resolved()
    assert constant_baseline(runs, "matthews")[2] == 0.0
    scored = [{**r, "predictions": {"plain": {"test": {**r["predictions"]["plain"]["test"], "label": list(
        np.linspace(0, 5, 400))}}}} for r in runs]
    assert constant_baseline(scored, "pearson")[2] == 0.0  # a constant has no correlation


def test_reasoning_records_use_their_correct_flags_and_missing_predictions_give_none():
    def flags(values):
        return [{"seed": 0, "headline_mode": "plain", "predictions": {"plain": {"test": {
            "id": [0, 1, 2, 3], "prediction": ["1", "2", None, "4"], "correct": values}}}}]
    d = paired_difference(flags([True, True, True, False]), flags([True, False, False, False]), "accuracy")
    assert d.mean == pytest.approx(0.5)
    assert paired_difference([{"seed": 0, "headline_mode": "plain"}], flags([True] * 4), "accuracy") is None
