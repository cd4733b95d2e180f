"""Run records -> tables (mean ± std over seeds, with n) and figures. Nothing here trains or evaluates:
every number comes from a record, so tables can be rebuilt at any time."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..io import atomic_path  # noqa: E402
from .records import load_records  # noqa: E402
from .stats import PairedDifference, paired_difference  # noqa: E402

ROW_LABELS = {"lora": "LoRA (r=4)", "lora_r16": "LoRA (r=16)", "peft_lora": "PEFT LoRA (r=4)", "adalora": "AdaLoRA",
              "loha": "LoHa", "lokr": "LoKr", "reslora_is": "ResLoRA_is", "reslora_bs": "ResLoRA_bs",
              "reslora_ms": "ResLoRA_ms", "zero_shot": "Zero-shot (base model)",
              "lora_alpha16": "LoRA (r=4, alpha=16), control", "lora_alpha32": "LoRA (r=4, alpha=32), control",
              "lora_alpha64": "LoRA (r=4, alpha=64), control"}
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
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


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


def curves(records: list[dict], kind: str, metric: str | None = None) -> dict:
    """{task: {method: (steps, per-seed values array)}} for ``kind`` 'train_loss' or 'validation' (the
    headline metric in %, or ``metric`` as recorded)."""
    out: dict = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        if kind == "train_loss":
            steps, values = zip(*r["train_loss"])
        else:
            steps = [e["step"] for e in r["eval"]]
            values = [e["validation"][metric] if metric else 100 * e["validation"][r["headline_metric"]]
                      for e in r["eval"]]
        out.setdefault(r["task"], {}).setdefault(r["method"], []).append((np.array(steps), np.array(values)))
    return out


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(np.pad(values, (window - 1, 0), mode="edge"), kernel, mode="valid")


LEGEND_ENTRY_INCHES = 2.6  # width of one legend entry at font size 7 (the longest labels, "... pre_num=0 (= LoRA)")


def plot_curves(records: list[dict], kind: str, path: Path, methods: list[str], tasks: list[str],
                title: str, smooth: int = 1) -> None:
    """One panel per task, one line per method (the same colour in every panel): mean over seeds with a
    min-max band; control rows dashed; one legend below the panels."""
    data = curves(records, kind)
    tasks = [t for t in tasks if t in data]
    if not tasks:
        return
    present = ordered({m for task in tasks for m in data[task]}, methods)
    colors = {m: plt.get_cmap("tab10" if len(present) <= 10 else "tab20")(i) for i, m in enumerate(present)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        _draw_runs(ax, data[task], methods, smooth, colors=colors)
        ax.set_title(task_column(task) if kind == "validation" else task_name(task))
    axes[0][0].set_ylabel("train loss" if kind == "train_loss" else "validation metric (%)")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    columns = max(1, min(len(handles), int(fig.get_figwidth() // LEGEND_ENTRY_INCHES)))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(handles) / columns), 1, 1))
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=columns, fontsize=7, frameon=False)
    _save(fig, path)


LR_SWEEP_TASKS = ["sst2", "stsb"]
LR_SWEEP_ROWS = ["lora", "reslora_is", "reslora_bs", "reslora_ms"]


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


def plot_lr_sweep(frame: pd.DataFrame, path: Path, methods: list[str], tasks: list[str], title: str) -> None:
    """Columns = tasks; rows = validation metric, test metric, final train loss against the learning rate (log
    axis); one line per method: mean over seeds, band = min-max."""
    kinds = [("validation", "validation metric (%)"), ("test", "test metric (%)"), ("train_loss", "final train loss")]
    fig, axes = plt.subplots(len(kinds), len(tasks), figsize=(4.2 * len(tasks), 2.8 * len(kinds)), squeeze=False)
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
    for column, task in enumerate(tasks):
        for row, (kind, name) in enumerate(kinds):
            ax = axes[row][column]
            for method in methods:
                runs = frame[(frame["task"] == task) & (frame["method"] == method)]
                if runs.empty:
                    continue
                by_lr = runs.groupby("lr")[kind].agg(["mean", "min", "max"])
                ax.plot(by_lr.index, by_lr["mean"], marker="o", color=colors[method], label=label(method))
                ax.fill_between(by_lr.index, by_lr["min"], by_lr["max"], color=colors[method], alpha=0.15)
            ax.set_xscale("log")
            ax.set_ylabel(name)
            if row == 0:
                ax.set_title(task_column(task))
            if row == len(kinds) - 1:
                ax.set_xlabel("peak learning rate")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    _save(fig, path)


def record_label(record: dict) -> str:
    return label(record["method"], record["config"]["method"].get("r"))


def _draw_runs(ax, runs_by_method: dict, methods: list[str], smooth: int, labels: dict | None = None,
               colors: dict | None = None) -> None:
    """One line per method: mean over its runs (seeds) with a min-max band."""
    for method in ordered(runs_by_method, methods):
        runs = runs_by_method[method]
        length = min(len(s) for s, _ in runs)
        steps = runs[0][0][:length]
        values = np.stack([_smooth(v[:length], smooth) for _, v in runs])
        name = (labels or {}).get(method) or label(method)
        line, = ax.plot(steps, values.mean(0), label=f"{name} (n={len(runs)})", lw=1.3,
                        color=(colors or {}).get(method), ls="--" if method in CONTROL_ROWS else "-")
        ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def plot_fig3_curves(records: list[dict], path: Path, methods: list[str], title: str) -> None:
    """Fig. 3's curves: train and validation denoising loss and the validation headline against steps."""
    labels = {r["method"]: record_label(r) for r in records}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, kind, metric, ylabel, smooth in (
            (axes[0], "train_loss", None, "denoising loss (train, moving average)", 20),
            (axes[1], "validation", "denoise_loss", "denoising loss (validation)", 1),
            (axes[2], "validation", None, "validation headline ×100", 1)):
        for runs in curves(records, kind, metric).values():
            _draw_runs(ax, runs, methods, smooth, labels)
        ax.set_ylabel(ylabel)
    axes[2].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_sample_grid(records: list[dict], path: Path, methods: list[str], seed: int, title: str) -> None:
    """Fig. 3's samples: one column per method (run ``seed``), one row per evaluation step, each cell the
    samples for the ten prompts from the same initial noise; the last row is the merged model on test."""
    from .tasks.text2image import decode_png

    runs = {r["method"]: r for r in records if r.get("status") == "ok" and r["seed"] == seed}
    rows = ordered(runs, methods)
    if not rows:
        return
    steps = [e["step"] for e in runs[rows[0]]["eval"]]
    fig, axes = plt.subplots(len(steps) + 1, len(rows), figsize=(1.2 + 4.5 * len(rows), 0.8 + 0.55 * (len(steps) + 1)),
                             squeeze=False)
    for j, method in enumerate(rows):  # a column per method, a row per step: each cell a strip of the prompts
        r = runs[method]
        mode = r["headline_mode"]
        cells = [(f"step {e['step']}", e["validation"]["samples_png"]) for e in r["eval"]]
        cells.append((f"merged ({mode})", r["final"][mode]["test"]["samples_png"]))
        for i, (name, png) in enumerate(cells):
            ax = axes[i][j]
            ax.imshow(decode_png(png), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
        axes[0][j].set_title(record_label(r), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


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


def layer_index(name: str) -> int:
    """The first integer component of a module name: the transformer layer."""
    return next(int(p) for p in name.split(".") if p.isdigit())


def plot_block_norm_heatmaps(records: list[dict], path: Path, task: str, reference: str, methods: list[str],
                             title: str) -> None:
    """Layers x target modules: ||merged block||_F of each method minus ||LoRA block||_F of ``reference``,
    mean over seeds (the paper's Fig. 5)."""
    def mean_norms(method: str, key: str) -> pd.DataFrame:
        rows = [{"layer": layer_index(n), "module": n.rsplit(".", 1)[-1], "seed": r["seed"], "value": v[key]}
                for r in records if r.get("status") == "ok" and r["task"] == task and r["method"] == method
                for n, v in r.get("block_norms", {}).items()]
        frame = pd.DataFrame(rows, columns=["layer", "module", "seed", "value"])
        return frame.groupby(["layer", "module"])["value"].mean().unstack("module")

    base = mean_norms(reference, "own")
    panels = [(m, mean_norms(m, "merged") - base) for m in methods]
    panels = [(m, d) for m, d in panels if not d.empty and d.notna().any().any()]
    if base.empty or not panels:
        return
    limit = max(float(np.nanmax(np.abs(d.values))) for _, d in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 1, 3.8), squeeze=False)
    for ax, (method, diff) in zip(axes[0], panels):
        image = ax.imshow(diff.values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(diff.shape[1]), diff.columns)
        ax.set_yticks(range(diff.shape[0]), diff.index)
        ax.set_title(label(method), fontsize=9)
        ax.set_xlabel("module")
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="Δ Frobenius norm")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_grad_flow(records: list[dict], path: Path, methods: list[str], title: str) -> None:
    """Per-layer gradient norms of A and B: over layers (mean over steps) and over steps (mean over layers),
    mean over tasks, seeds and target modules; one line per method."""
    rows = [{"method": r["method"], "step": g["step"], "layer": layer_index(n), "A": a, "B": b}
            for r in records if r.get("status") == "ok" for g in r.get("grad_norms", [])
            for n, (a, b) in g["layers"].items()]
    frame = pd.DataFrame(rows, columns=["method", "step", "layer", "A", "B"])
    if frame.empty:
        return
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for row, which in enumerate(("A", "B")):
        for method in ordered(set(frame["method"]), methods):
            part = frame[frame["method"] == method]
            by_layer = part.groupby("layer")[which].mean()
            by_step = part.groupby("step")[which].mean()
            axes[row][0].plot(by_layer.index, by_layer.values, marker="o", ms=3, label=label(method))
            axes[row][1].plot(by_step.index, by_step.values, label=label(method), lw=1)
        axes[row][0].set_ylabel(f"‖∇{which}‖ (mean over steps)")
        axes[row][1].set_ylabel(f"‖∇{which}‖ (mean over layers)")
        axes[row][1].set_yscale("log")
    axes[1][0].set_xlabel("layer")
    axes[1][1].set_xlabel("step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


# Table 4 cells that Table 2 holds already: its runs, under the ablation's names.
TABLE4_FROM_TABLE2 = {"lora": ["reslora_bs_pre0", "reslora_ms_pre0"], "reslora_bs": ["reslora_bs_pre1"],
                      "reslora_ms": ["reslora_ms_pre4"]}


def table4_records(results: Path, scale: str, allow_dirty: bool | None = None) -> list[dict]:
    """The pre_num sweep's own records plus Table 2's runs of the same tasks renamed per TABLE4_FROM_TABLE2."""
    own = load_records(results, scale, "table4", allow_dirty)
    tasks = {r["task"] for r in own}
    return own + [{**r, "method": name} for r in load_records(results, scale, "table2", allow_dirty)
                                                     if r["task"] in tasks
                  for name in TABLE4_FROM_TABLE2.get(r["method"], [])]
