"""Records you can trust: publishing is transactional, a cell is what was computed, provenance, verified data,
table builders that never drop data silently, and bad input that fails clearly and changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir

from _models import BERT, TOY, randomize
from reslora import ResLoraConfig, ResLoraModel, get_reslora_model
from reslora.lab.records import (RecordError, cell_name, config_hash, identity, load_records, provenance,
                                 require_provenance, variant_overrides)
from reslora.lab.tasks.glue import read_mirror_split
from reslora.lab.train import validate_config
from test_platform import CONF, MIRROR, ROOT, needs_data, train


def published(tmp_path: Path, task: str, cell: str, seed: int = 0) -> Path:
    return tmp_path / "results" / "records" / "smoke" / "default" / task / cell / f"seed{seed}.json"


# ---- publishing -----------------------------------------------------------------------------------------------
@needs_data
def test_a_failed_launch_leaves_the_published_record_byte_identical(tmp_path):
    train(tmp_path, "task=mrpc", "method=lora")
    path = published(tmp_path, "mrpc", "lora")
    before = path.read_bytes()
    (tmp_path / "empty").mkdir()
    failed = train(tmp_path, "task=mrpc", "method=lora", f"data.mirror={tmp_path / 'empty'}", check=False)
    assert failed.returncode != 0
    assert path.read_bytes() == before
    failure = json.loads((tmp_path / "results/failures/smoke/default/mrpc/lora/seed0.json").read_text())
    assert failure["status"] == "failed" and "MRPC/train.tsv" in failure["error"]
    # a config validation error is a failure too: recorded apart, the record untouched
    train(tmp_path, "task=mrpc", "method=lora", "train.max_steps=-1", check=False)
    assert path.read_bytes() == before


@needs_data
def test_a_sweep_over_any_key_keeps_one_record_per_configuration(tmp_path):
    result = train(tmp_path, "-m", "task=mrpc", "method=lora", "train.lr=2e-3,4e-3")  # smoke's own rate: 1e-3
    assert result.stdout.count("[reslora] mrpc/lora__train.lr=") == 2  # each run ends with its summary line
    cells = sorted(p.parent.name for p in (tmp_path / "results/records/smoke/default/mrpc").glob("*/seed0.json"))
    assert len(cells) == 2 and all(c.startswith("lora__train.lr=") for c in cells)
    records = [json.loads(p.read_text()) for p in (tmp_path / "results/records/smoke/default/mrpc").glob("*/seed0.json")]
    assert {r["config"]["train"]["lr"] for r in records} == {2e-3, 4e-3}
    assert {tuple(r["variant_overrides"]) for r in records} == {("train.lr=0.002",), ("train.lr=0.004",)}  # as Hydra writes the sweep values
    # the grid's own cells are what the tables read; variants only when asked
    assert load_records(tmp_path / "results", "smoke", "default") == []
    assert len(load_records(tmp_path / "results", "smoke", "default", variants=True)) == 2


@needs_data
def test_skip_done_skips_only_a_record_of_the_same_config_and_names_the_keys_that_differ(tmp_path):
    args = ("task=rte", "method=lora", "train.test_modes=headline")
    train(tmp_path, *args)
    assert "skip:" in train(tmp_path, *args, "skip_done=true").stdout
    path = next((tmp_path / "results/records/smoke/default/rte").glob("lora__*/seed0.json"))
    made = json.loads(path.read_text())
    made["config"]["train"]["lr"] = 0.5  # as if made before the scale's lr was edited
    path.write_text(json.dumps(made))
    rerun = train(tmp_path, *args, "skip_done=true")
    assert "rerun:" in rerun.stdout and "train.lr: 0.5 -> 0.001" in rerun.stdout
    assert json.loads(path.read_text())["config"]["train"]["lr"] == 0.001


def test_variant_overrides_and_cell_names():
    overrides = ["task=mrpc", "method=lora", "seed=1", "scale=smoke", "logger.mode=disabled", "hydra/launcher=joblib_cpu",
                 "runs_dir=/x", "data.mirror=/m", "train.lr=1e-3", "method.pre_num=0", "tag=t", "experiment=table2"]
    assert variant_overrides(overrides) == ["method.pre_num=0", "train.lr=1e-3"]
    config = {"seed": 0, "train": {"lr": 1e-3}}
    name = cell_name("reslora_bs", ["method.pre_num=0"], config)
    assert name.startswith("reslora_bs__method.pre_num=0-") and name == cell_name("reslora_bs", ["method.pre_num=0"],
                                                                                   {**config, "seed": 2})
    assert cell_name("reslora_bs", [], config) == "reslora_bs"
    long = [f"model.path=/{'d' * 300}", "task.dataset=/x"]
    assert len(cell_name("lora", long, config)) < 255 and cell_name("lora", long, config) != cell_name(
        "lora", long, {**config, "train": {"lr": 2e-3}})


def test_a_runs_shape_names_its_cell_and_run_dir_only_away_from_one_process_and_one_thread():
    """Committed records (all one process, one thread) keep their cells; two processes or two threads make a cell
    and a run dir of their own, and a command-line threads=... is not a variant of its own."""
    paths = sorted((ROOT / "results" / "records").glob("cpu/*/*/*/seed*.json"))[::40]
    assert any("__" in p.parent.name for p in paths) and any("__" not in p.parent.name for p in paths)
    for path in paths:
        made = json.loads(path.read_text())
        config = {**made["config"], "num_processes": 1}  # as a run sets it now
        assert config["threads"] == 1 and identity(config) == identity(made["config"])
        assert cell_name(made["method"], made["variant_overrides"], config) == path.parent.name
        for shape in ({"num_processes": 2}, {"threads": 2}):
            other = {**config, **shape}
            key, value = next(iter(shape.items()))
            cell = cell_name(made["method"], made["variant_overrides"], other)
            assert cell != path.parent.name and f"{key}={value}" in cell
            assert config_hash(identity(other)) != config_hash(identity(config))
    assert variant_overrides(["threads=2", "threads=1", "train.lr=1e-3"]) == ["train.lr=1e-3"]


def test_a_run_outside_a_git_checkout_is_refused_unless_allowed(tmp_path):
    with pytest.raises(RuntimeError, match="is not a git checkout.*allow_no_git=true"):
        require_provenance({"commit": None, "dirty": None, "fingerprint": None}, allowed=False)
    require_provenance({"commit": None, "dirty": None, "fingerprint": None}, allowed=True)
    # The package installed into a venv inside a checkout runs under a work tree, but is not its code.
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "c"],
                   cwd=tmp_path, check=True)
    (tmp_path / "venv" / "site-packages").mkdir(parents=True)
    assert provenance(tmp_path)["commit"] and provenance(tmp_path / "venv" / "site-packages")["commit"] is None


def test_a_run_started_from_a_copy_without_git_says_so(tmp_path):
    for part in ("reslora", "experiments", "conf"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, str(tmp_path / "experiments" / "train.py"), "logger.mode=disabled",
                             f"runs_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path), "HYDRA_FULL_ERROR": "0"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and f"{tmp_path} is not a git checkout" in result.stderr
    assert not (tmp_path / "results").exists()


def test_only_the_main_process_opens_a_wandb_run(tmp_path):
    from omegaconf import OmegaConf

    from reslora.lab.wandb_logger import RunLogger

    cfg = OmegaConf.create({"mode": "offline", "project": "reslora-test", "entity": None})
    logger = RunLogger(cfg, name="n", group="g", config={}, run_dir=tmp_path / "run", main_process=False)
    assert logger.run is None and not (tmp_path / "run").exists()
    logger.log({"train/loss": 1.0}, 1)
    logger.finish()


@needs_data
def test_a_second_process_on_the_same_run_dir_is_refused(tmp_path):
    train(tmp_path, "task=mrpc", "method=lora", "train.max_steps=2", "train.eval_every=1")
    run_dir = next((tmp_path / "runs").glob("smoke/default/mrpc/lora__*/seed0/config-*"))
    with FileLock(str(run_dir / "run.lock")):
        second = train(tmp_path, "task=mrpc", "method=lora", "train.max_steps=2", "train.eval_every=1", check=False)
    assert second.returncode != 0 and "in use by another process" in second.stderr


@needs_data
def test_a_damaged_checkpoint_is_named_and_the_run_starts_afresh(tmp_path):
    args = ("task=mrpc", "method=lora", "train.max_steps=4", "train.eval_every=2")
    killed = train(tmp_path, *args, "debug.kill_at_step=2", check=False)
    assert killed.returncode != 0
    checkpoint = next((tmp_path / "runs").glob("smoke/default/mrpc/*/seed0/config-*/checkpoint.pt"))
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    result = train(tmp_path, *args)  # named, set aside, and the run starts afresh: never a half-resume
    assert f"{checkpoint} is not a usable checkpoint" in result.stdout and "starting this run afresh" in result.stdout
    assert "resumed from" not in result.stdout and checkpoint.with_name("checkpoint.pt.damaged").is_file()


# ---- reading records -------------------------------------------------------------------------------------------
def fake_record(path: Path, dirty: bool = False, status: str = "ok") -> None:
    """A committed MRPC record made into the one at ``path`` (``<scale>/<tag>/mrpc/<method>/seed0.json``)."""
    record = json.loads((ROOT / "results/records/cpu/table2/mrpc/lora/seed0.json").read_text())
    scale, tag, _, method = path.parts[-5:-1]
    record.update(status=status, scale=scale, tag=tag, method=method, cell=method,
                  git={"commit": "abc", "dirty": dirty})
    record["config"].update(tag=tag, scale={**record["config"]["scale"], "name": scale},
                            method={**record["config"]["method"], "name": method})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_an_unreadable_record_stops_the_table_build_naming_it(tmp_path):
    good, bad = (tmp_path / "records/cpu/table2/mrpc" / m / "seed0.json" for m in ("lora", "reslora_is"))
    fake_record(good)
    fake_record(bad)
    bad.write_text(bad.read_text()[:40])
    with pytest.raises(RecordError, match=str(bad)):
        load_records(tmp_path, "cpu", "table2")
    result = subprocess.run([sys.executable, str(ROOT / "experiments/tables.py"), "table2", "--results", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and str(bad) in result.stderr


def test_records_from_a_dirty_tree_are_refused_unless_allowed(tmp_path):
    fake_record(tmp_path / "records/cpu/table2/mrpc/lora/seed0.json", dirty=True)
    with pytest.raises(RecordError, match="uncommitted"):
        load_records(tmp_path, "cpu", "table2")
    allowed = load_records(tmp_path, "cpu", "table2", allow_dirty=True)
    assert allowed[0]["dirty"] is True
    (tmp_path / "records" / "known_stale.txt").write_text("cpu/table2/mrpc/lora/seed0.json  # rerun pending\n")
    assert load_records(tmp_path, "cpu", "table2")[0]["dirty"] is True  # listed as waiting for a rerun: let through
    fake_record(tmp_path / "records/smoke/table2/mrpc/lora/seed0.json", dirty=True)
    assert load_records(tmp_path, "smoke", "table2")  # smoke records are never evidence: let through
    fake_record(tmp_path / "records/cpu/t/mrpc/lora/seed0.json", status="failed")
    with pytest.raises(RecordError, match="status 'failed'"):
        load_records(tmp_path, "cpu", "t")


def test_provenance_fingerprints_the_code_and_flags_a_dirty_tree(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "reslora").mkdir()
    (tmp_path / "reslora" / "a.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.json").write_text("{}")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = provenance(tmp_path)
    assert clean["dirty"] is False and len(clean["commit"]) == 40 and clean["fingerprint"]
    (tmp_path / "results" / "r.json").write_text('{"a": 1}')  # a sweep publishing records leaves the code clean
    assert provenance(tmp_path) == clean
    (tmp_path / "reslora" / "a.py").write_text("x = 2\n")
    dirty = provenance(tmp_path)
    assert dirty["dirty"] is True and dirty["fingerprint"] != clean["fingerprint"] and dirty["diff"]


# ---- data ------------------------------------------------------------------------------------------------------------
@needs_data
def test_a_truncated_mirror_file_is_refused_naming_it(tmp_path):
    source = Path(MIRROR) / "glue_data" / "MRPC"
    mirror = tmp_path / "mirror"
    (mirror / "glue_data" / "MRPC").mkdir(parents=True)
    text = (source / "train.tsv").read_bytes()
    cut = text[: len(text) // 2]
    (mirror / "glue_data/MRPC/train.tsv").write_bytes(cut[: cut.rindex(b"\t")])  # ends mid-row
    manifest = {"glue_data/MRPC/train.tsv": {"sha256": hashlib.sha256(text).hexdigest(), "bytes": len(text)}}
    (mirror / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="train.tsv does not match .*manifest.json"):
        read_mirror_split("mrpc", mirror, "train.tsv", tmp_path / "cache")
    (mirror / "manifest.json").unlink()  # no manifest, read as allowed: parsing still refuses the malformed last row
    with pytest.raises(ValueError, match=r"train.tsv, line \d+: .* fields"):
        read_mirror_split("mrpc", mirror, "train.tsv", tmp_path / "cache", allow_unlisted=True)
    shutil.copy(source / "train.tsv", mirror / "glue_data/MRPC/train.tsv")
    (mirror / "manifest.json").write_text(json.dumps(manifest))
    data = read_mirror_split("mrpc", mirror, "train.tsv", tmp_path / "cache")
    assert len(data) == 3668 and data["idx"][:3] == [0, 1, 2]


# ---- bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, named", [("train.max_steps=-1", "train.max_steps=-1"),
                                              ("train.epochs=-1", "train.epochs=-1"),
                                              ("data.val_samples=0", "data.val_samples=0")])
def test_invalid_run_settings_fail_with_the_key_and_what_is_accepted(override, named):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["scale=smoke", override])
    with pytest.raises(ValueError, match=f"{named} is invalid; it must be an integer >= 1"):
        validate_config(cfg)


@pytest.mark.parametrize("alpha", [0, -8])
def test_a_non_positive_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match=f"lora_alpha={alpha} must be a number > 0"):
        ResLoraConfig(lora_alpha=alpha, target_modules=["query"])


def snapshot(model: torch.nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            {n: p.requires_grad for n, p in model.named_parameters()}, len(model._forward_pre_hooks))


def assert_same(model, before) -> None:
    after = snapshot(model)
    assert after[1:] == before[1:]
    assert after[0].keys() == before[0].keys() and all(torch.equal(after[0][k], before[0][k]) for k in before[0])


def test_a_base_model_on_the_meta_device_is_refused_and_left_as_it_was():
    with torch.device("meta"):
        base = BERT.build()
    before = [type(m) for m in base.modules()]
    with pytest.raises(ValueError, match="meta device"):
        get_reslora_model(base, BERT.config("bs"))
    assert [type(m) for m in base.modules()] == before


def test_a_failed_wrap_or_load_leaves_the_base_model_exactly_as_it_was(tmp_path):
    base = BERT.build()
    before = snapshot(base)
    with pytest.raises(ValueError, match="modules_to_save"):
        get_reslora_model(base, ResLoraConfig(variant="bs", target_modules=BERT.config("bs").target_modules,
                                              modules_to_save=["no_such_module"]))
    assert_same(base, before)
    trained = get_reslora_model(BERT.build(), BERT.config("ms"))
    randomize(trained)
    trained.save_adapter(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"{weights} cannot be read"):
        ResLoraModel.from_pretrained(base, tmp_path / "adapter")
    assert_same(base, before)
    other = get_reslora_model(TOY.build(), TOY.config("bs"))
    other.save_adapter(tmp_path / "toy")
    with pytest.raises(ValueError):
        ResLoraModel.from_pretrained(base, tmp_path / "toy")
    assert_same(base, before)


def test_a_damaged_adapter_config_is_named(tmp_path):
    model = get_reslora_model(BERT.build(), BERT.config("is"))
    model.save_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        ResLoraModel.from_pretrained(BERT.build(), tmp_path)


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from reslora.lab.wandb_logger import RunLogger, run_id

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = OmegaConf.create({"mode": "offline", "project": "reslora-test", "entity": None})
    ids = []
    for _ in range(2):  # a launch, then the same run resumed
        logger = RunLogger(cfg, name="n", group="g", config={}, run_dir=tmp_path / "run", tags=["mrpc", "lora"])
        ids.append(logger.run.id)
        logger.log({"train/loss": 1.0}, 1)
        logger.finish()
    assert ids == [run_id(tmp_path / "run")] * 2
    assert list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{ids[0]}"))
