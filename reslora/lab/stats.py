"""Paired statistics between two methods on the same test items and seeds.

Both methods are evaluated on the same test items with the same seeds, so their difference is paired twice: by
seed (same data order, same initialisation of what they share) and by item. Two intervals, both 95%:

- **Seed-level** (the verdict): a t interval over the per-seed differences (n − 1 degrees of freedom). Seeds are
  the units that vary between runs; with 3 of them, a bootstrap that resamples seeds sees only 10 distinct seed
  multisets (one in nine replicates uses one seed three times) and is too narrow, whereas the t interval is exact
  when the per-seed differences are normal. A difference is *resolved* only when this interval excludes 0. Its
  p-value (paired t test) is what Holm's correction adjusts within a table (``holm``).
- **Item-and-seed bootstrap** (a second view, which also sees the test set's sampling noise): seeds with
  replacement, then test items with replacement (the same items for both methods and every seed), the mean over
  seeds of (metric of the row − metric of the baseline); the percentile interval of ``REPLICATES`` replicates.
  Its endpoints carry Monte Carlo error: the half-width of the distribution-free 95% interval of each quantile
  from the order statistics of the replicates (binomial ranks). A bootstrap verdict (excludes 0 or not) that
  another random draw could flip, an endpoint whose Monte Carlo interval reaches across 0, is *borderline*.

Metrics are the tasks' own (accuracy, Matthews correlation, Pearson correlation), recomputed on each resample from
weighted sums of per-item terms (item counts as weights), vectorised over replicates and seeds. For accuracy and
Matthews correlation the sums are integer counts, exact in any summation order, so the intervals are the same bits
on any machine and thread count.

Pairs must match: ``paired_difference`` refuses rows whose seeds, item ids or labels differ, and names what differs.
A table that compares rows run with different seeds passes the common ones (``seeds=``) and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from scipy.stats import norm
from scipy.stats import t as student_t

REPLICATES = 10_000
SEED = 0
LEVEL = 0.95          # of both intervals
POWER = 0.8           # of the detectable difference (two-sided test at 1 − LEVEL)
BLOCK = 1000          # replicates drawn and scored at once (memory: BLOCK × items weights)


def accuracy(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    return (pred == label).mean(-1)


def matthews(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Binary Matthews correlation along the last axis (0 where it is undefined, as scikit-learn)."""
    return weighted_metric("matthews", item_terms("matthews", pred, label).sum(-1), pred.shape[-1])


