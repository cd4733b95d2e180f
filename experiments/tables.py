"""Build a paper table and its figures from the run records under results/records/.

    python experiments/tables.py table2 --scale cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reslora.io import atomic_path
from reslora.records import load_records
from reslora.report import ROW_LABELS, headline_frame, paired_comparison, plot_curves, summary_table

TABLE2_TASKS = {"paper": ["cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "stsb", "wnli"],
                "default": ["cola", "sst2", "mrpc", "rte", "stsb"]}
TABLE2_ROWS = ["lora", "lora_r16", "adalora", "loha", "lokr", "reslora_is", "reslora_bs", "reslora_ms"]


def settings_line(records: list[dict]) -> str:
    """The scale's shared settings, read from a record (identical across rows by construction)."""
    c = records[0]["config"]
    d, t = c["data"], c["train"]
    return (f"model {c['model']['name']}; train subset {d['max_train_samples']} examples, validation "
            f"{d['val_samples']} (carved from train, used for model selection), test = GLUE dev "
            f"(at most {d['max_test_samples']} examples); max length {d['max_length']}; "
            f"{t['max_steps'] or str(t['epochs']) + ' epochs'} steps of batch {t['batch_size']}×{t['grad_accum']}; "
            f"lr {t['lr']}, warmup {t['warmup_ratio']}, weight decay {t['weight_decay']}; "
            f"targets {c['model']['target_modules']}; head trained ({c['model']['modules_to_save']})")


def method_lines(records: list[dict], rows: list[str]) -> list[str]:
    """Each row's adapter hyper-parameters, as recorded."""
    seen = {r["method"]: r["config"]["method"] for r in records}
    lines = []
    for method in rows:
        if method in seen:
            m = seen[method]
            keys = ("variant", "r", "lora_alpha", "lora_dropout", "pre_num") if m["kind"] == "reslora" else ()
            params = {k: m[k] for k in keys} if keys else m["peft"]
            lines.append(f"- {ROW_LABELS.get(method, method)}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    return lines


def table2(results: Path, scale: str) -> Path:
    records = load_records(results, scale, "table2")
    if not records:
        raise SystemExit(f"no records under {results}/records/{scale}/table2: run `make reproduce-table2 SCALE={scale}`")
    tasks = TABLE2_TASKS["paper" if scale == "paper" else "default"]
    frame = headline_frame(records)
    failed = [f"{r['task']}/{r['method']}/seed{r['seed']}: {r.get('error', '?')}" for r in records if r.get("status") != "ok"]
    rows = TABLE2_ROWS + sorted(set(frame["method"]) - set(TABLE2_ROWS))
    text = [
        f"# Table 2 (GLUE), scale `{scale}`",
        "",
        f"Built by `make table2 SCALE={scale}` from {len(frame)} run records (`results/records/{scale}/table2/`).",
        f"Settings, identical for every row: {settings_line(records)}.",
        "Cells: test metric in %, mean ± std over seeds (n = seeds); ResLoRA rows are evaluated after merging "
        "(bs exactly, is/ms with merge_bi). Best mean per column in bold. Avg. = mean over the tasks of the row.",
        "",
        "Rows:",
        *method_lines(records, rows),
        "",
        summary_table(frame, rows, tasks),
        "",
        "## Paired comparison with LoRA (r=4)",
        "",
        "Per task: mean over seeds of (ResLoRA − LoRA), same seed, same data; and how many seeds ResLoRA won.",
        "",
        paired_comparison(frame, tasks),
        "",
        "Figures: `figures/table2_loss.png` (train loss, moving average over 10 steps), "
        "`figures/table2_eval.png` (validation metric); mean over seeds, band = min–max.",
    ]
    if failed:
        text += ["", "## Failed cells (shown as missing above)", "", *[f"- {f}" for f in failed]]
    out = results / ("table2.md" if scale == "cpu" else f"table2_{scale}.md")
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(text) + "\n")
    suffix = "" if scale == "cpu" else f"_{scale}"
    plot_curves(records, "train_loss", results / "figures" / f"table2_loss{suffix}.png", rows, tasks,
                f"Table 2 runs ({scale}): train loss", smooth=10)
    plot_curves(records, "validation", results / "figures" / f"table2_eval{suffix}.png", rows, tasks,
                f"Table 2 runs ({scale}): validation metric (%)")
    print(f"wrote {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=["table2"])
    parser.add_argument("--scale", default="cpu", choices=["smoke", "cpu", "paper"])
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args()
    {"table2": table2}[args.table](args.results, args.scale)


if __name__ == "__main__":
    main()
