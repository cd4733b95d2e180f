"""Run records -> tables (mean ± std over seeds, with n; paired intervals). Nothing here trains or evaluates:
every number comes from a record, so tables can be rebuilt at any time. Figures: figures.py."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .records import load_records
from .stats import LEVEL, POWER, REPLICATES, PairedDifference, constant_baseline, holm, paired_difference


ROW_LABELS = {"lora": "LoRA (r=4)", "lora_r16": "LoRA (r=16)", "peft_lora": "PEFT LoRA (r=4)", "adalora": "AdaLoRA",
              "loha": "LoHa", "lokr": "LoKr", "reslora_is": "ResLoRA_is", "reslora_bs": "ResLoRA_bs",
              "reslora_ms": "ResLoRA_ms", "zero_shot": "Zero-shot (base model)",
              "lora_alpha16": "LoRA (r=4, alpha=16), control", "lora_alpha32": "LoRA (r=4, alpha=32), control",
              "lora_alpha64": "LoRA (r=4, alpha=64), control", "lora_alpha73": "LoRA (alpha=73), first control pick",
              "lora_alpha113": "LoRA (alpha=113), control",
              "reslora_is_detached": "ResLoRA_is, shortcut detached",
              "reslora_bs_detached": "ResLoRA_bs, shortcut detached", "reslora_ms_detached": "ResLoRA_ms, shortcut detached"}
TASK_LABELS = {"cola": "CoLA (Mcc)", "sst2": "SST-2 (Acc)", "mrpc": "MRPC (Acc)", "qqp": "QQP (Acc)",
               "mnli": "MNLI (Acc)", "qnli": "QNLI (Acc)", "rte": "RTE (Acc)", "stsb": "STS-B (Pearson)",
               "wnli": "WNLI (Acc)", "gsm8k": "GSM8K (Acc)", "svamp": "SVAMP (Acc)", "mathqa": "MathQA (Acc)",
               "metamathqa": "MetaMathQA (Acc on GSM8K)", "hellaswag": "HellaSwag (Acc)"}
RESLORA_ROWS = ("reslora_is", "reslora_bs", "reslora_ms")
LAST_STEPS = 5  # the train loss a run ends at: its mean over these last steps
CONTROL_ROWS = ("lora_alpha16", "lora_alpha32", "lora_alpha64", "lora_alpha113", "lora_alpha73")  # not in the paper: LoRA at the scale ResLoRA rows merge with


def task_name(task: str) -> str:
    """A task's display name without its metric ("SVAMP")."""
    return TASK_LABELS.get(task, task).split(" (")[0]


def task_column(task: str, metric: str | None = None) -> str:
    """A task's column header: with its test metric ("SVAMP (Acc)"), or with ``metric`` instead."""
    return TASK_LABELS.get(task, task) if metric is None else f"{task_name(task)} ({metric})"


def label(method: str, r: int | None = None) -> str:
    """A row's display name; the pre_num ablation's methods are named reslora_<variant>_pre<k>. ``r``: the
    rank a run actually used, where a scale overrides the method's (LoRA's name carries its rank)."""
    if method == "lora" and r is not None:
        return f"LoRA (r={r})"
    match = re.fullmatch(r"reslora_(bs|ms)_pre(-?\d+)", method)
    if match:
        k = {"-1": "all"}.get(match.group(2), match.group(2))
        return f"ResLoRA_{match.group(1)} pre_num={k}" + (" (= LoRA)" if k == "0" else "")
    return ROW_LABELS.get(method, method)


def headline_frame(records: list[dict]) -> pd.DataFrame:
    """One row per successful run: task, method, seed, headline test metric (in percent)."""
    rows = [{"task": r["task"], "method": r["method"], "seed": r["seed"], "value": 100 * r["headline"]}
            for r in records if r.get("status") == "ok"]
    return pd.DataFrame(rows, columns=["task", "method", "seed", "value"])


