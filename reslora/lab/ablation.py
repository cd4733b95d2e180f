"""The gradient-path ablation of issue 32 (conf/experiment/mechanism.yaml): each ResLoRA row with its shortcut's
gradient detached, against the ResLoRA row (does the paper's gradient path matter?) and against the LoRA control of
the row's update size (is the rest the scale?), on the test metric, train loss and deployed update size. Read by
experiments/mechanism.py (results/mechanism.md) and notebooks/mechanism.ipynb."""

from __future__ import annotations

from pathlib import Path

from .figures import plot_curves
from .records import load_records
from .report import (INTERVAL_NOTE, LAST_STEPS, RESLORA_ROWS, Comparison, comparison_table, experiment_design,
                     final_loss_frame, interval_comparison, label, runs_took, summary_table, task_name,
                     update_size_frame)
from .stats import PairedDifference

# Where the detached rows ran, and the experiment whose cells give every other row (LoRA, the ResLoRA rows, their
# matched controls) on those tasks: they are read from there, not run again.
ABLATION_TASKS = {"table2": ("sst2", "stsb"), "table1": ("svamp",)}


def ablation_pairs(tag: str) -> list[tuple[str, str]]:
    """Per ResLoRA row: (row, its detached row) (does the gradient path matter?) and (detached row, the LoRA control
    of the row's update size in ``tag``'s design) (is the rest the scale?)."""
    matched = experiment_design(tag)["matched"]
    return [pair for method in RESLORA_ROWS
            for pair in ((method, f"{method}_detached"), (f"{method}_detached", matched[method]))]


def ablation_rows(tag: str) -> list[str]:
    """LoRA (r=4) and every row the pairs name, in table order."""
    return list(dict.fromkeys(["lora", *(m for pair in ablation_pairs(tag) for m in pair)]))


def ablation_records(records_dir: Path, scale: str) -> dict[str, list[dict]]:
    """Per source experiment, its records on the ablation's tasks for the rows the pairs name, and the detached
    rows (tag mechanism) there. Empty lists where nothing has run."""
    detached = load_records(records_dir, scale, "mechanism")
    chosen = {}
    for tag, tasks in ABLATION_TASKS.items():
        methods = set(ablation_rows(tag))
        chosen[tag] = [r for r in (*load_records(records_dir, scale, tag), *detached)
                       if r["task"] in tasks and r["method"] in methods]
    return chosen


def loss_comparisons(records: list[dict], pairs: list[tuple[str, str]], tasks: tuple[str, ...]) -> list[Comparison]:
    """Train loss, row against baseline per seed, as a relative difference (row / baseline − 1; in the table's
    points, % of the baseline's loss): at the end (mean of the last LAST_STEPS steps) and over the whole run (the
    mean of every logged step, i.e. how fast it came down)."""
    final = final_loss_frame(records, LAST_STEPS)
    whole = final_loss_frame(records, last=10**9)
    comparisons = []
    for method, baseline in pairs:
        for task in tasks:
            for name, frame in ((f"{task_name(task)} final", final), (f"{task_name(task)} whole run", whole)):
                cell = frame[frame["task"] == task].pivot_table(index="seed", columns="method", values="value")
                if method not in cell or baseline not in cell:
                    continue
                both = cell[[method, baseline]].dropna()
                if both.empty:
                    continue
                comparisons.append(Comparison(
                    f"{label(method)} − {label(baseline)}", name,
                    PairedDifference(tuple(int(s) for s in both.index),
                                     tuple(float(v) for v in both[method] / both[baseline] - 1), lower_is_better=True)))
    return comparisons


def ablation_markdown(chosen: dict[str, list[dict]], figures: Path) -> list[str]:
    """The gradient-path ablation: the detached rows against their ResLoRA rows and the matched controls, on the
    test metric (SST-2, STS-B), train loss and deployed update size; writes the train-loss figure."""
    lines = ["## The gradient-path ablation: ResLoRA with its shortcut's gradient detached", "",
             "The detached rows (`conf/method/reslora_*_detached.yaml`, `detach_shortcut: true`) compute the same "
             "forward pass as their ResLoRA row, bit for bit, but no gradient flows through the residual terms: "
             "each block learns only from its own layer's use of it, as in LoRA. **ResLoRA − detached** is what "
             "the paper's gradient path adds; **detached − control** (plain LoRA at the alpha whose update size the "
             "ResLoRA row deploys, the tables' matched control) is what the forward rescaling leaves unexplained.",
             ""]
    detached = [r for runs in chosen.values() for r in runs if r["method"].endswith("_detached")]
    if not detached:
        return lines + ["No detached records yet: `make reproduce-mechanism` runs them.", ""]
    lines += [f"Detached rows: {len(detached)} runs; {runs_took(detached)}.", "", INTERVAL_NOTE, ""]
    for tag, runs in chosen.items():
        tasks = tuple(t for t in ABLATION_TASKS[tag] if any(r["task"] == t for r in runs))
        if not tasks:
            continue
        pairs, rows = ablation_pairs(tag), ablation_rows(tag)
        names = ", ".join(task_name(t) for t in tasks)
        lines += [f"### {names} (the other rows: {tag}'s records)", ""]
        if tag == "table2":
            lines += ["Test metric (row − baseline, paired by seed and test item):", "",
                      interval_comparison(runs, list(tasks), pairs), ""]
        lines += ["Train loss, relative (row / baseline − 1 per seed, in % of the baseline's loss; won = lower): at "
                  f"the end (mean of the last {LAST_STEPS} steps) and over the whole run (mean of every logged step):",
                  "", *comparison_table(loss_comparisons(runs, pairs, tasks), "row − baseline", "train loss"), "",
                  "Deployed update (mean over target layers of ‖ΔW*‖_F, merged) over LoRA (r=4)'s, same seed:", "",
                  summary_table(update_size_frame(runs), rows, list(tasks), best=None, metric="update / LoRA's"), ""]
        figure = f"mechanism_train_loss_{tag}.png"
        plot_curves(runs, "train_loss", figures / figure, rows, list(tasks),
                    f"Train loss: ResLoRA, detached, matched control ({names})", smooth=10)
        lines += [f"![train loss]({'figures/' + figure})", ""]
    return lines
