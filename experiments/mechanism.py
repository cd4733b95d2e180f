"""The effective-scale prediction (issue 32): how much larger an update each ResLoRA variant applies and deploys
than LoRA, predicted from the base model's own activations alone, against what the trained runs' records measured.

The forward-pass account: the inputs of a target layer and of the same layer one block earlier are two views of a
residual stream that changes little from block to block, x_{n-1} ~ c x_n. Then (method.md's equations, merge.py's
merge formulas; s = lora_alpha / r, the same adapter B_n A_n in every row):

| variant | forward, relative to LoRA                           | deployed ||W*_n - W_n|| / ||s B_n A_n||           |
|---------|-----------------------------------------------------|--------------------------------------------------|
| is      | 1 + c_n, c_n = <x_{n-1}, x_n> / ||x_n||^2           | 1 + f_{n-1}/f_n (merge_bi)                       |
| ms      | ||A_n x_n + sum_k A_{n-k} x_{n-k}|| / ||A_n x_n||   | 1 + sum_k g_{n-k}/g_n (merge_bi)                 |
| bs      | = deployed (bs merges exactly)                      | ||sum_{k=0..m} B_{n-k} A_{n-k}|| / ||B_n A_n||:   |
|         |                                                     | sqrt(1+m) for uncorrelated blocks, 1+m aligned   |

(first block of a chain: is uses x_{n-1} := x_n, i.e. 2; ms and bs have no previous block, i.e. 1). f_n, g_n are
the library's own merge statistics (means of ||x_n||_F and ||A_n x_n||_F per batch), filled here by
``ResLoraModel.calibrate`` on a fixed batch of real training inputs, with A_n at its seed-0 initialisation (what the
seed-0 runs start from). The predicted ratio of a row to LoRA is the mean of the per-layer factors (the records'
ratio is of means of per-layer norms over the target layers; with equal own norms the two agree). The records
split each measured ratio into the merge factor (mean merged / mean own norm, within the run) and the own-norm
ratio (mean own norm / LoRA's, same seed): the prediction assumes the second is 1.

    DATA_MIRROR=../shared/data python experiments/mechanism.py      # make mechanism (about 5 min on 2 cores)

Writes results/mechanism_scale.json, results/mechanism.md (the effective-scale section, then the gradient-path
ablation's comparisons from the records: reslora/lab/ablation.py) and results/figures/mechanism_*.png.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from reslora import ResLoraConfig, get_reslora_model  # noqa: E402
from reslora.io import atomic_path, write_json  # noqa: E402
from reslora.lab.ablation import ablation_markdown, ablation_records  # noqa: E402
from reslora.lab.records import load_records  # noqa: E402
from reslora.lab.report import label, task_name, update_size_frame  # noqa: E402
from reslora.merge import _alpha as merge_alpha  # noqa: E402
from reslora.model import chain_group, role_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GLUE_TASKS = ("cola", "sst2", "mrpc", "rte", "stsb")  # the GLUE tasks mirrored offline (Table 2 at cpu scale)
NLG_TASKS = ("svamp",)
ROWS = {"is": "reslora_is", "bs": "reslora_bs", "ms": "reslora_ms"}
HOLDS = 0.10  # a prediction "holds" when it is within 10% of the measured value
DIGITS = 4  # rounding of the written numbers: reruns on another thread count give the same files


@dataclass
class Source:
    """One base model on one task's inputs, and where the task's trained records are."""

    task: str
    model_name: str
    model: nn.Module
    target_modules: list[str]
    batches: list[dict]  # keyword arguments of the model's forward (with attention_mask where there is padding)
    r: int
    pre_num: dict  # {"bs": m, "ms": m} of the ResLoRA rows that were trained
    records_scale: str
    records_tag: str


def load_source(task: str, scale: str, examples: int) -> Source:
    """The task's base model and its first ``examples`` training examples (in the data split's order, batched as
    training batches them), per the composed config of the task's ResLoRA rows at ``scale``."""
    from hydra import compose, initialize_config_dir

    from reslora.lab.tasks import build_task

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):  # the rows whose pre_num the prediction reads
        configs = {v: compose("config", overrides=[f"task={task}", f"scale={scale}", f"method={ROWS[v]}", "seed=0"])
                   for v in ("bs", "ms")}
    cfg = configs["ms"]
    task_obj = build_task(cfg)
    model = task_obj.load_model(cfg.model).eval()
    train = task_obj.datasets()["train"]
    rows = [train[i] for i in range(min(examples, len(train)))]
    collate, size = task_obj.collate(), cfg.train.batch_size
    batches = [task_obj.model_inputs(collate(rows[i:i + size])) for i in range(0, len(rows), size)]
    tag = "table1" if cfg.task.family == "reasoning" else "table2"
    return Source(task, cfg.model.name, model, list(cfg.model.target_modules), batches, cfg.method.r,
                  {v: configs[v].method.pre_num for v in ("bs", "ms")}, cfg.scale.name, tag)