def pearson(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    y = np.broadcast_to(label, pred.shape)
    pc, yc = pred - pred.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    denominator = np.sqrt((pc ** 2).sum(-1) * (yc ** 2).sum(-1))
    return np.divide((pc * yc).sum(-1), denominator, out=np.zeros(pc.shape[:-1]), where=denominator > 0)


METRICS = {"accuracy": accuracy, "matthews": matthews, "pearson": pearson}


def item_terms(metric: str, pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(terms, seeds, items): per-item terms whose weighted sums over items determine ``metric`` (weighted_metric)."""
    if metric == "accuracy":
        return (pred == label)[None].astype(float)
    if metric == "matthews":
        p, y = pred.astype(bool), np.broadcast_to(label, pred.shape).astype(bool)
        return np.stack([p & y, ~p & ~y, p & ~y, ~p & y]).astype(float)
    if metric == "pearson":  # centred first (Pearson is shift-invariant): the raw moments below stay accurate
        x, y = pred - pred.mean(-1, keepdims=True), np.broadcast_to(label - label.mean(), pred.shape)
        return np.stack([x, y, x * x, y * y, x * y])
    raise ValueError(f"unknown metric {metric!r}; accepted: {sorted(METRICS)}")


def weighted_metric(metric: str, sums: np.ndarray, total: float) -> np.ndarray:
    """The metric from the weighted sums of item_terms (first axis) over ``total`` weighted items."""
    if metric == "accuracy":
        return sums[0] / total
    if metric == "matthews":  # sums: the confusion matrix's counts
        tp, tn, fp, fn = sums
        denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return np.divide(tp * tn - fp * fn, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    sx, sy, sxx, syy, sxy = sums
    varx, vary = sxx - sx * sx / total, syy - sy * sy / total
    denominator = np.sqrt(np.clip(varx, 0, None) * np.clip(vary, 0, None))
    return np.divide(sxy - sx * sy / total, denominator, out=np.zeros_like(denominator), where=denominator > 0)


@lru_cache(maxsize=None)
def detectable_effect(n: int) -> float:
    """The smallest standardised mean difference (mean / SD of the per-seed differences) that a two-sided paired t
    test at 1 − LEVEL detects with POWER on ``n`` seeds (statsmodels' TTestPower); nan below 2 seeds."""
    if n < 2:
        return math.nan
    from statsmodels.stats.power import TTestPower

    return float(TTestPower().solve_power(nobs=n, alpha=1 - LEVEL, power=POWER, alternative="two-sided"))


@dataclass(frozen=True)
class PairedDifference:
    seeds: tuple[int, ...]
    per_seed: tuple[float, ...]   # row − baseline on each seed, in the metric's units (0-1 for accuracy)
    lower_is_better: bool = False
    items: int | None = None      # test items paired; None: no per-item predictions, no bootstrap
    boot_low: float = math.nan    # item-and-seed bootstrap, 95% percentile interval
    boot_high: float = math.nan
    boot_error: float = math.nan  # Monte Carlo error of its endpoints (the larger half-width)
    borderline: bool = False      # the bootstrap's verdict could flip with another random draw

    @cached_property
    def mean(self) -> float:
        return float(np.mean(self.per_seed))

    @cached_property
    def sd(self) -> float:
        """SD of the per-seed differences (nan with one seed)."""
        return float(np.std(self.per_seed, ddof=1)) if len(self.per_seed) > 1 else math.nan

    @property
    def won(self) -> int:
        """Seeds on which the row is better."""
        d = np.asarray(self.per_seed)
        return int((d < 0).sum() if self.lower_is_better else (d > 0).sum())

    @cached_property
    def interval(self) -> tuple[float, float]:
        """Seed-level 95% t interval of the mean difference (nan with one seed)."""
        n = len(self.per_seed)
        if n < 2:
            return math.nan, math.nan
        half = student_t.ppf((1 + LEVEL) / 2, n - 1) * self.sd / math.sqrt(n)
        return self.mean - half, self.mean + half

    @cached_property
    def p(self) -> float:
        """Two-sided p of the paired t test on the per-seed differences (nan with one seed; identical differences:
        0 when they are not 0, else 1)."""
        n = len(self.per_seed)
        if n < 2:
            return math.nan
        if self.sd == 0:
            return float(self.mean == 0)
        return float(2 * student_t.sf(abs(self.mean) / (self.sd / math.sqrt(n)), n - 1))

    @property
    def detectable(self) -> float:
        """The smallest true mean difference a paired t test on these seeds detects with 80% power at the observed
        SD of the per-seed differences (two-sided 5%)."""
        return detectable_effect(len(self.per_seed)) * self.sd

    def resolved(self) -> bool:
        """The seed-level interval excludes zero."""
        low, high = self.interval
        return low > 0 or high < 0

    def boot_resolved(self) -> bool:
        return self.boot_low > 0 or self.boot_high < 0


def holm(ps: list[float]) -> list[float]:
    """Holm-adjusted p-values of one family (statsmodels); nan (one seed) stays nan and is not counted."""
    from statsmodels.stats.multitest import multipletests

    finite = [i for i, p in enumerate(ps) if not math.isnan(p)]
    adjusted = [math.nan] * len(ps)
    if finite:
        for i, q in zip(finite, multipletests([ps[i] for i in finite], alpha=1 - LEVEL, method="holm")[1]):
            adjusted[i] = float(q)
    return adjusted


def item_arrays(records: list[dict], mode: str | None = None, split: str = "test", flag: str = "correct"
                ) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray] | None:
    """{seed: predictions} in eval ``mode`` (default: each record's headline mode) over the items (sorted by id),
    their labels, and the ids; None when a record has no per-item predictions. Reasoning and text-to-image records
    hold 0/1 flags per item (``correct``; text-to-image also ``content`` and ``styled``): the prediction is then
    the ``flag`` against an all-ones label (accuracy = mean flag). Refuses records of one row that hold the same
    seed twice, different item ids or different labels for an item."""
    per_seed, labels = {}, {}
    for r in records:
        items = (r.get("predictions") or {}).get(mode or r.get("headline_mode"), {}).get(split)
        if not items:
            return None
        if r["seed"] in per_seed:
            raise ValueError(f"{r.get('task')}/{r.get('method')}: two records of seed {r['seed']}")
        if "correct" in items:
            pred, label = dict(zip(items["id"], np.asarray(items[flag], dtype=float))), dict.fromkeys(items["id"], 1.0)
        else:
            pred, label = dict(zip(items["id"], items["prediction"])), dict(zip(items["id"], items["label"]))
        first_seed, first = next(iter(per_seed.items()), (None, None))
        if first is not None and set(pred) != set(first):
            raise ValueError(f"{r.get('task')}/{r.get('method')}: seed {r['seed']} holds other test items than seed "
                             f"{first_seed} ({describe_difference(set(pred), set(first))})")
        clash = [i for i in label if i in labels and labels[i] != label[i]]
        if clash:
            raise ValueError(f"{r.get('task')}/{r.get('method')}: seed {r['seed']} labels {len(clash)} items "
                             f"differently (e.g. id {clash[0]}: {label[clash[0]]} vs {labels[clash[0]]})")
        per_seed[r["seed"]] = pred
        labels.update(label)
    ids = np.array(sorted(labels))
    return ({seed: np.array([p[i] for i in ids], dtype=float) for seed, p in per_seed.items()},
            np.array([labels[i] for i in ids], dtype=float), ids)


def describe_difference(a: set, b: set, names: tuple[str, str] = ("this", "the other")) -> str:
    only_a, only_b = sorted(a - b), sorted(b - a)
    return "; ".join(f"{len(only)} only in {name} (e.g. {only[:3]})" for only, name in ((only_a, names[0]),
                                                                                         (only_b, names[1])) if only)


def paired_difference(row: list[dict], baseline: list[dict], metric: str, lower_is_better: bool = False,
                      row_mode: str | None = None, baseline_mode: str | None = None,
                      replicates: int = REPLICATES, seed: int = SEED, flag: str = "correct",
                      seeds: list[int] | None = None) -> PairedDifference | None:
    """The row's records minus the baseline's (same task; paired by seed and item), each in its eval mode
    (default: the record's headline mode). None without per-item predictions. Values are in the metric's units
    (0-1 for accuracy). ``flag``: which per-item flag records of 0/1 flags compare. ``seeds``: pair on these
    seeds only (each must be in both); by default both must hold the same seeds. Raises ValueError, naming what
    differs, when the seeds, item ids or labels of the two differ."""
    a, b = item_arrays(row, row_mode, flag=flag), item_arrays(baseline, baseline_mode, flag=flag)
    if a is None or b is None:
        return None
    name = f"{row[0].get('task')}: {row[0].get('method')} − {baseline[0].get('method')}"
    sides = ("the row", "the baseline")
    if seeds is None:
        if set(a[0]) != set(b[0]):
            raise ValueError(f"{name}: the seeds differ ({describe_difference(set(a[0]), set(b[0]), sides)}); "
                             "pass seeds= to pair on the common ones")
        seeds = sorted(a[0])
    missing = sorted(set(seeds) - (set(a[0]) & set(b[0])))
    if missing or not seeds:
        raise ValueError(f"{name}: seeds {missing or seeds} are not in both (row: {sorted(a[0])}, "
                         f"baseline: {sorted(b[0])})")
    if not np.array_equal(a[2], b[2]):
        raise ValueError(f"{name}: the test item ids differ ({describe_difference(set(a[2]), set(b[2]), sides)})")
    if not np.array_equal(a[1], b[1]):
        bad = np.flatnonzero(a[1] != b[1])
        raise ValueError(f"{name}: the labels of {len(bad)} items differ (e.g. id {a[2][bad[0]]}: {a[1][bad[0]]} "
                         f"vs {b[1][bad[0]]})")
    return compare(np.stack([a[0][s] for s in seeds]), np.stack([b[0][s] for s in seeds]), a[1], metric,
                   tuple(int(s) for s in seeds), lower_is_better, replicates, seed)


def constant_baseline(records: list[dict], metric: str, replicates: int = REPLICATES, seed: int = SEED
                      ) -> tuple[PairedDifference, float, float] | None:
    """The records (one row, headline mode) minus the best constant prediction of their test split: the majority
    label for accuracy and Matthews correlation (whose value for it is 0), the mean label for Pearson (a constant
    has no correlation: 0, as the metric says where it is undefined). Returns the difference, the constant and
    the baseline's metric; None without per-item predictions."""
    arrays = item_arrays(records)
    if arrays is None:
        return None
    per_seed, label, _ = arrays
    if metric == "pearson":
        constant = float(label.mean())
    else:
        values, counts = np.unique(label, return_counts=True)
        constant = float(values[np.argmax(counts)])  # ties: the smaller label
    seeds = sorted(per_seed)
    pred = np.stack([per_seed[s] for s in seeds])
    base = np.full_like(pred, constant)
    d = compare(pred, base, label, metric, tuple(int(s) for s in seeds), False, replicates, seed)
    return d, constant, float(METRICS[metric](base[:1], label)[0])


def compare(pa: np.ndarray, pb: np.ndarray, label: np.ndarray, metric: str, seeds: tuple[int, ...],
            lower_is_better: bool = False, replicates: int = REPLICATES, seed: int = SEED) -> PairedDifference:
    """(seeds, items) predictions of the row and the baseline on the same items -> their PairedDifference."""
    score = METRICS[metric]
    per_seed = score(pa, label) - score(pb, label)
    low, high, error, borderline = bootstrap(pa, pb, label, metric, replicates, seed)
    return PairedDifference(seeds, tuple(float(x) for x in per_seed), lower_is_better, pa.shape[1],
                            low, high, error, borderline)


def bootstrap(pa: np.ndarray, pb: np.ndarray, label: np.ndarray, metric: str, replicates: int, seed: int
              ) -> tuple[float, float, float, bool]:
    """The item-and-seed bootstrap's 95% percentile interval of the mean over seeds of (row − baseline), the
    Monte Carlo error of its endpoints and whether its verdict is borderline (module docstring)."""
    n, items = pa.shape
    terms = np.concatenate([item_terms(metric, pa, label), item_terms(metric, pb, label)])  # (2k, n, items)
    k = len(terms) // 2
    flat = terms.reshape(-1, items).T  # (items, 2k·n)
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, replicates, BLOCK):
        size = min(BLOCK, replicates - start)
        draws = rng.integers(items, size=(size, items)) + items * np.arange(size)[:, None]
        weights = np.bincount(draws.ravel(), minlength=size * items).reshape(size, items).astype(float)
        sums = (weights @ flat).T.reshape(2 * k, n, size)  # item counts as weights: (2k, seeds, replicates)
        diff = weighted_metric(metric, sums[:k], items) - weighted_metric(metric, sums[k:], items)  # (n, size)
        picks = rng.integers(n, size=(size, n))  # seeds with replacement
        means.append(np.take_along_axis(diff.T, picks, axis=1).mean(1))
    means = np.sort(np.concatenate(means))
    low, high = np.percentile(means, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    errors, borderline = [], False
    for q, endpoint_sign in (((1 - LEVEL) / 2, 1), ((1 + LEVEL) / 2, -1)):
        # the order statistics that bound the q-quantile at LEVEL confidence (normal approximation of the binomial)
        spread = norm.ppf((1 + LEVEL) / 2) * math.sqrt(replicates * q * (1 - q))
        lo = means[max(0, math.floor(replicates * q - spread))]
        hi = means[min(replicates - 1, math.ceil(replicates * q + spread))]
        errors.append((hi - lo) / 2)
        # lower endpoint: another draw could put it on either side of 0 (same for the upper one, mirrored)
        borderline |= (lo <= 0 < hi) if endpoint_sign > 0 else (lo < 0 <= hi)
    return float(low), float(high), float(max(errors)), bool(borderline)