def final_loss_frame(records: list[dict], last: int = 5) -> pd.DataFrame:
    """One row per trained run: its mean train loss over the ``last`` logged steps."""
    rows = [{"task": r["task"], "method": r["method"], "seed": r["seed"],
             "value": float(np.mean([loss for _, loss in r["train_loss"][-last:]]))}
            for r in records if r.get("status") == "ok" and r.get("train_loss")]
    return pd.DataFrame(rows, columns=["task", "method", "seed", "value"])


def update_size_frame(records: list[dict], baseline: str = "lora") -> pd.DataFrame:
    """One row per run with block norms: the mean over target layers of its merged update ‖ΔW*‖_F, divided by
    the same mean of the baseline's run with the same task and seed (how much larger the update it deploys is)."""
    size = {(r["task"], r["method"], r["seed"]): float(np.mean([b["merged"] for b in r["block_norms"].values()]))
            for r in records if r.get("status") == "ok" and r.get("block_norms")}
    rows = [{"task": task, "method": method, "seed": seed, "value": value / size[(task, baseline, seed)]}
            for (task, method, seed), value in size.items() if (task, baseline, seed) in size]
    return pd.DataFrame(rows, columns=["task", "method", "seed", "value"])


def run_seconds(record: dict) -> float:
    """A run's wall time; a resumed run's includes what its killed processes spent up to their last checkpoint."""
    return record.get("wall_time_s", 0) + sum(record.get("time_before_resume_s", {}).values())


def runs_took(records: list[dict]) -> str:
    """Summed run time, and where it went (records that have the breakdown). A resumed run counts the time its
    killed processes spent up to their last checkpoint too (what they did after it was redone)."""
    parts: dict[str, float] = {}
    for r in records:
        for times in (r.get("time_s", {}), r.get("time_before_resume_s", {})):
            for part, seconds in times.items():
                key = "test" if part.startswith("test/") else part
                parts[key] = parts.get(key, 0.0) + seconds
    breakdown = (f"; by part ({sum('time_s' in r for r in records)} records): "
                 + ", ".join(f"{part.replace('_', ' ')} {s / 60:.1f}" for part, s in parts.items())) if parts else ""
    resumed = [r for r in records if "resumed_at_step" in r]
    return (f"the runs took {sum(map(run_seconds, records)) / 60:.0f} minutes in all (sum of their wall times"
            + (f", {len(resumed)} resumed after a kill" if resumed else "")
            + f"; the sweep runs two at a time{breakdown})")


def ordered(values, order) -> list:
    """``values`` in the order of ``order`` (each once), then the others sorted."""
    return [v for v in dict.fromkeys(order) if v in values] + sorted(v for v in values if v not in order)


def summary_table(frame: pd.DataFrame, methods: list[str], tasks: list[str], best: str | None = "max",
                  metric: str | None = None) -> str:
    """Markdown: rows x tasks, mean ± std (n), an average column over tasks; the ``best`` ("max" or "min") mean
    of each column in bold (None: no bold). ``metric`` names the values when they are not the test metric."""
    stats = frame.groupby(["method", "task"])["value"].agg(["mean", "std", "count"])
    shown = stats[stats.index.get_level_values("method").isin(methods)]
    bold = {t: shown.xs(t, level="task")["mean"].agg(best) for t in tasks
            if best and t in shown.index.get_level_values("task")}
    lines = ["| method | " + " | ".join(task_column(t, metric) for t in tasks) + " | Avg. |",
             "|---" * (len(tasks) + 2) + "|"]
    for method in methods:
        cells, means = [], []
        for task in tasks:
            if (method, task) not in stats.index:
                cells.append("missing")
                continue
            s = stats.loc[(method, task)]
            std = 0.0 if math.isnan(s["std"]) else s["std"]
            text = f"{s['mean']:.2f} ± {std:.2f} (n={int(s['count'])})"
            cells.append(f"**{text}**" if task in bold and np.isclose(s["mean"], bold[task]) else text)
            means.append(s["mean"])
        average = f"{np.mean(means):.2f}" if len(means) == len(tasks) else "—"
        lines.append(f"| {label(method)} | " + " | ".join(cells) + f" | {average} |")
    return "\n".join(lines)