# ---- measuring the base model ----------------------------------------------------------------------------------
@torch.no_grad()
def measure(source: Source, seed: int = 0) -> list[dict]:
    """Per target layer, in chain order: cos(x_n, x_{n-1}), ||x_{n-1}|| / ||x_n||, c_n (over the real tokens of all
    batches, Frobenius), the mean per-token cosine, the merge_bi factors of is and ms from the library's statistics,
    and the ms branch's gain. Wraps ``source.model`` (in place) with an ms adapter at its initialisation: B = 0, so
    every forward is the base model's."""
    torch.manual_seed(seed)
    model = get_reslora_model(source.model, ResLoraConfig(variant="ms", r=source.r, pre_num=source.pre_num["ms"],
                                                          target_modules=source.target_modules))
    names = {layer: name for name, layer in model.named_reslora_layers().items()}
    captured: dict = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args: captured.__setitem__(mod, args[0]))
             for layer in names]
    sums: dict = {}  # per layer: running sums over the real tokens, in float64

    def add(layer, key, value):
        sums.setdefault(layer, {}).setdefault(key, 0.0)
        sums[layer][key] += float(value)

    try:
        for batch in source.batches:
            captured.clear()
            model.calibrate([batch])  # one forward that also fills the merge statistics f_n, g_n
            mask = batch.get("attention_mask")
            for chain in model.chains:
                previous, axs = None, []  # the previous block's input; every block's A x so far
                for layer in chain.layers:
                    x = captured[layer].to(torch.float64)
                    x = x[mask.bool()] if mask is not None else x.reshape(-1, x.shape[-1])
                    ax = x @ layer.lora_A.to(torch.float64).T
                    branch = ax + sum(axs[-len(layer.prev):][::-1]) if layer.prev else ax
                    add(layer, "xx", (x * x).sum())
                    add(layer, "ax2", (ax * ax).sum())
                    add(layer, "branch2", (branch * branch).sum())
                    add(layer, "tokens", x.shape[0])
                    if previous is not None:
                        add(layer, "dot", (x * previous).sum())
                        add(layer, "token_cos", torch.nn.functional.cosine_similarity(x, previous, dim=-1).sum())
                    previous, axs = x, [*axs, ax]
    finally:
        for hook in hooks:
            hook.remove()
        model.unload()

    out = []
    for chain in model.chains:
        for i, layer in enumerate(chain.layers):
            s = sums[layer]
            f_n = float(layer.mean_norms()[0])
            row = {"name": names[layer], "role": role_name(names[layer]), "position": i, "previous_blocks": len(layer.prev),
                   "ms_alpha": float(merge_alpha(layer, "merge_bi")),
                   "ms_forward": math.sqrt(s["branch2"] / s["ax2"])}
            if i:
                before = sums[chain.layers[i - 1]]
                row.update(cos=s["dot"] / math.sqrt(s["xx"] * before["xx"]), norm_ratio=math.sqrt(before["xx"] / s["xx"]),
                           c=s["dot"] / s["xx"], token_cos=s["token_cos"] / s["tokens"],
                           is_alpha=float(chain.layers[i - 1].mean_norms()[0]) / f_n)
            out.append(row)
    return out



