"""Tables, figures and notebooks are built from smoke-scale run records of a real (tiny) sweep."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from reslora.lab import report
from reslora.lab.report import (DOES_NOT_LEARN, INTERVAL_NOTE, final_loss_frame, interval_comparison, interval_note,
                                paired_comparison, summary_table, update_size_frame)
from test_platform import ROOT, needs_data, train


def build_table(table: str, results: Path) -> str:
    """Run experiments/tables.py on the smoke records under ``results``; return the markdown it wrote."""
    subprocess.run([sys.executable, str(ROOT / "experiments" / "tables.py"), table, "--scale", "smoke",
                    "--results", str(results)], check=True, cwd=ROOT)
    return (results / f"{table}_smoke.md").read_text()


def test_the_interval_note_names_its_units_and_reads_the_statistics_settings(monkeypatch):
    assert INTERVAL_NOTE == interval_note() and INTERVAL_NOTE.count("test items") == 3
    samples = interval_note("test samples")  # Fig. 3 pairs on samples
    assert "test items" not in samples and samples.count("test samples") == 3
    assert all(part in INTERVAL_NOTE for part in ("seed-level 95% interval", "10,000 replicates", "80% power",
                                                  "two-sided 5%"))
    monkeypatch.setattr(report, "REPLICATES", 20_000)
    monkeypatch.setattr(report, "LEVEL", 0.9)
    monkeypatch.setattr(report, "POWER", 0.9)
    changed = interval_note()
    assert all(part in changed for part in ("seed-level 90% interval", "20,000 replicates", "90% power",
                                            "two-sided 10%"))


@pytest.fixture(scope="module")
def table2_records(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("table2")
    train(tmp, "-m", "experiment=table2", "task=mrpc,rte", "method=lora,reslora_bs", "seed=0,1",
          "hydra/launcher=joblib_cpu")
    return tmp / "results"


@needs_data
def test_table2_from_records(table2_records):
    text = build_table("table2", table2_records)
    assert "from 8 run records" in text
    lora_row = next(line for line in text.splitlines() if line.startswith("| LoRA (r=4) |"))
    assert lora_row.count("(n=2)") == 2 and "missing" in lora_row  # mrpc, rte present; cola, sst2, stsb not
    bs_row = next(line for line in text.splitlines() if line.startswith("| ResLoRA_bs − LoRA (r=4) | MRPC (Acc) |"))
    # per-seed differences, mean, seed-level interval, ..., bootstrap interval ± its Monte Carlo error, seeds won
    assert re.search(r"\| [-+]\d+\.\d\d, [-+]\d+\.\d\d \| [-+]\d+\.\d\d \| \[[-+]\d+\.\d\d, [-+]\d+\.\d\d\] \|.*"
                     r"\[[-+]\d+\.\d\d, [-+]\d+\.\d\d\] ±\d+\.\d\d.* \| \d of 2 seeds \|", bs_row)
    assert "## Which tasks can speak" in text and "Family: this table holds" in text
    for name in ("table2_loss_smoke.png", "table2_eval_smoke.png"):
        assert (table2_records / "figures" / name).stat().st_size > 10_000


def execute_notebook(name: str, results: Path, monkeypatch) -> str:
    """Run notebooks/<name> on the smoke records under ``results``; return what its cells printed."""
    monkeypatch.setenv("RESLORA_RESULTS", str(results))
    monkeypatch.setenv("RESLORA_SCALE", "smoke")
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    return "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


@needs_data
def test_table2_notebook_runs_on_the_records(table2_records, monkeypatch):
    assert "8 records, 8 successful" in execute_notebook("table2.ipynb", table2_records, monkeypatch)


@pytest.fixture(scope="module")
def ablation_records(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablations")
    train(tmp, "-m", "experiment=table3", "task=rte", "method=reslora_is,reslora_bs", "seed=0",
          "hydra/launcher=joblib_cpu")
    # Table 4 = its own cells + Table 2's LoRA (pre_num 0) and ResLoRA_bs (pre_num 1) on the same task
    train(tmp, "-m", "experiment=table2", "task=mrpc", "method=lora,reslora_bs", "seed=0",
          "hydra/launcher=joblib_cpu")
    train(tmp, "-m", "experiment=table4", "task=mrpc", "method=reslora_bs_pre2,reslora_bs_pre-1", "seed=0",
          "hydra/launcher=joblib_cpu")
    return tmp / "results"


@pytest.mark.slow  # a sweep of its own: make test-slow
@needs_data
def test_ablation_tables_and_figures_from_records(ablation_records):
    table3, table4 = build_table("table3", ablation_records), build_table("table4", ablation_records)
    for mode in ("before merge", "w/o merge", "merge_bi", "merge_bw", "merge_ls (ours)"):
        assert f"| ResLoRA_is | {mode} |" in table3
    assert "- ResLoRA_is: vs before merge" in table3
    for k in ("0 (= LoRA)", "1", "2", "all"):
        assert f"| ResLoRA_bs pre_num={k} |" in table4
    assert "from 5 run records" in table4
    for name in ("fig4_loss_vs_prenum_smoke.png", "fig5_norm_heatmap_smoke.png", "grad_flow_smoke.png"):
        assert (ablation_records / "figures" / name).stat().st_size > 10_000


@pytest.mark.slow  # a sweep of its own: make test-slow
@needs_data
def test_ablations_notebook_runs_on_the_records(ablation_records, monkeypatch):
    printed = execute_notebook("ablations.ipynb", ablation_records, monkeypatch)
    assert "table3: 3 records, table4: 5 records" in printed and "reslora_is vs before merge" in printed


@pytest.mark.slow  # a sweep of its own: make test-slow
@needs_data
def test_table1_with_zero_shot_reference_from_records(tmp_path, monkeypatch):
    train(tmp_path, "-m", "experiment=table1", "scale=smoke_nlg", "task=svamp", "method=lora,zero_shot",
          "seed=0", "hydra/launcher=joblib_cpu")
    results = tmp_path / "results"
    zero_shot = json.loads((results / "records/smoke/table1/svamp/zero_shot/seed0.json").read_text())
    assert zero_shot["status"] == "ok" and zero_shot["trainable_params"] == 0 and zero_shot["train_loss"] == []
    assert zero_shot["config"]["model"]["name"] == "smollm2-135m" and 0 <= zero_shot["headline"] <= 1
    assert zero_shot["time_s"]["test/unmerged"] > zero_shot["time_s"]["other"]  # its test is timed as a test
    trained = json.loads((results / "records/smoke/table1/svamp/lora/seed0.json").read_text())
    assert trained["config"]["method"]["lora_alpha"] == 8 and trained["total_steps"] == 2  # the NLG alpha
    assert "700/300" in trained["split_note"]
    text = build_table("table1", results)
    for row in ("Zero-shot (base model)", "LoRA (r=4)"):
        assert f"| {row} |" in text
    assert "SVAMP (Acc)" in text and "svamp: 1,000 items split 700/300" in text
    assert "by part of the sweep: main grid svamp " in text and "; zero-shot svamp " in text
    assert (results / "figures" / "table1_loss_smoke.png").stat().st_size > 10_000
    assert "2 records; tasks ['svamp']" in execute_notebook("table1.ipynb", results, monkeypatch)


def run_record(method: str, seed: int, losses: list[float], merged_norms: list[float]) -> dict:
    return {"task": "svamp", "method": method, "seed": seed, "status": "ok", "headline": 0.1,
            "train_loss": [[step + 1, loss] for step, loss in enumerate(losses)],
            "block_norms": {f"layer{i}": {"own": 1.0, "merged": n} for i, n in enumerate(merged_norms)}}


def test_final_loss_and_update_size_frames_feed_the_tables():
    records = [run_record("lora", 0, [3.0, 2.0, 1.0], [1.0, 3.0]), run_record("lora", 1, [3.0, 2.0, 2.0], [2.0, 2.0]),
               run_record("reslora_is", 0, [3.0, 1.0, 0.5], [4.0, 6.0]),
               run_record("reslora_is", 1, [3.0, 2.5, 2.5], [2.0, 2.0]),
               run_record("reslora_bs", 2, [1.0], [9.0])]  # no LoRA run with seed 2: no update ratio
    losses = final_loss_frame(records, last=2)
    assert losses.set_index(["method", "seed"])["value"].to_dict() == {
        ("lora", 0): 1.5, ("lora", 1): 2.0, ("reslora_is", 0): 0.75, ("reslora_is", 1): 2.5, ("reslora_bs", 2): 1.0}
    sizes = update_size_frame(records).set_index(["method", "seed"])["value"].to_dict()
    assert sizes == {("lora", 0): 1.0, ("lora", 1): 1.0, ("reslora_is", 0): 2.5, ("reslora_is", 1): 1.0}
    table = summary_table(losses, ["lora", "reslora_is"], ["svamp"], best="min", metric="train loss")
    assert "| SVAMP (train loss) |" in table
    assert "| LoRA (r=4) | 1.75 ± 0.35 (n=2) |" in table and "| ResLoRA_is | **1.62 ± 1.24 (n=2)** |" in table
    assert "**" not in summary_table(update_size_frame(records), ["lora", "reslora_is"], ["svamp"], best=None)
    paired = paired_comparison(losses, ["svamp"], rows=["reslora_is"], lower_is_better=True)
    assert "| ResLoRA_is − LoRA (r=4) | -0.12 (won on 1 of 2 seeds) |" in paired
    against = paired_comparison(losses, ["svamp"], pairs=[("lora", "reslora_is"), ("reslora_bs", "lora")])
    assert "| LoRA (r=4) − ResLoRA_is | +0.12 (won on 1 of 2 seeds) |" in against and "| ResLoRA_bs − LoRA (r=4) | — |" in against


@pytest.fixture(scope="module")
def lr_sweep_records(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lr_sweep")
    train(tmp, "-m", "experiment=table2", "task=sst2", "method=lora,reslora_bs", "seed=0,1", "hydra/launcher=joblib_cpu")
    train(tmp, "-m", "experiment=lr_sweep", "task=sst2", "method=lora,reslora_bs", "seed=0,1", "train.lr=1e-2",
          "hydra/launcher=joblib_cpu")
    return tmp / "results"


@pytest.mark.slow  # a sweep of its own: make test-slow
@needs_data
def test_lr_sweep_table_selects_on_validation_and_compares_at_the_selected_rates(lr_sweep_records):
    text = build_table("lr_sweep", lr_sweep_records)
    assert "from 8 run records: 4 of" in text and "| method | lr 0.001 | lr 0.01 |" in text
    records = [json.loads(p.read_text()) for p in (lr_sweep_records / "records").rglob("seed*.json")]
    for method in ("lora", "reslora_bs"):  # the selected rate is the one with the best mean validation metric
        runs = [r for r in records if r["method"] == method and r["task"] == "sst2"]
        by_lr = {}
        for r in runs:
            by_lr.setdefault(r["config"]["train"]["lr"], []).append(r["best"]["validation"]["accuracy"])
        best = max(by_lr, key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr]))
        selected = next(line for line in text.split("## Selected rates")[1].splitlines()
                        if line.startswith(f"| {'LoRA (r=4)' if method == 'lora' else 'ResLoRA_bs'} |"))
        assert f"| {best:g} |" in selected
    assert re.search(r"\| ResLoRA_bs − LoRA \(r=4\) \| [-+]\d+\.\d\d \[", text)
    assert (lr_sweep_records / "figures" / "lr_sweep_smoke.png").stat().st_size > 10_000


@pytest.mark.slow  # a sweep of its own: make test-slow
@needs_data
def test_lr_sweep_notebook_runs_on_the_records(lr_sweep_records, monkeypatch):
    assert "8 records (4 own, 4 from Table 2)" in execute_notebook("lr_sweep.ipynb", lr_sweep_records, monkeypatch)


def test_a_row_listed_twice_in_the_order_is_shown_once():
    from reslora.lab.report import ordered

    assert ordered({"b", "a", "z"}, ["a", "b", "a", "b"]) == ["a", "b", "z"]


def test_run_time_counts_what_a_resumed_runs_killed_process_spent():
    sys.path.insert(0, str(ROOT / "experiments"))
    from reslora.lab.report import runs_took

    records = [{"wall_time_s": 60, "time_s": {"train_steps": 40, "test/merged": 20}},
               {"wall_time_s": 30, "time_s": {"test/merged": 30}, "resumed_at_step": 20,
                "time_before_resume_s": {"train_steps": 90}}]
    assert runs_took(records) == ("the runs took 3 minutes in all (sum of their wall times, 1 resumed after a kill; "
                                  "the sweep runs two at a time; by part (2 records): train steps 2.2, test 0.8)")


def glue_records(method: str, seeds, accuracy: float, offset: int) -> list[dict]:
    """Records with per-item predictions of one row on a 300-item binary task (labels shared by every row)."""
    label = np.random.default_rng(0).integers(2, size=300)
    out = []
    for seed in seeds:
        right = np.random.default_rng(1000 * offset + seed).random(300) < accuracy
        out.append({"task": "sst2", "method": method, "seed": seed, "headline_metric": "accuracy",
                    "headline_mode": "plain", "predictions": {"plain": {"test": {
                        "id": list(range(300)), "prediction": np.where(right, label, 1 - label).tolist(),
                        "label": label.tolist()}}}})
    return out


def test_comparisons_pair_rows_with_unequal_seed_counts_on_their_common_seeds_and_say_so():
    records = (glue_records("lora", range(10), 0.8, 0) + glue_records("reslora_bs", range(10), 0.8, 1)
               + glue_records("adalora", range(3), 0.6, 2))
    text = interval_comparison(records, ["sst2"], [("reslora_bs", "lora"), ("adalora", "lora")])
    lines = text.splitlines()
    assert lines[0].startswith("Family: this table holds 2 comparisons")
    bs = next(line for line in lines if line.startswith("| ResLoRA_bs − LoRA (r=4) |"))
    ada = next(line for line in lines if line.startswith("| AdaLoRA − LoRA (r=4)‡ |"))
    assert "of 10 seeds" in bs and "not resolved" in bs
    assert "0 of 3 seeds" in ada and "**resolved: lower**" in ada
    assert "‡ paired on the 3 seeds both rows ran (0, 1, 2); the row ran 3, the baseline 10." in lines
    assert re.search(r"Detectable difference per task .*SST-2 \(Acc\) \d+\.\d\d points \(n=3/10\)", text)
    silent = interval_comparison(records, ["sst2"], [("adalora", "lora")], no_claim={"sst2": DOES_NOT_LEARN})
    assert silent.startswith("Family: this table holds 0 comparisons (1 more lines draw no claim")
    assert DOES_NOT_LEARN in silent and "**resolved" not in silent


def test_seeds_added_at_the_selected_rate_neither_break_the_grid_nor_move_the_selection():
    from reslora.lab.report import LR_SWEEP_ROWS, complete_tasks, grid_cells, selected_rates

    rates = [5e-4, 1e-3, 2e-3, 4e-3]
    rows = [{"task": "sst2", "method": m, "seed": s, "lr": lr, "validation": 80 + (lr == 1e-3), "test": 0.0,
             "train_loss": 0.0} for m in LR_SWEEP_ROWS for s in (0, 1, 2) for lr in rates]
    # seven more seeds of LoRA at another rate (as ten_seeds adds them): they score higher on validation
    rows += [{**rows[0], "seed": s, "lr": 4e-3, "validation": 99.0} for s in range(3, 10)]
    import pandas as pd

    frame = pd.DataFrame(rows)
    assert grid_cells(frame, ["sst2"]) == {"sst2": (len(rates) * len(LR_SWEEP_ROWS) * 3,) * 2}
    assert complete_tasks(frame, ["sst2"]) == ["sst2"]
    assert selected_rates(frame)[("sst2", "lora")] == 1e-3
