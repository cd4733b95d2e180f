"""Run records -> tables (mean ± std over seeds, with n) and figures. Nothing here trains or evaluates:
every number comes from a record, so tables can be rebuilt at any time."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .io import atomic_path  # noqa: E402

ROW_LABELS = {"lora": "LoRA (r=4)", "lora_r16": "LoRA (r=16)", "peft_lora": "PEFT LoRA (r=4)", "adalora": "AdaLoRA",
              "loha": "LoHa", "lokr": "LoKr", "reslora_is": "ResLoRA_is", "reslora_bs": "ResLoRA_bs",
              "reslora_ms": "ResLoRA_ms"}
TASK_LABELS = {"cola": "CoLA (Mcc)", "sst2": "SST-2 (Acc)", "mrpc": "MRPC (Acc)", "qqp": "QQP (Acc)",
               "mnli": "MNLI (Acc)", "qnli": "QNLI (Acc)", "rte": "RTE (Acc)", "stsb": "STS-B (Pearson)",
               "wnli": "WNLI (Acc)"}
RESLORA_ROWS = ("reslora_is", "reslora_bs", "reslora_ms")


def headline_frame(records: list[dict]) -> pd.DataFrame:
    """One row per successful run: task, method, seed, headline test metric (in percent)."""
    rows = [{"task": r["task"], "method": r["method"], "seed": r["seed"], "value": 100 * r["headline"]}
            for r in records if r.get("status") == "ok"]
    return pd.DataFrame(rows, columns=["task", "method", "seed", "value"])


def _ordered(values, order) -> list:
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def summary_table(frame: pd.DataFrame, methods: list[str], tasks: list[str]) -> str:
    """Markdown: rows x tasks, mean ± std (n) in percent, an average column over tasks, best mean in bold."""
    stats = frame.groupby(["method", "task"])["value"].agg(["mean", "std", "count"])
    best = {t: stats.xs(t, level="task")["mean"].max() for t in tasks if t in stats.index.get_level_values("task")}
    lines = ["| method | " + " | ".join(TASK_LABELS.get(t, t) for t in tasks) + " | Avg. |",
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
            cells.append(f"**{text}**" if np.isclose(s["mean"], best[task]) else text)
            means.append(s["mean"])
        average = f"{np.mean(means):.2f}" if len(means) == len(tasks) else "—"
        lines.append(f"| {ROW_LABELS.get(method, method)} | " + " | ".join(cells) + f" | {average} |")
    return "\n".join(lines)


def paired_comparison(frame: pd.DataFrame, tasks: list[str], baseline: str = "lora",
                      rows=RESLORA_ROWS) -> str:
    """Markdown: per task, each ResLoRA row minus the baseline, paired by seed: mean difference and
    the number of seeds on which the ResLoRA row is higher."""
    wide = frame.pivot_table(index=["task", "seed"], columns="method", values="value")
    lines = [f"| method | " + " | ".join(TASK_LABELS.get(t, t) for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for method in rows:
        cells = []
        for task in tasks:
            if method not in wide or baseline not in wide or task not in wide.index.get_level_values("task"):
                cells.append("—")
                continue
            pairs = wide.loc[task][[method, baseline]].dropna()
            if pairs.empty:
                cells.append("—")
                continue
            diff = pairs[method] - pairs[baseline]
            cells.append(f"{diff.mean():+.2f} ({int((diff > 0).sum())}/{len(diff)} won)")
        lines.append(f"| {ROW_LABELS.get(method, method)} − {ROW_LABELS[baseline]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(records: list[dict], kind: str) -> dict:
    """{task: {method: (steps, per-seed values array)}} for ``kind`` 'train_loss' or 'validation'."""
    out: dict = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        if kind == "train_loss":
            steps, values = zip(*r["train_loss"])
        else:
            steps = [e["step"] for e in r["eval"]]
            values = [100 * e["validation"][r["headline_metric"]] for e in r["eval"]]
        out.setdefault(r["task"], {}).setdefault(r["method"], []).append((np.array(steps), np.array(values)))
    return out


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(np.pad(values, (window - 1, 0), mode="edge"), kernel, mode="valid")


def plot_curves(records: list[dict], kind: str, path: Path, methods: list[str], tasks: list[str],
                title: str, smooth: int = 1) -> None:
    """One panel per task, one line per method: mean over seeds with a min-max band."""
    data = curves(records, kind)
    tasks = [t for t in tasks if t in data]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in _ordered(data[task], methods):
            runs = data[task][method]
            length = min(len(s) for s, _ in runs)
            steps = runs[0][0][:length]
            values = np.stack([_smooth(v[:length], smooth) for _, v in runs])
            line, = ax.plot(steps, values.mean(0), label=f"{ROW_LABELS.get(method, method)} (n={len(runs)})", lw=1.3)
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
        ax.set_title(TASK_LABELS.get(task, task))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("train loss" if kind == "train_loss" else "validation metric (%)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