def paired_comparison(frame: pd.DataFrame, tasks: list[str], baseline: str = "lora",
                      rows=RESLORA_ROWS, lower_is_better: bool = False, metric: str | None = None,
                      pairs: list[tuple[str, str]] | None = None) -> str:
    """Markdown: per task, each ResLoRA row minus the baseline, paired by seed: mean difference and
    the number of seeds on which the ResLoRA row is better (higher, or lower with ``lower_is_better``).
    ``pairs``: (row, baseline) pairs instead, each row against its own baseline."""
    wide = frame.pivot_table(index=["task", "seed"], columns="method", values="value")
    lines = ["| method | " + " | ".join(task_column(t, metric) for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for method, baseline in pairs or [(m, baseline) for m in rows]:
        cells = []
        for task in tasks:
            if method not in wide or baseline not in wide or task not in wide.index.get_level_values("task"):
                cells.append("—")
                continue
            both = wide.loc[task][[method, baseline]].dropna()
            if both.empty:
                cells.append("—")
                continue
            diff = both[method] - both[baseline]
            won = diff < 0 if lower_is_better else diff > 0
            cells.append(f"{diff.mean():+.2f} (won on {int(won.sum())} of {len(diff)} seeds)")
        lines.append(f"| {label(method)} − {label(baseline)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interval_note(units: str = "test items") -> str:
    """What a comparison table's columns mean (comparison_table); ``units``: what the rows are paired on besides
    the seed (Fig. 3: "test samples")."""
    return (
        f"Each line: the per-seed paired differences (row − baseline on the same seed and {units}, in points), their "
        f"mean, and the **seed-level {LEVEL:.0%} interval**: a t interval over the per-seed differences (n − 1 degrees "
        "of freedom; `reslora/lab/stats.py`). It is the verdict: a difference is *resolved* only when it excludes 0. "
        "Why not a bootstrap over seeds: with 3 seeds it sees 10 distinct seed multisets (78% of its replicates "
        "repeat a seed, 11% use one seed three times) and is too narrow, while the t interval is exact for normal "
        f"per-seed differences. It holds the {units} fixed (the question: on this test set, does the row beat the "
        "baseline beyond seed noise?); the bootstrap below adds their sampling noise too, so it can be wider. p: the "
        "paired t test's; Holm p: adjusted by Holm's method over this table's family (statsmodels). Second view: the "
        f"**item-and-seed bootstrap** (seeds, then the same {units} for both rows, with replacement; {REPLICATES:,} "
        "replicates, percentile interval), which also sees the test set's sampling noise; ± is the Monte Carlo error "
        f"of its endpoints (half-width of each quantile's distribution-free {LEVEL:.0%} interval from the replicates' "
        "order statistics), and *borderline* marks a bootstrap verdict that another random draw could flip (an "
        "endpoint within its Monte Carlo error of 0). Detectable: the smallest true difference a paired t test on "
        f"these seeds finds with {POWER:.0%} power (two-sided {1 - LEVEL:.0%}) at the observed SD of the per-seed "
        "differences (statsmodels' TTestPower).")


INTERVAL_NOTE = interval_note()


@dataclass
class Comparison:
    """One line of a comparison table: a (row − baseline) difference on a task, or why it is missing."""
    name: str                          # "ResLoRA_bs − LoRA (r=4)"
    task: str                          # its task (or the column it reports, e.g. "style score (%)")
    difference: PairedDifference | None
    note: str = ""                     # a footnote mark ("‡") and its text, set by who builds the line
    no_claim: str = ""                 # why no claim is drawn (the task does not learn): out of the family


def points(x: float) -> str:
    return f"{100 * x:+.2f}"


def interval_text(low: float, high: float) -> str:
    return f"[{points(low)}, {points(high)}]"


def p_text(p: float) -> str:
    return "—" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def comparison_table(comparisons: list[Comparison], what: str = "row − baseline", task_header: str = "task"
                     ) -> list[str]:
    """Markdown lines: the family's size and Holm's correction, one line per comparison (INTERVAL_NOTE), the
    footnotes of its marks, and per task the median detectable difference."""
    family = [c for c in comparisons if c.difference is not None and not c.no_claim]
    adjusted = dict(zip(map(id, family), holm([c.difference.p for c in family])))
    resolved = [c for c in family if c.difference.resolved()]
    held = [c for c in resolved if adjusted[id(c)] < 1 - LEVEL]
    lines = [f"Family: this table holds {len(family)} comparisons"
             + (f" ({len(comparisons) - len(family)} more lines draw no claim, below)" if len(family) < len(comparisons)
                else "") + f"; {len(resolved)} resolved at the seed level, {len(held)} of them still after Holm's "
             "correction over the family.", "",
             f"| {what} | {task_header} | per seed | mean | seed-level 95% interval | p | Holm p | verdict | "
             "item-and-seed bootstrap 95% ± MC error | won | detectable |", "|---" * 11 + "|"]
    for c in comparisons:
        d = c.difference
        if d is None:
            lines.append(f"| {c.name}{c.note[:1]} | {c.task} | — | — | — | — | — | "
                         f"{c.no_claim or 'no records'} | — | — | — |")
            continue
        n = len(d.per_seed)
        verdict = (c.no_claim or ("not resolved" if not d.resolved() else
                   f"**resolved: {'higher' if d.mean > 0 else 'lower'}**"
                   + ("" if adjusted[id(c)] < 1 - LEVEL else " (not after Holm)")))
        boot = ("— (no per-item predictions)" if d.items is None else
                f"{interval_text(d.boot_low, d.boot_high)} ±{100 * d.boot_error:.2f}"
                + (" borderline" if d.borderline else ""))
        ci = "— (1 seed)" if n < 2 else interval_text(*d.interval)
        lines.append(f"| {c.name}{c.note[:1]} | {c.task} | {', '.join(map(points, d.per_seed))} | {points(d.mean)} "
                     f"| {ci} | {p_text(d.p)} | {p_text(adjusted.get(id(c), math.nan))} | {verdict} | {boot} "
                     f"| {d.won} of {n} seeds | {'—' if n < 2 else f'{100 * d.detectable:.2f}'} |")
    notes = dict.fromkeys(c.note for c in comparisons if c.note)
    lines += [""] * bool(notes) + [note for note in notes]
    by_task: dict[str, list[PairedDifference]] = {}
    for c in family:
        if len(c.difference.per_seed) > 1:
            by_task.setdefault(c.task, []).append(c.difference)
    if by_task:
        lines += ["", "Detectable difference per task (median over its comparisons in this table; seeds paired): "
                  + "; ".join(f"{task} {100 * np.median([d.detectable for d in ds]):.2f} points (n="
                              + "/".join(str(k) for k in sorted({len(d.per_seed) for d in ds})) + ")"
                              for task, ds in by_task.items()) + "."]
    return lines


def by_cell(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        cells.setdefault((r["method"], r["task"]), []).append(r)
    return cells


def record_difference(row: list[dict], base: list[dict], modes: tuple[str | None, str | None] = (None, None),
                      flag: str = "correct", metric: str | None = None) -> tuple[PairedDifference | None, str]:
    """The paired difference of two cells' records, on their common seeds, and a footnote when those are not all
    the seeds of both (the pairing then drops the others, and the table says so). Records without per-item
    predictions give the seed-level statistics of their recorded test metric, without bootstrap (note †).
    ``metric``: default, the records' headline metric; ``flag``: stats.paired_difference's."""
    row_seeds, base_seeds = sorted({r["seed"] for r in row}), sorted({r["seed"] for r in base})
    common = sorted(set(row_seeds) & set(base_seeds))
    if not common:
        return None, ""
    note = "" if row_seeds == base_seeds else (
        f"‡ paired on the {len(common)} seeds both rows ran ({', '.join(map(str, common))}); the row ran "
        f"{len(row_seeds)}, the baseline {len(base_seeds)}.")
    metric = metric or row[0]["headline_metric"]
    d = paired_difference(row, base, metric, row_mode=modes[0], baseline_mode=modes[1], flag=flag, seeds=common)
    if d is None:
        def value(r: dict, mode: str | None) -> float:
            return r["final"][mode or r["headline_mode"]]["test"][metric]
        row_at, base_at = ({r["seed"]: r for r in cell} for cell in (row, base))
        d = PairedDifference(tuple(common), tuple(value(row_at[s], modes[0]) - value(base_at[s], modes[1])
                                                  for s in common))
        note = note or "† records without per-item predictions (made before they were stored): seed-level only."
    return d, note


def interval_comparison(records: list[dict], tasks: list[str], pairs: list[tuple[str, str]],
                        modes: tuple[str | None, str | None] = (None, None), no_claim: dict[str, str] | None = None
                        ) -> str:
    """Markdown: per (row, baseline) pair and task, the paired difference of the test metric (comparison_table).
    ``modes``: the eval modes compared (default: each record's headline mode). ``no_claim``: {task: why no claim
    is drawn there} (a task that does not learn): its lines are shown, out of the family."""
    cells, no_claim = by_cell(records), no_claim or {}
    comparisons = []
    for method, baseline in pairs:
        for task in tasks:
            row, base = cells.get((method, task)), cells.get((baseline, task))
            if not row or not base:
                continue
            d, note = record_difference(row, base, modes)
            comparisons.append(Comparison(f"{label(method)} − {label(baseline)}", task_column(task), d, note,
                                          no_claim.get(task, "")))
    return "\n".join(comparison_table(comparisons))


def mode_interval_table(records: list[dict], methods: list[str], modes: list[str], reference: str,
                        tasks: list[str]) -> str:
    """Markdown: for each method and eval mode, (mode − ``reference`` mode) of the same trained models in points,
    per task, paired by seed and item (comparison_table)."""
    cells, comparisons = by_cell(records), []
    for method in methods:
        for mode in modes:
            for task in tasks:
                runs = [r for r in cells.get((method, task), []) if mode in r["final"]]
                if runs:
                    d, note = record_difference(runs, runs, (mode, reference))
                    comparisons.append(Comparison(f"{label(method)}: {MODE_LABELS[mode]} − {MODE_LABELS[reference]}",
                                                  task_column(task), d, note))
    return "\n".join(comparison_table(comparisons, "method: mode − reference"))


DOES_NOT_LEARN = "no claim: the task does not learn at this scale"


def learning_check(records: list[dict], tasks: list[str], method: str = "lora") -> tuple[list[str], dict[str, str]]:
    """Which tasks can speak: per task, ``method`` (LoRA (r=4)) minus the best constant prediction of its test split
    (stats.constant_baseline), paired by seed and item. Returns the markdown lines and {task: DOES_NOT_LEARN} for
    each task where the row is not above the constant at the seed level (its comparisons draw no claim)."""
    cells, comparisons, silent = by_cell(records), [], {}
    for task in tasks:
        runs = cells.get((method, task))
        if not runs:
            continue
        metric = runs[0]["headline_metric"]
        found = constant_baseline(runs, metric)
        if found is None:
            continue
        d, constant, value = found
        what = (f"constant prediction (the mean label, {constant:.2f}): Pearson undefined, taken as 0"
                if metric == "pearson" else f"majority class (label {constant:g}; {100 * value:.2f})")
        comparisons.append(Comparison(f"{label(method)} − {what}", task_column(task), d))
        if not (d.resolved() and d.mean > 0):
            silent[task] = DOES_NOT_LEARN
    lines = ["## Which tasks can speak", "",
             f"{label(method)} against the best constant prediction of each test split: the majority class for "
             "accuracy (its share of the test items) and for Matthews correlation (0: a constant has none); for "
             "STS-B there is no majority class, and a constant prediction has no Pearson correlation (undefined, taken "
             "as 0). A task where LoRA is not above it at the seed level does not learn at this scale: its lines below "
             "draw no claim and leave the family. Intervals and columns as in the comparison below.", "",
             *comparison_table(comparisons, "row − constant"), ""]
    if silent:
        lines += ["Tasks that do not learn at this scale (no claim is drawn from them): "
                  + ", ".join(task_name(t) for t in silent) + ".", ""]
    return lines, silent


def grid_cells(frame: pd.DataFrame, tasks: list[str]) -> dict[str, tuple[int, int]]:
    """Per task of an lr-sweep frame: (cells run, cells its grid needs: every rate for each of its rows and
    seeds). Only the sweep's own seeds count (sweep_seeds)."""
    swept = sweep_seeds(frame[frame["method"].isin(LR_SWEEP_ROWS)])
    rates = swept["lr"].nunique()
    return {t: (len(part), rates * part["method"].nunique() * part["seed"].nunique())
            for t in tasks for part in [swept[swept.task == t]]}


def complete_tasks(frame: pd.DataFrame, tasks: list[str]) -> list[str]:
    """The tasks whose grid is complete. A rate is selected only there: a partial grid (a sweep still running)
    would select among the rates that happen to have run."""
    return [t for t, (run, needed) in grid_cells(frame, tasks).items() if run == needed]


def lr_sweep_records(results: Path, scale: str, allow_dirty: bool | None = None) -> tuple[list[dict], list[dict]]:
    """The learning-rate sweep's own records (variant cells) and Table 2's records of its rows and tasks (the
    centre rate, same configuration)."""
    own = load_records(results, scale, "lr_sweep", allow_dirty, variants=True)
    borrowed = [r for r in load_records(results, scale, "table2", allow_dirty)
                if r["task"] in LR_SWEEP_TASKS and r["method"] in LR_SWEEP_ROWS]
    return own, borrowed


def sweep_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the sweep's own seeds (lr_sweep.yaml). Seeds run later at the selected rates only (ten seeds on
    SST-2 and STS-B) neither make the grid incomplete nor move the selection they were run at."""
    return frame[frame["seed"].isin([int(s) for s in LR_SWEEP["seeds"]])]


def selected_rates(frame: pd.DataFrame) -> dict[tuple[str, str], float]:
    """{(task, method): the learning rate with the highest mean over the sweep's seeds of the best validation
    metric}: selection on validation, never on test."""
    means = sweep_seeds(frame).groupby(["task", "method", "lr"])["validation"].mean()
    return {(task, method): group.droplevel(["task", "method"]).idxmax()
            for (task, method), group in means.groupby(level=["task", "method"])}


def lr_frame(records: list[dict], last: int = 5) -> pd.DataFrame:
    """One row per run: task, method, seed, lr, best validation metric and test metric (in %), and the mean
    train loss over the ``last`` steps."""
    rows = [{"task": r["task"], "method": r["method"], "seed": r["seed"], "lr": r["config"]["train"]["lr"],
             "validation": 100 * r["best"]["validation"][r["headline_metric"]], "test": 100 * r["headline"],
             "train_loss": float(np.mean([loss for _, loss in r["train_loss"][-last:]]))} for r in records]
    return pd.DataFrame(rows, columns=["task", "method", "seed", "lr", "validation", "test", "train_loss"])


MODE_LABELS = {"unmerged": "before merge", "plain": "w/o merge", "merge_bi": "merge_bi", "merge_bw": "merge_bw",
               "merge_ls": "merge_ls (ours)"}


def mode_frame(records: list[dict]) -> pd.DataFrame:
    """One row per successful run and eval mode: task, method, seed, mode, test headline metric in %."""
    rows = [{"task": r["task"], "method": r["method"], "seed": r["seed"], "mode": mode,
             "value": 100 * metrics["test"][r["headline_metric"]]}
            for r in records if r.get("status") == "ok" for mode, metrics in r["final"].items()]
    return pd.DataFrame(rows, columns=["task", "method", "seed", "mode", "value"])


def mode_table(frame: pd.DataFrame, methods: list[str], modes: list[str], tasks: list[str]) -> str:
    """Markdown: one row per (method, eval mode), tasks as columns, mean ± std (n) and the average."""
    stats = frame.groupby(["method", "mode", "task"])["value"].agg(["mean", "std", "count"])
    lines = ["| method | evaluated | " + " | ".join(TASK_LABELS.get(t, t) for t in tasks) + " | Avg. |",
             "|---" * (len(tasks) + 3) + "|"]
    for method in methods:
        for mode in modes:
            cells, means = [], []
            for task in tasks:
                if (method, mode, task) not in stats.index:
                    cells.append("missing")
                    continue
                s = stats.loc[(method, mode, task)]
                std = 0.0 if math.isnan(s["std"]) else s["std"]
                cells.append(f"{s['mean']:.2f} ± {std:.2f} (n={int(s['count'])})")
                means.append(s["mean"])
            if means:
                average = f"{np.mean(means):.2f}" if len(means) == len(tasks) else "—"
                lines.append(f"| {label(method)} | {MODE_LABELS.get(mode, mode)} | "
                             + " | ".join(cells) + f" | {average} |")
    return "\n".join(lines)


def mode_gaps(frame: pd.DataFrame, method: str, reference: str, modes: list[str]) -> dict[str, float]:
    """Mean over tasks and seeds of (mode − reference mode), paired by task and seed, in points."""
    wide = frame[frame["method"] == method].pivot_table(index=["task", "seed"], columns="mode", values="value")
    return {m: float((wide[m] - wide[reference]).mean()) for m in modes if m in wide and reference in wide}


CONF = Path(__file__).resolve().parents[2] / "conf"


def experiment_design(tag: str) -> dict:
    """An experiment's grid as conf/experiment/<tag>.yaml holds it: ``tasks``, ``methods``, ``seeds`` (the sweep's
    parameters) and its ``report`` section (how the tables read it). The one home of the experiment design."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{tag}.yaml"))
    params = cfg.get("hydra", {}).get("sweeper", {}).get("params", {})
    grid = {key: [v.strip() for v in str(params[name]).split(",")] for key, name in
            (("tasks", "task"), ("methods", "method"), ("seeds", "seed")) if name in params}
    return {**grid, **cfg.get("report", {})}


LR_SWEEP = experiment_design("lr_sweep")
LR_SWEEP_TASKS, LR_SWEEP_ROWS = LR_SWEEP["tasks"], LR_SWEEP["methods"]


def table4_records(results: Path, scale: str, allow_dirty: bool | None = None) -> list[dict]:
    """The pre_num sweep's own records plus Table 2's runs of the same tasks, renamed as table4.yaml's
    ``report.from_table2`` says."""
    from_table2 = experiment_design("table4")["from_table2"]
    own = load_records(results, scale, "table4", allow_dirty)
    tasks = {r["task"] for r in own}
    return own + [{**r, "method": name} for r in load_records(results, scale, "table2", allow_dirty)
                                                     if r["task"] in tasks
                  for name in from_table2.get(r["method"], [])]