# ---- the prediction --------------------------------------------------------------------------------------------
def bs_blocks(position: int, pre_num: int) -> int:
    """How many previous blocks bs adds at a chain position (-1: all of them)."""
    return position if pre_num < 0 else min(position, pre_num)


def per_layer_prediction(layers: list[dict], variant: str, pre_num: dict) -> dict:
    """{target layer: the deployed factor of ``variant`` relative to LoRA} (the module docstring's table)."""
    if variant == "is":
        return {row["name"]: 1 + row.get("is_alpha", 1.0) for row in layers}
    if variant == "ms":
        return {row["name"]: 1 + row["ms_alpha"] for row in layers}
    return {row["name"]: math.sqrt(1 + bs_blocks(row["position"], pre_num["bs"])) for row in layers}


def predict(layers: list[dict], pre_num: dict) -> dict:
    """Each variant's factor relative to LoRA, the mean over the target layers of the per-layer factors of the
    module docstring's table: ``forward`` (what training sees) and ``deployed`` (the merged update)."""
    deployed = {v: np.mean(list(per_layer_prediction(layers, v, pre_num).values())) for v in ROWS}
    return {
        "is": {"forward": np.mean([1 + row.get("c", 1.0) for row in layers]),  # first block: x_{n-1} := x_n
               "deployed": deployed["is"]},
        "bs": {"forward": deployed["bs"], "deployed": deployed["bs"],  # bs merges exactly
               "deployed_aligned": np.mean([1 + bs_blocks(row["position"], pre_num["bs"]) for row in layers])},
        "ms": {"forward": np.mean([row["ms_forward"] for row in layers]), "deployed": deployed["ms"]},
    }


# ---- what the records measured ---------------------------------------------------------------------------------
def chains_of_records(block_norms: dict, layer_order: list[str]) -> list[list[str]]:
    """The record's target layers grouped by the library's chain rule (``chain_group``), in the order the record
    lists them (the order they run). A record holds no shapes: the models measured here keep one (in, out) shape
    per group, so no chain of theirs splits where the shape changes."""
    groups: dict = {}
    for name in block_norms:
        groups.setdefault(chain_group(name, layer_order), []).append(name)
    return list(groups.values())


def update_cosine(block_norms: dict, layer_order: list[str]) -> float:
    """bs with pre_num 1: the mean cosine between consecutive blocks' own updates, from
    ||ΔW_n + ΔW_{n-1}||^2 = ||ΔW_n||^2 + ||ΔW_{n-1}||^2 + 2 cos ||ΔW_n|| ||ΔW_{n-1}|| (0: uncorrelated, 1: aligned)."""
    values = []
    for chain in chains_of_records(block_norms, layer_order):
        for before, name in zip(chain, chain[1:]):
            own, prev, merged = block_norms[name]["own"], block_norms[before]["own"], block_norms[name]["merged"]
            values.append((merged ** 2 - own ** 2 - prev ** 2) / (2 * own * prev))
    return float(np.mean(values))


def sized_runs(records: list[dict], task: str) -> tuple[list[dict], pd.DataFrame]:
    """The task's runs that recorded their block norms, and their deployed update size relative to LoRA's."""
    runs = [r for r in records if r["task"] == task and r.get("block_norms")]
    return runs, update_size_frame(runs)


