"""A published record is checked against itself: required keys, its place against what it says it is, its metrics
against its own per-item predictions, and no configuration counted twice. The records are committed ones (real
runs of each task family), copied into a temporary results dir and edited as someone faking evidence would."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from reslora.lab.records import (RecordError, cell_name, check_path_names, load_records, override_defaults,
                                 rounding_tolerance, variant_overrides)
from reslora.lab.tasks.glue import compute_metrics
from test_platform import ROOT, needs_data, train

COMMITTED = ROOT / "results" / "records"


def place(results: Path, relative: str, edit=None, at: str | None = None) -> Path:
    """Copy the committed record ``relative`` to ``at`` (default: the same place) under ``results``, edited."""
    record = json.loads((COMMITTED / relative).read_text())
    if edit:
        edit(record)
    path = results / "records" / (at or relative)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def load(results: Path, relative: str, **kwargs) -> list[dict]:
    scale, tag = Path(relative).parts[:2]
    return load_records(results, scale, tag, **kwargs)


MRPC, STSB = "cpu/table2/mrpc/lora/seed0.json", "cpu/table2/stsb/lora/seed0.json"
SVAMP, T2I = "cpu/table1/svamp/lora/seed0.json", "cpu/fig3/text2image/lora/seed0.json"


@pytest.mark.parametrize("relative", [MRPC, STSB, SVAMP, T2I])
def test_a_committed_record_passes_and_a_raised_headline_is_refused_naming_the_file(tmp_path, relative):
    place(tmp_path, relative)
    assert len(load(tmp_path, relative)) == 1

    def raise_by_ten_points(record):
        record["headline"] += 0.1
        record["final"][record["headline_mode"]]["test"][record["headline_metric"]] += 0.1

    path = place(tmp_path, relative, raise_by_ten_points)
    with pytest.raises(RecordError, match=f"{path}: final .* but its predictions give"):
        load(tmp_path, relative)


def test_a_headline_that_is_not_its_final_metric_is_refused(tmp_path):
    path = place(tmp_path, MRPC, lambda r: r.update(headline=r["headline"] + 0.1))
    with pytest.raises(RecordError, match=f"{path}: headline .* is not its final plain/test/accuracy"):
        load(tmp_path, MRPC)


@pytest.mark.parametrize("key", ["headline", "final", "predictions"])
def test_a_record_missing_a_required_key_is_refused_naming_the_key(tmp_path, key):
    path = place(tmp_path, MRPC, lambda r: r.pop(key))
    with pytest.raises(RecordError, match=rf"{path}: lacks the key\(s\) \['{key}'\]"):
        load(tmp_path, MRPC)


@pytest.mark.parametrize("at, named", [("cpu/table2/rte/lora/seed0.json", "its task is 'mrpc' but it lies at 'rte'"),
                                       ("cpu/table2/mrpc/lora/seed1.json", "its seed is 'seed0' but it lies at 'seed1'"),
                                       ("cpu/table4/mrpc/lora/seed0.json", "its tag is 'table2' but it lies at"),
                                       ("cpu/table2/mrpc/loha/seed0.json", "its cell is 'lora' but it lies at 'loha'")])
def test_a_record_copied_to_another_cells_path_is_refused(tmp_path, at, named):
    place(tmp_path, MRPC, at=at)
    with pytest.raises(RecordError, match=named):
        load(tmp_path, at)


def test_a_record_whose_fields_disagree_with_its_config_or_cell_name_is_refused(tmp_path):
    path = place(tmp_path, MRPC, lambda r: r.update(scale="smoke"), at=MRPC.replace("cpu/", "smoke/"))
    with pytest.raises(RecordError, match="its scale is 'smoke' but its config's is 'cpu'"):
        load(tmp_path, "smoke/table2")
    path.unlink()
    place(tmp_path, MRPC, lambda r: r.update(variant_overrides=["train.lr=0.002"]))
    with pytest.raises(RecordError, match="its cell is 'lora' but its method, overrides and config name 'lora__"):
        load(tmp_path, MRPC)


def test_one_configuration_published_under_two_cells_is_counted_once(tmp_path):
    place(tmp_path, MRPC)
    spelled = ["train.lr=0.002"]  # the scale's own lr, typed on the command line: the same computation
    record = json.loads((COMMITTED / MRPC).read_text())
    cell = cell_name("lora", spelled, record["config"])
    place(tmp_path, MRPC, lambda r: r.update(variant_overrides=spelled, cell=cell),
          at=f"cpu/table2/mrpc/{cell}/seed0.json")
    with pytest.raises(RecordError, match="the same configuration .* as .*mrpc/lora/seed0.json"):
        load(tmp_path, MRPC, variants=True)


def test_a_non_finite_metric_is_refused(tmp_path):
    def nan_f1(record):
        record["final"]["plain"]["test"]["f1"] = math.nan

    place(tmp_path, MRPC, nan_f1)
    with pytest.raises(RecordError, match="final plain/test/f1 is nan, not a finite number"):
        load(tmp_path, MRPC)


def test_predictions_that_do_not_cover_the_test_split_are_refused(tmp_path):
    def drop_one(record):
        for values in record["predictions"]["plain"]["test"].values():
            values.pop()

    place(tmp_path, MRPC, drop_one)
    with pytest.raises(RecordError, match="predictions plain/test hold 407 items where the split has 408"):
        load(tmp_path, MRPC)


def test_text_to_image_loss_that_cannot_be_recomputed_must_still_agree_with_its_negation(tmp_path):
    def edit_loss(record):
        record["final"]["merge_bi"]["test"]["denoise_loss"] -= 0.01

    place(tmp_path, T2I, edit_loss)
    with pytest.raises(RecordError, match="neg_denoise_loss is not -denoise_loss"):
        load(tmp_path, T2I)


def test_rounded_sts_b_predictions_get_a_tolerance_that_bounds_the_rounding():
    rng = np.random.default_rng(0)
    labels = rng.uniform(0, 5, 200)
    exact = (labels + rng.normal(0, 1, 200)).astype("float32")
    assert rounding_tolerance(exact.tolist()) == 0  # unrounded float32 values: no allowance
    rounded = np.round(exact.astype(float), 4).astype("float32")  # as older records stored them
    tolerance = rounding_tolerance(rounded.tolist())
    moved = compute_metrics(("pearson", "spearman"), rounded, labels), compute_metrics(("pearson", "spearman"), exact, labels)
    assert 0 < max(abs(moved[0][k] - moved[1][k]) for k in ("pearson", "spearman")) <= tolerance < 1e-3
    collapsed = (2.5 + rng.normal(0, 1e-4, 200)).round(4)  # a collapsed run: rounding can change its correlation
    assert rounding_tolerance(collapsed.tolist()) > 0.1


@pytest.mark.slow  # composes the config again, in a process of its own
def test_check_records_fails_on_an_edited_record_naming_it(tmp_path):
    place(tmp_path, MRPC)
    place(tmp_path, STSB, lambda r: r.update(headline=r["headline"] + 0.1))
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "check_records.py"), "--results", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"FAIL    {STSB}: headline" in result.stdout and "2 records: 1 pass" in result.stdout


# ---- one configuration, one cell; names that become paths ---------------------------------------------------------
def test_one_configuration_is_one_cell_however_its_overrides_are_spelled():
    config = {"seed": 0, "train": {"lr": 0.001, "bf16": True}, "model": {"path": "/m"}}
    typed = variant_overrides(["train.lr=1e-3", "train.bf16=True", "model.path=/m", "seed=1"], config)
    swept = variant_overrides(["train.lr=0.001", "train.bf16=true", "model.path=/m"], config)
    assert typed == swept == ["model.path=/m", "train.bf16=true", "train.lr=0.001"]
    assert cell_name("lora", typed, config) == cell_name("lora", swept, config)


def test_committed_cells_keep_their_names():
    """As experiments/train.py names a cell: an override that leaves its key at its default names no variant, unless
    the key is an axis of the experiment's sweep (the lr sweep's rates; fig3_base's guidance scales, 2.0 the
    default among them, keep their cells)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        axes = {}

        def swept(experiment: str | None) -> set:
            if experiment not in axes:
                hydra = compose("config", overrides=[f"experiment={experiment}"] if experiment else [],
                                return_hydra_config=True).hydra
                axes[experiment] = set(hydra.sweeper.get("params") or {})
            return axes[experiment]

        def composed(overrides: list[str]) -> dict:
            return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
        for path in COMMITTED.glob("*/*/*/*/seed*.json"):
            record = json.loads(path.read_text())
            experiment = (record.get("choices") or {}).get("experiment") or record["tag"]
            experiment = experiment if (ROOT / "conf/experiment" / f"{experiment}.yaml").is_file() else None
            defaults = override_defaults(record["overrides"], swept(experiment), composed)
            variants = variant_overrides(record["overrides"], record["config"], defaults)
            assert variants == record["variant_overrides"], path
            assert cell_name(record["method"], variants, record["config"]) == record["cell"], path
    assert "task.guidance_scale" in axes["fig3_base"] and "train.lr" in axes["lr_sweep"]


