"""Paired statistics between two methods on the same test items: a bootstrap over items and seeds.

Both methods are evaluated on the same test items with the same seeds, so their difference is paired twice:
by seed (same data order, same initialisation of what they share) and by item. The interval resamples
both: seeds with replacement, then test items with replacement (the same items for both methods and every
seed), and recomputes the mean over seeds of (metric of the row − metric of the baseline). The percentile
interval of those replicates is the 95% interval. Metrics are the tasks' own (accuracy, Matthews
correlation, Pearson correlation), recomputed on each resample, vectorised over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REPLICATES = 2000
SEED = 0


def accuracy(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    return (pred == label).mean(-1)


def matthews(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Binary Matthews correlation along the last axis (0 where it is undefined, as scikit-learn)."""
    p, y = pred.astype(bool), np.broadcast_to(label, pred.shape).astype(bool)
    tp, tn = (p & y).sum(-1, dtype=float), (~p & ~y).sum(-1, dtype=float)
    fp, fn = (p & ~y).sum(-1, dtype=float), (~p & y).sum(-1, dtype=float)
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.divide(tp * tn - fp * fn, denominator, out=np.zeros_like(tp), where=denominator > 0)


def pearson(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    y = np.broadcast_to(label, pred.shape)
    pc, yc = pred - pred.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    denominator = np.sqrt((pc ** 2).sum(-1) * (yc ** 2).sum(-1))
    return np.divide((pc * yc).sum(-1), denominator, out=np.zeros(pc.shape[:-1]), where=denominator > 0)


METRICS = {"accuracy": accuracy, "matthews": matthews, "pearson": pearson}


@dataclass(frozen=True)
class PairedDifference:
    mean: float          # mean over seeds of (row − baseline), in the metric's units
    low: float           # 95% interval
    high: float
    won: int             # seeds on which the row is better
    seeds: int
    items: int

    def resolved(self) -> bool:
        """The interval excludes zero."""
        return self.low > 0 or self.high < 0


def item_arrays(records: list[dict], mode: str | None = None, split: str = "test", flag: str = "correct"
                ) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray] | None:
    """{seed: predictions} in eval ``mode`` (default: each record's headline mode) over the items every record
    holds (sorted by id), their labels, and the ids; None when a record has no per-item predictions. Reasoning
    and text-to-image records hold 0/1 flags per item (``correct``; text-to-image also ``content`` and
    ``styled``): the prediction is then the ``flag`` against an all-ones label (accuracy = mean flag)."""
    per_seed, labels = {}, {}
    for r in records:
        items = (r.get("predictions") or {}).get(mode or r.get("headline_mode"), {}).get(split)
        if not items:
            return None
        if "correct" in items:
            pred = dict(zip(items["id"], np.asarray(items[flag], dtype=float)))
            labels.update(dict.fromkeys(items["id"], 1.0))
        else:
            pred = dict(zip(items["id"], items["prediction"]))
            labels.update(zip(items["id"], items["label"]))
        per_seed[r["seed"]] = pred
    ids = np.array(sorted(set.intersection(*(set(p) for p in per_seed.values()))))
    return ({seed: np.array([p[i] for i in ids], dtype=float) for seed, p in per_seed.items()},
            np.array([labels[i] for i in ids], dtype=float), ids)


def paired_difference(row: list[dict], baseline: list[dict], metric: str, lower_is_better: bool = False,
                      row_mode: str | None = None, baseline_mode: str | None = None,
                      replicates: int = REPLICATES, seed: int = SEED, flag: str = "correct"
                      ) -> PairedDifference | None:
    """The row's records minus the baseline's (same task; paired by seed and item), each in its eval mode
    (default: the record's headline mode). None without per-item predictions or without a common seed. Values
    are in the metric's units (0-1 for accuracy). ``flag``: which per-item flag records of 0/1 flags compare."""
    a, b = item_arrays(row, row_mode, flag=flag), item_arrays(baseline, baseline_mode, flag=flag)
    if a is None or b is None:
        return None
    seeds = sorted(set(a[0]) & set(b[0]))
    common = np.intersect1d(a[2], b[2])
    if not seeds or not len(common):
        return None
    pick_a, pick_b = np.searchsorted(a[2], common), np.searchsorted(b[2], common)
    pa = np.stack([a[0][s][pick_a] for s in seeds])
    pb = np.stack([b[0][s][pick_b] for s in seeds])
    label = a[1][pick_a]
    score = METRICS[metric]
    per_seed = score(pa, label) - score(pb, label)
    rng = np.random.default_rng(seed)
    replicate_means = np.empty(replicates)
    for k in range(replicates):
        s = rng.integers(len(seeds), size=len(seeds))
        i = rng.integers(len(common), size=len(common))
        replicate_means[k] = (score(pa[s][:, i], label[i]) - score(pb[s][:, i], label[i])).mean()
    low, high = np.percentile(replicate_means, [2.5, 97.5])
    won = per_seed < 0 if lower_is_better else per_seed > 0
    return PairedDifference(float(per_seed.mean()), float(low), float(high), int(won.sum()), len(seeds), len(common))