def measured(records: list[dict], task: str, pre_num: dict) -> dict:
    """Per variant, over the seeds that have both the ResLoRA run and LoRA's: the deployed ratio to LoRA (the
    tables' 'update / LoRA's'), the merge factor within the run, the own-norm ratio to LoRA, per-layer merge
    factors (mean over seeds) and, for bs with pre_num 1, the update cosine."""
    runs, sizes = sized_runs(records, task)
    lora = {r["seed"]: r for r in runs if r["method"] == "lora"}
    out = {}
    for variant, method in ROWS.items():
        mine = [r for r in runs if r["method"] == method and r["seed"] in lora]
        if not mine:
            continue
        mean_norm = lambda r, key: np.mean([b[key] for b in r["block_norms"].values()])  # noqa: E731
        per_layer = {name: float(np.mean([r["block_norms"][name]["merged"] / r["block_norms"][name]["own"]
                                          for r in mine])) for name in mine[0]["block_norms"]}
        out[variant] = {
            "seeds": sorted(r["seed"] for r in mine),
            "deployed": float(sizes[sizes.method == method]["value"].mean()),
            "deployed_std": float(sizes[sizes.method == method]["value"].std(ddof=1)) if len(mine) > 1 else 0.0,
            "merge_factor": float(np.mean([mean_norm(r, "merged") / mean_norm(r, "own") for r in mine])),
            "own_ratio": float(np.mean([mean_norm(r, "own") / mean_norm(lora[r["seed"]], "own") for r in mine])),
            "per_layer_factor": per_layer}
        if variant == "bs" and pre_num["bs"] == 1:
            out[variant]["update_cosine"] = float(np.mean([
                update_cosine(r["block_norms"], r["config"]["model"].get("layer_order", [])) for r in mine]))
    return out


def control_curve(records: list[dict], task: str) -> dict:
    """{k: deployed ratio to LoRA} of the scale-control rows (LoRA (r=4) at k times LoRA's alpha), with k = 1: 1."""
    runs, sizes = sized_runs(records, task)
    alpha = next((r["config"]["method"]["lora_alpha"] for r in runs if r["method"] == "lora"), None)
    curve = {1.0: 1.0}
    for method in sorted({r["method"] for r in runs if r["method"].startswith("lora_alpha")}):
        k = next(r["config"]["method"]["lora_alpha"] for r in runs if r["method"] == method) / alpha
        curve[k] = float(sizes[sizes.method == method]["value"].mean())
    return curve


def own_ratio_from_controls(curve: dict, scale: float) -> float:
    """The own-update ratio D(k)/k that LoRA trained at ``scale`` times its alpha ends with (D: the controls'
    deployed ratio), interpolated linearly in log k between the control rows."""
    ks = sorted(curve)
    return float(np.interp(math.log2(scale), [math.log2(k) for k in ks], [curve[k] / k for k in ks]))


# ---- outputs ---------------------------------------------------------------------------------------------------
def rounded(value):
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return round(float(value), DIGITS)
    return value


def analyse(source: Source, records: list[dict]) -> dict:
    """The source's measurements and prediction against ``records`` (those of source.records_scale/_tag)."""
    layers = measure(source)
    result = {"task": source.task, "model": source.model_name, "target_modules": source.target_modules,
              "examples": sum(len(next(iter(b.values()))) for b in source.batches), "r": source.r,
              "pre_num": source.pre_num, "records": f"{source.records_scale}/{source.records_tag}",
              "layers": layers, "predicted": predict(layers, source.pre_num),
              "measured": measured(records, source.task, source.pre_num)}
    # second step: the own update a LoRA trained at the row's forward scale ends with (the control rows), times the
    # merge factor
    result["controls"] = control_curve(records, source.task)
    if len(result["controls"]) > 1:
        for prediction in result["predicted"].values():
            prediction["own_ratio"] = own_ratio_from_controls(result["controls"], prediction["forward"])
            prediction["deployed_with_controls"] = prediction["deployed"] * prediction["own_ratio"]
    for variant, values in result["measured"].items():  # per-layer merge factor: predicted vs measured
        predicted = per_layer_prediction(layers, variant, source.pre_num)
        values["per_layer_abs_error"] = float(np.mean([abs(predicted[n] - m) for n, m in
                                                      values["per_layer_factor"].items() if n in predicted]))
    return rounded(result)


def role_groups(result: dict) -> list[tuple[str, list[dict]]]:
    """(roles, their layers after the first) with roles that read the same input merged (BERT's query and value,
    LLaMA's q_proj and v_proj read one hidden state): one row, one curve."""
    groups: dict = {}
    for role in dict.fromkeys(row["role"] for row in result["layers"]):
        rows = [row for row in result["layers"] if row["role"] == role and "cos" in row]
        key = tuple((row["position"], row["cos"], row["norm_ratio"]) for row in rows)
        groups.setdefault(key, ([], rows))[0].append(role)
    return [(" = ".join(roles), rows) for roles, rows in groups.values()]


def spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def verdict(predicted: float, actual: float) -> str:
    error = predicted / actual - 1
    return f"{error:+.0%} " + ("(holds)" if abs(error) <= HOLDS else "(fails)")


def markdown(results: list[dict]) -> str:
    lines = [
        "# Why ResLoRA behaves like a rescaled LoRA (issue 32)", "",
        "## Effective scale: predicted from the base model, against the trained runs' records", "",
        "Built by `experiments/mechanism.py` (`make mechanism`). For each base model on "
        f"{results[0]['examples']} training examples of the task (the first of the training split, batched as "
        "in training), forward hooks on the target layers measure, per chain position n, cos(x_n, x_{n-1}) and "
        "‖x_{n-1}‖/‖x_n‖ over the real tokens (Frobenius over all tokens; also the mean per-token cosine), and the "
        "library's own merge statistics f_n, g_n (`ResLoraModel.calibrate`, A_n at its seed-0 init). From them, "
        "with merge.py's formulas, each variant's factor relative to LoRA: **forward** is the scale its branch "
        "applies in training (is: 1 + c_n, c_n = <x_{n-1}, x_n>/‖x_n‖²; ms: ‖A_n x_n + Σ_k A_{n-k} x_{n-k}‖ / "
        "‖A_n x_n‖; bs: as deployed), **deployed** the merged update ‖W*_n − W_n‖ over the block's own "
        "‖s B_n A_n‖ (is: 1 + f_{n-1}/f_n; ms: 1 + Σ_k g_{n-k}/g_n; bs: √(1+m) for uncorrelated blocks, 1+m "
        "aligned), averaged over target layers (a chain's first block: is 2, bs and ms 1).", "",
        "The records measure the deployed ratio (the tables' 'update / LoRA's', same seed) and split it into the "
        "merge factor (mean merged / mean own norm within the run: the merge formula applied to the trained run's "
        "statistics) and the own-norm ratio (the run's mean ‖s B_n A_n‖ over LoRA's). The prediction assumes an "
        f"own-norm ratio of 1; it 'holds' where it is within {HOLDS:.0%} of the measured value.", "",
        "### Consecutive target-layer inputs of the base models", "",
        "| task | model | role | cos(x_n, x_{n-1}) mean [min, max] | per-token cos | ‖x_{n-1}‖/‖x_n‖ mean [min, max] "
        "| c_n = cos · ratio |", "|---|---|---|---|---|---|---|"]
    for result in results:
        for role, rows in role_groups(result):
            lines.append(f"| {task_name(result['task'])} | {result['model']} | {role} | "
                         f"{spread([r['cos'] for r in rows])} | {np.mean([r['token_cos'] for r in rows]):.3f} | "
                         f"{spread([r['norm_ratio'] for r in rows])} | {np.mean([r['c'] for r in rows]):.3f} |")
    lines += ["", "### Predicted against measured factors (relative to LoRA (r=4))", "",
              "Two predictions of the deployed ratio: **A** = the merge factor alone (own-norm ratio 1); **B** = the "
              "merge factor times the own-norm ratio that LoRA trained at the row's forward scale ends with, read off "
              "the scale-control rows (LoRA (r=4) at 2x and 4x alpha, same records; interpolated in log scale). "
              "A uses the base model only, B also the controls: B is the claim 'ResLoRA trains like LoRA at its "
              "forward scale' turned into a number.", "",
              "| task | row | forward (pred.) | merge factor: pred. / records (per-layer mean abs. error) "
              "| own-norm ratio: pred. B / records | deployed: A | deployed: B | deployed: records (seeds) "
              "| A / records − 1 | B / records − 1 |", "|---" * 10 + "|"]
    for result in results:
        for variant, method in ROWS.items():
            pred, meas = result["predicted"][variant], result["measured"].get(variant)
            aligned = f" (aligned: {pred['deployed_aligned']:.2f})" if variant == "bs" else ""
            start = f"| {task_name(result['task'])} | {label(method)} | {pred['forward']:.2f} | {pred['deployed']:.2f}{aligned}"
            if meas is None:
                lines.append(start + " / no records | | " + f"{pred['deployed']:.2f} | | no records | | |")
                continue
            with_controls = "deployed_with_controls" in pred
            lines.append(
                start + f" / {meas['merge_factor']:.2f} ({meas['per_layer_abs_error']:.2f}) | "
                + (f"{pred['own_ratio']:.2f}" if with_controls else "—") + f" / {meas['own_ratio']:.2f} "
                f"| {pred['deployed']:.2f} | " + (f"{pred['deployed_with_controls']:.2f}" if with_controls else "—")
                + f" | {meas['deployed']:.2f} ± {meas['deployed_std']:.2f} ({len(meas['seeds'])}) "
                f"| {verdict(pred['deployed'], meas['deployed'])} | "
                + (verdict(pred["deployed_with_controls"], meas["deployed"]) if with_controls else "—") + " |")
    lines += [""] + summary(results)
    cosines = [(task_name(r["task"]), r["measured"]["bs"]["update_cosine"]) for r in results
               if "update_cosine" in r["measured"].get("bs", {})]
    if cosines:
        lines += ["", "ResLoRA_bs (pre_num 1): mean cosine between consecutive blocks' own updates in the trained runs "
                  "(from ‖ΔW_n + ΔW_{n-1}‖, ‖ΔW_n‖, ‖ΔW_{n-1}‖; 0 = uncorrelated, the √2 prediction; 1 = aligned): "
                  + ", ".join(f"{t} {c:+.3f}" for t, c in cosines) + "."]
    lines += ["", "![cos(x_n, x_{n-1}) by layer](figures/mechanism_cos_by_layer.png)", "",
              "![predicted against measured update ratio](figures/mechanism_update_ratio.png)", ""]
    return "\n".join(lines)