def test_an_override_that_leaves_its_key_at_its_default_names_no_variant():
    """One configuration is one cell: train.lr=2e-3 at a scale whose rate is 2e-3 is that scale's own cell, unless
    the experiment sweeps train.lr (its cells are named by the rate, the default's too)."""
    composed = []

    def compose_without(overrides):  # the config of the command line without its free overrides
        composed.append(overrides)
        return {"seed": 0, "train": {"lr": 0.002, "bf16": True, "batch_size": 16}}
    line = ["method=lora", "train.lr=2e-3", "train.bf16=1", "train.batch_size=32"]
    config = {"seed": 0, "train": {"lr": 0.002, "bf16": 1, "batch_size": 32}}
    defaults = override_defaults(line, set(), compose_without)
    assert composed == [["method=lora"]] and defaults == {"train.lr": 0.002, "train.bf16": True, "train.batch_size": 16}
    # 1 is not true (another identity, another cell); the batch size is another configuration
    assert variant_overrides(line, config, defaults) == ["train.batch_size=32", "train.bf16=1"]
    assert variant_overrides(["train.lr=0.002"], config, defaults) == []
    assert cell_name("lora", variant_overrides(["train.lr=2e-3"], config, defaults), config) == "lora"
    assert override_defaults(["train.lr=2e-3"], {"train.lr"}, compose_without) == {}  # a sweep axis: kept
    assert override_defaults(["method=lora", "seed=1"], set(), compose_without) == {} and len(composed) == 1


