"""Run records -> tables (mean ± std over seeds, with n; paired intervals). Nothing here trains or evaluates:
every number comes from a record, so tables can be rebuilt at any time. Figures: figures.py."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .records import load_records
from .stats import PairedDifference, paired_difference


ROW_LABELS = {"lora": "LoRA (r=4)", "lora_r16": "LoRA (r=16)", "peft_lora": "PEFT LoRA (r=4)", "adalora": "AdaLoRA",
              "loha": "LoHa", "lokr": "LoKr", "reslora_is": "ResLoRA_is", "reslora_bs": "ResLoRA_bs",
              "reslora_ms": "ResLoRA_ms", "zero_shot": "Zero-shot (base model)",
              "lora_alpha16": "LoRA (r=4, alpha=16), control", "lora_alpha32": "LoRA (r=4, alpha=32), control",
              "lora_alpha64": "LoRA (r=4, alpha=64), control", "reslora_is_detached": "ResLoRA_is, shortcut detached",
              "reslora_bs_detached": "ResLoRA_bs, shortcut detached", "reslora_ms_detached": "ResLoRA_ms, shortcut detached"}
TASK_LABELS = {"cola": "CoLA (Mcc)", "sst2": "SST-2 (Acc)", "mrpc": "MRPC (Acc)", "qqp": "QQP (Acc)",
               "mnli": "MNLI (Acc)", "qnli": "QNLI (Acc)", "rte": "RTE (Acc)", "stsb": "STS-B (Pearson)",
               "wnli": "WNLI (Acc)", "gsm8k": "GSM8K (Acc)", "svamp": "SVAMP (Acc)", "mathqa": "MathQA (Acc)",
               "metamathqa": "MetaMathQA (Acc on GSM8K)", "hellaswag": "HellaSwag (Acc)"}
RESLORA_ROWS = ("reslora_is", "reslora_bs", "reslora_ms")
CONTROL_ROWS = ("lora_alpha16", "lora_alpha32", "lora_alpha64")  # not in the paper: LoRA at the scale ResLoRA rows merge with


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
            cells.append(f"{diff.mean():+.2f} ({int(won.sum())}/{len(diff)} won)")
        lines.append(f"| {label(method)} − {label(baseline)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_difference(d: PairedDifference, scale: float = 100.0) -> str:
    """'+2.13 [-0.40, +4.71] (2/3)': mean difference in points, its 95% interval, seeds won."""
    return f"{scale * d.mean:+.2f} [{scale * d.low:+.2f}, {scale * d.high:+.2f}] ({d.won}/{d.seeds})"


def interval_comparison(records: list[dict], tasks: list[str], pairs: list[tuple[str, str]],
                        modes: tuple[str | None, str | None] = (None, None)) -> str:
    """Markdown: per task, each (row, baseline) pair's paired difference of the test metric in points with its
    95% bootstrap interval over test items and seeds (reslora.stats), and the seeds the row won. ``modes``: the
    eval modes compared (default: each record's headline mode). Records without per-item predictions show the
    mean difference and the seeds won only, marked †."""
    by_cell: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by_cell.setdefault((r["method"], r["task"]), []).append(r)
    lines = ["| row − baseline | " + " | ".join(task_column(t) for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    unpaired = False
    for method, baseline in pairs:
        cells = []
        for task in tasks:
            row, base = by_cell.get((method, task)), by_cell.get((baseline, task))
            if not row or not base:
                cells.append("—")
                continue
            d = paired_difference(row, base, row[0]["headline_metric"], row_mode=modes[0], baseline_mode=modes[1])
            if d is None:
                unpaired = True
                value = {r["seed"]: r for r in base}
                diffs = [100 * (r["final"][modes[0] or r["headline_mode"]]["test"][r["headline_metric"]]
                                - value[r["seed"]]["final"][modes[1] or value[r["seed"]]["headline_mode"]]["test"][
                                    r["headline_metric"]]) for r in row if r["seed"] in value]
                cells.append(f"{np.mean(diffs):+.2f} † ({sum(x > 0 for x in diffs)}/{len(diffs)})" if diffs else "—")
            else:
                cells.append(format_difference(d))
        lines.append(f"| {label(method)} − {label(baseline)} | " + " | ".join(cells) + " |")
    if unpaired:
        lines += ["", "† records without per-item predictions (made before they were stored): mean difference and "
                  "seeds won only, no interval."]
    return "\n".join(lines)


def mode_interval_table(records: list[dict], methods: list[str], modes: list[str], reference: str,
                        tasks: list[str]) -> str:
    """Markdown: for each method and eval mode, (mode − ``reference`` mode) of the same trained models in points,
    per task, with the paired 95% interval over test items and seeds (reslora.stats); — without predictions."""
    lines = ["| method | mode − " + MODE_LABELS[reference] + " | " + " | ".join(task_column(t) for t in tasks) + " |",
             "|---" * (len(tasks) + 2) + "|"]
    for method in methods:
        for mode in modes:
            cells = []
            for task in tasks:
                runs = [r for r in records if r["method"] == method and r["task"] == task and mode in r["final"]]
                d = paired_difference(runs, runs, runs[0]["headline_metric"], row_mode=mode,
                                      baseline_mode=reference) if runs else None
                cells.append(format_difference(d) if d else "—")
            lines.append(f"| {label(method)} | {MODE_LABELS[mode]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_cells(frame: pd.DataFrame, tasks: list[str]) -> dict[str, tuple[int, int]]:
    """Per task of an lr-sweep frame: (cells run, cells its grid needs: every rate for each of its rows and
    seeds)."""
    swept = frame[frame["method"].isin(LR_SWEEP_ROWS)]
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


def selected_rates(frame: pd.DataFrame) -> dict[tuple[str, str], float]:
    """{(task, method): the learning rate with the highest mean over seeds of the best validation metric}:
    selection on validation, never on test."""
    means = frame.groupby(["task", "method", "lr"])["validation"].mean()
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