def summary(results: list[dict]) -> list[str]:
    """Where each prediction holds, counted over the (task, row) pairs that have records."""
    pairs = [(task_name(r["task"]), label(ROWS[v]), r["predicted"][v], r["measured"][v])
             for r in results for v in ROWS if v in r["measured"]]
    if not pairs:
        return ["- No trained records to compare with."]
    merge_errors = [abs(p["deployed"] / m["merge_factor"] - 1) for _, _, p, m in pairs]
    lines = [f"- Merge factor (base model vs trained run): within {max(merge_errors):.0%} in all {len(pairs)} pairs."]
    for key, name in (("deployed", "A (own-norm ratio 1)"), ("deployed_with_controls", "B (own-norm ratio from the controls)")):
        judged = [(t, row, p[key] / m["deployed"] - 1) for t, row, p, m in pairs if key in p]
        fails = [f"{t} {row} {e:+.0%}" for t, row, e in judged if abs(e) > HOLDS]
        lines.append(f"- Deployed ratio, prediction {name}: holds in {len(judged) - len(fails)} of {len(judged)}"
                     + (f"; fails for {', '.join(fails)}." if fails else "."))
    return lines


def plot(results: list[dict], path: Path) -> None:
    """cos(x_n, x_{n-1}) and ‖x_{n-1}‖/‖x_n‖ against the chain position, one panel column per model."""
    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 6.5), squeeze=False)
    for column, model in enumerate(models):
        for result in (r for r in results if r["model"] == model):
            for style, (role, rows) in zip(("-", "--", ":", "-."), role_groups(result)):
                for ax, key in zip(axes[:, column], ("cos", "norm_ratio")):
                    ax.plot([row["position"] for row in rows], [row[key] for row in rows], style, marker=".",
                            label=f"{task_name(result['task'])} {role}")
        axes[0, column].set_title(f"{model}: cos(x_n, x_(n-1))", fontsize=10)
        axes[1, column].set_title(f"{model}: |x_(n-1)| / |x_n|", fontsize=10)
        axes[1, column].set_xlabel("chain position n (block)")
        for ax in axes[:, column]:
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[0, column].legend(fontsize=7, ncol=2)
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
    fig.suptitle("Inputs of a target layer and of the same layer one block earlier (base models)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_ratios(results: list[dict], path: Path) -> None:
    """Predicted (A: base model only; B: with the controls' own-norm ratio) against measured deployed ratio, one
    point per task and ResLoRA row that has records; the band is where a prediction 'holds'."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    top = 1.0
    for marker, key, name in (("o", "deployed", "A (base model)"), ("x", "deployed_with_controls", "B (+ controls)")):
        points = [(r["measured"][v]["deployed"], r["predicted"][v][key], v) for r in results for v in ROWS
                  if v in r["measured"] and key in r["predicted"][v]]
        for variant, color in zip(ROWS, ("C0", "C1", "C2")):
            xy = [(x, y) for x, y, v in points if v == variant]
            if xy:
                ax.scatter(*zip(*xy), marker=marker, color=color, zorder=3, label=f"{label(ROWS[variant])}, {name}")
        top = max([top, *(max(x, y) for x, y, _ in points)])
    line = np.array([1.0, top * 1.05])
    ax.plot(line, line, "k-", lw=0.8)
    ax.fill_between(line, line * (1 - HOLDS), line * (1 + HOLDS), color="0.85", zorder=0, label=f"within {HOLDS:.0%}")
    ax.set_xlabel("deployed update / LoRA's: records (mean over seeds)")
    ax.set_ylabel("predicted")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("Deployed update ratio: predicted against measured", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_outputs(results: list[dict], out_dir: Path, records_dir: Path | None = None, scale: str = "cpu") -> None:
    """mechanism_scale.json, mechanism.md and its figures; with ``records_dir``, also the gradient-path ablation
    from the records of ``scale`` there."""
    write_json(out_dir / "mechanism_scale.json", {"holds_within": HOLDS, "sources": results})
    text = markdown(results)
    if records_dir is not None:
        text += "\n".join(["", *ablation_markdown(ablation_records(records_dir, scale), out_dir / "figures")])
    with atomic_path(out_dir / "mechanism.md") as tmp:
        tmp.write_text(text)
    plot(results, out_dir / "figures" / "mechanism_cos_by_layer.png")
    plot_ratios(results, out_dir / "figures" / "mechanism_update_ratio.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="cpu", help="cpu or smoke: GLUE at it, SVAMP at <scale>_nlg")
    parser.add_argument("--tasks", nargs="+", default=[*GLUE_TASKS, *NLG_TASKS])
    parser.add_argument("--examples", type=int, default=64, help="training examples per task")
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="where the run records are")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the outputs go (default: --results at cpu scale, runs/mechanism-<scale> else)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rebuild", action="store_true",
                        help="only rebuild mechanism.md and the figure from the --out directory's mechanism_scale.json")
    args = parser.parse_args()
    out = args.out or (args.results if args.scale == "cpu" else ROOT / "runs" / f"mechanism-{args.scale}")
    if args.rebuild:
        write_outputs(json.loads((out / "mechanism_scale.json").read_text())["sources"], out, args.results, args.scale)
        return
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    results, records = [], {}  # records: per (scale, tag), loaded once for every task that reads them
    for task in args.tasks:
        source = load_source(task, f"{args.scale}_nlg" if task in NLG_TASKS else args.scale, args.examples)
        where = (source.records_scale, source.records_tag)
        if where not in records:
            records[where] = load_records(args.results, *where)
        results.append(analyse(source, records[where]))
        print(f"{task}: predicted " + ", ".join(f"{v} {p['deployed']:.2f}" for v, p in results[-1]["predicted"].items())
              + "; measured " + ", ".join(f"{v} {m['deployed']:.2f}" for v, m in results[-1]["measured"].items()))
    write_outputs(results, out, args.results, args.scale)


if __name__ == "__main__":
    main()