@pytest.mark.slow
@needs_data
def test_a_run_with_an_override_at_its_default_publishes_the_cell_of_its_configuration(tmp_path):
    train(tmp_path, "task=rte", "method=lora", "train.lr=1e-3", "train.max_steps=4")  # smoke's own rate and steps
    assert [p.parent.name for p in (tmp_path / "results/records/smoke/default/rte").glob("*/seed0.json")] == ["lora"]


@pytest.mark.parametrize("names, named", [({"tag": "../cpu/table2"}, "tag='../cpu/table2' is invalid"),
                                          ({"tag": "a/b"}, "tag='a/b' is invalid"),
                                          ({"tag": ""}, "tag='' is invalid"),
                                          ({"tag": None}, "tag=None is invalid"),
                                          ({"task.name": ".."}, "task.name='..' is invalid"),
                                          ({"seed": "abc"}, "seed='abc' is invalid; it must be an integer >= 0"),
                                          ({"seed": 1.5}, "seed=1.5 is invalid"),
                                          ({"seed": True}, "seed=True is invalid")])
def test_a_value_that_becomes_a_path_must_be_a_plain_name(names, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        check_path_names(names)
    check_path_names({"tag": "table2", "method.name": "reslora_bs_pre-1", "seed": 3})


@pytest.mark.parametrize("line, named", [("tag=../escaped", "tag='../escaped' is invalid"),
                                         ("tag=table2,../x", "tag='../x' is invalid"),
                                         ("seed=0,../../x", "seed='../../x' is invalid")])
def test_a_path_name_that_leaves_its_directory_is_refused_before_any_directory_is_made(tmp_path, line, named):
    result = train(tmp_path, "-m" if "," in line else "task=mrpc", "method=lora", line, check=False)
    assert result.returncode != 0 and named in result.stderr
    assert list(tmp_path.iterdir()) == []  # not even Hydra's run dir


@pytest.mark.slow
@needs_data
def test_skip_done_finds_the_cell_of_the_same_configuration_typed_another_way(tmp_path):
    args = ("task=rte", "method=lora", "train.test_modes=headline", "train.max_steps=2")
    train(tmp_path, *args, "train.lr=1e-3")
    assert "skip:" in train(tmp_path, *args, "train.lr=0.001", "skip_done=true").stdout
    assert len(list((tmp_path / "results/records/smoke/default/rte").glob("*/seed0.json"))) == 1
