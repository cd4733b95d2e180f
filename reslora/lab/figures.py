"""Run records -> figures (PNG): curves over steps, the learning-rate sweep, Fig. 3's samples, Fig. 5's block
norms, gradient flow. Labels and colours follow report.py's row names."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..io import atomic_path  # noqa: E402
from .report import CONTROL_ROWS, label, ordered, task_column, task_name  # noqa: E402


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


def plot_sample_grid(records: list[dict], path: Path, methods: list[str], seed: int, title: str,
                     base: dict | None = None) -> None:
    """Fig. 3's samples: one column per method (run ``seed``), one row per evaluation step, each cell the
    samples for the ten prompts from the same initial noise; the first row is the ``base`` record's test samples
    (before fine-tuning) where given, the last the merged model on test."""
    from .tasks.text2image import decode_png

    runs = {r["method"]: r for r in records if r.get("status") == "ok" and r["seed"] == seed}
    rows = ordered(runs, methods)
    if not rows:
        return
    before = [("base", base["final"]["unmerged"]["test"]["samples_png"])] if base else []
    n = len(before) + len(runs[rows[0]]["eval"]) + 1
    fig, axes = plt.subplots(n, len(rows), figsize=(1.2 + 4.5 * len(rows), 0.8 + 0.55 * n), squeeze=False)
    for j, method in enumerate(rows):  # a column per method, a row per step: each cell a strip of the prompts
        r = runs[method]
        mode = r["headline_mode"]
        cells = [*before, *((f"step {e['step']}", e["validation"]["samples_png"]) for e in r["eval"]),
                 (f"merged ({mode})", r["final"][mode]["test"]["samples_png"])]
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
