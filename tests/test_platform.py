"""The experiment platform: configs compose, runs write records, resume after a kill, determinism,
bad overrides fail fast. Runs use the smoke scale: the real MiniLM-L6 on a few real GLUE examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
MIRROR = os.environ.get("DATA_MIRROR")
needs_data = pytest.mark.skipif(not MIRROR, reason="set DATA_MIRROR to a local GLUE mirror (e.g. ../shared/data)")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def train(tmp_path: Path, *overrides: str, check: bool = True, launcher: list[str] | None = None,
          cache: Path | None = None):
    """Run experiments/train.py at smoke scale with runs and records under tmp_path."""
    flags = [o for o in overrides if o.startswith("-")]
    scale = [] if any(o.startswith("scale=") for o in overrides) else ["scale=smoke"]  # or another smoke scale
    command = [*(launcher or [sys.executable]), str(ROOT / "experiments" / "train.py"), *flags, *scale,
               "logger.mode=disabled", f"runs_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}",
               *(o for o in overrides if not o.startswith("-"))]
    env = {**os.environ, "DATA_MIRROR": str(Path(MIRROR).resolve()) if MIRROR else "",
           "RESLORA_CACHE": str(cache or ROOT / ".cache"), "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def record(tmp_path: Path, task="mrpc", method="reslora_bs", seed=0, tag="default") -> dict:
    """The one published record of the cell: the method's own, or the variant made by extra overrides."""
    root = tmp_path / "results" / "records" / "smoke" / tag / task
    paths = [*root.glob(f"{method}/seed{seed}.json"), *root.glob(f"{method}__*/seed{seed}.json")]
    assert len(paths) == 1, f"expected one record for {task}/{method}/seed{seed}, found {paths}"
    return json.loads(paths[0].read_text())


@pytest.mark.parametrize("group", ["task", "model", "method", "scale", "logger", "experiment"])
def test_every_option_of_every_group_composes(group):
    options = group_options(group)
    assert options, f"conf/{group} is empty"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for option in options:
            cfg = compose("config", overrides=[f"{group}={option}"], return_hydra_config=True)
            assert cfg.task.name and cfg.method.name and cfg.scale.name and cfg.model.path
            if group not in ("experiment", "scale"):
                assert cfg[group].get("name", option) == option or group == "logger"


def test_paper_scale_uses_the_papers_model_and_hyper_parameters():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["scale=paper", "task=mnli"])
    assert cfg.model.name == "roberta-large"
    assert cfg.train.lr == 3e-4 and cfg.train.warmup_ratio == 0.06 and cfg.data.max_length == 512
    assert cfg.train.epochs == 5 and cfg.train.batch_size * cfg.train.grad_accum == 128


def test_nlg_and_text_to_image_paper_scales_use_the_authors_settings():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        nlg = compose("config", overrides=["scale=paper_nlg", "task=gsm8k", "method=loha"])
        t2i = compose("config", overrides=["scale=paper_t2i", "method=reslora_bs_pre5"])
        cpu_nlg = compose("config", overrides=["scale=cpu_nlg", "task=svamp", "method=reslora_is"])
    assert nlg.model.name == "llama2-7b" and nlg.method.peft.alpha == 8 and nlg.train.lr == 1e-4
    assert nlg.train.batch_size * nlg.train.grad_accum == 128 and nlg.train.epochs == 20
    assert cpu_nlg.model.name == "smollm2-135m" and cpu_nlg.method.lora_alpha == 8 and cpu_nlg.scale.name == "cpu"
    assert t2i.model.name == "sd2" and t2i.task.name == "naruto" and t2i.seed == 42
    assert (t2i.method.r, t2i.method.lora_alpha, t2i.method.pre_num, t2i.method.lora_dropout) == (32, 64, 5, 0.05)
    assert t2i.train.batch_size * t2i.train.grad_accum == 32 and t2i.train.epochs == 10


@needs_data
def test_smoke_multirun_over_two_methods_writes_two_records(tmp_path):
    train(tmp_path, "-m", "task=rte", "method=lora,reslora_is")
    for method in ("lora", "reslora_is"):
        r = record(tmp_path, task="rte", method=method)
        assert r["status"] == "ok" and r["task"] == "rte" and r["method"] == method
        assert len(r["train_loss"]) == 4 and r["eval"] and r["trainable_params"] > 0
        assert 0.0 <= r["headline"] <= 1.0 and r["peak_memory_mb"] > 0 and r["git"]["commit"]
        assert (tmp_path / "runs" / "smoke" / "default" / "rte" / method / "seed0" / ".hydra" / "config.yaml").is_file()
    assert set(record(tmp_path, task="rte", method="reslora_is")["final"]) == {"merge_bi", "unmerged", "plain", "merge_bw",
                                                                             "merge_ls"}


def killed_and_resumed(tmp_path: Path, method: str, args, kill_at: int, signal_name: str) -> tuple[dict, dict]:
    """(the uninterrupted run's record, the record of the same run killed after step ``kill_at``'s checkpoint by
    SIG``signal_name`` and resumed), after checking that they computed the same numbers."""
    args = (f"method={method}", *args)
    train(tmp_path / "straight", *args)
    killed = train(tmp_path / "killed", *args, f"debug.kill_at_step={kill_at}", f"debug.kill_signal={signal_name}",
                   check=False)
    assert killed.returncode != 0
    train(tmp_path / "killed", *args)
    straight, resumed = record(tmp_path / "straight", method=method), record(tmp_path / "killed", method=method)
    assert resumed["resumed_at_step"] == kill_at and "resumed_at_step" not in straight
    for key in ("train_loss", "grad_norms", "eval", "final", "predictions"):
        assert resumed[key] == straight[key], f"the resumed run's {key} differs from the uninterrupted run's"
    return straight, resumed


@needs_data
@pytest.mark.parametrize("signal_name", ["KILL", pytest.param("TERM", marks=pytest.mark.slow)])  # TERM: make test-slow
def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path, signal_name):
    args = ("task=mrpc", "train.max_steps=6", "train.eval_every=2", "model.modules_to_save=[]")
    straight, resumed = killed_and_resumed(tmp_path, "reslora_ms", args, 2, signal_name)
    # Its record keeps the killed process's time up to the checkpoint at step 2, by part.
    earlier = resumed["time_before_resume_s"]
    assert {"model_load", "data", "train_steps", "validation"} <= set(earlier)
    assert all(seconds > 0 for seconds in earlier.values())


@needs_data
def test_a_run_killed_at_an_epoch_boundary_resumes_exactly(tmp_path):
    """Step 4 ends the first epoch (32 training examples, batches of 8). The next epoch's data iterator, created
    after the checkpoint, draws its seed from torch's RNG: the resumed run must draw it from the restored state."""
    args = ("task=mrpc", "train.max_steps=8", "train.eval_every=4")
    straight, _ = killed_and_resumed(tmp_path, "reslora_bs", args, 4, "KILL")
    assert straight["data_sizes"]["train"] == 4 * straight["effective_batch"]


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("grad_accum, signal_name", [(2, "KILL"), (2, "TERM"), (3, "KILL"), (3, "TERM")])
def test_a_run_with_gradient_accumulation_resumes_exactly(tmp_path, grad_accum, signal_name):
    args = ("task=mrpc", f"train.grad_accum={grad_accum}", "train.max_steps=4", "train.eval_every=1")
    killed_and_resumed(tmp_path, "reslora_bs", args, 2, signal_name)


@needs_data
@pytest.mark.slow
def test_an_adalora_run_resumes_exactly_with_its_rank_allocator(tmp_path):
    """AdaLoRA's importance averages live in PEFT's rank allocator, outside the parameters: the checkpoint keeps
    them, or the ranks it masks after the resume differ."""
    killed_and_resumed(tmp_path, "adalora", ("task=mrpc", "train.max_steps=6", "train.eval_every=2"), 2, "KILL")


@needs_data
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(tmp_path / name, "task=cola", "method=reslora_bs", f"seed={seed}")
    a, b = record(tmp_path / "a", task="cola"), record(tmp_path / "b", task="cola")
    c = record(tmp_path / "c", task="cola", seed=1)
    assert a["train_loss"] == b["train_loss"] and a["final"] == b["final"]
    assert a["train_loss"] != c["train_loss"]


@needs_data
def test_skip_done_returns_without_training(tmp_path):
    train(tmp_path, "task=stsb", "method=lora", "train.test_modes=headline")
    assert set(record(tmp_path, task="stsb", method="lora")["final"]) == {"plain"}  # LoRA's modes: plain, unmerged
    again = train(tmp_path, "task=stsb", "method=lora", "train.test_modes=headline", "skip_done=true")
    assert "skip:" in again.stdout


@needs_data
@pytest.mark.slow
def test_a_two_process_run_is_a_run_of_its_own(tmp_path):
    """Two processes (gloo on CPU) double the effective batch: the run neither skips, resumes from nor replaces
    the one-process record of its cell, and opens one W&B run."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = ("task=mrpc", "method=reslora_bs")
    train(tmp_path, *args)
    one = tmp_path / "results/records/smoke/default/mrpc/reslora_bs/seed0.json"
    before = one.read_bytes()
    two = train(tmp_path, *args, "skip_done=true", "logger.mode=offline", launcher=launcher)
    assert "skip:" not in two.stdout and "resumed from" not in two.stdout
    assert one.read_bytes() == before
    [path] = (tmp_path / "results/records/smoke/default/mrpc").glob("reslora_bs__num_processes=2-*/seed0.json")
    r = json.loads(path.read_text())
    assert (r["status"], r["num_processes"], r["config"]["num_processes"], r["data_sizes"]["test"]) == ("ok", 2, 2, 32)
    assert r["effective_batch"] == 2 * json.loads(before)["effective_batch"] == 16
    assert len(list((tmp_path / "runs").glob("smoke/default/mrpc/*/seed0/config-*/wandb/offline-run-*"))) == 1


def test_the_train_script_loads_neither_torch_nor_transformers_before_a_run():
    """--help and tab completion compose configs only; importing the script must not pull in the training stack."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('train', sys.argv[1]); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "print(sorted(m for m in ('torch', 'transformers', 'reslora', 'peft', 'datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "experiments" / "train.py")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_tab_completion_works_with_a_python_given_by_its_path():
    """The README's form, `.venv/bin/python experiments/train.py ...`: Hydra's own script completes `python` only."""
    line = f"{sys.executable} experiments/train.py task=mrpc method=reslora_b"
    script = (f'source experiments/completion.bash; COMP_LINE="{line}"; COMP_POINT={len(line)}; COMP_CWORD=3; '
              '_reslora_hydra_completion; printf "%s\\n" "${COMPREPLY[@]}"')
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert {"method=reslora_bs", "method=reslora_bs_pre5"} <= set(result.stdout.split())
    assert all(choice.startswith("method=reslora_b") for choice in result.stdout.split())


def test_the_experiments_extra_pins_what_requirements_txt_pins():
    import tomllib

    def pins(lines):
        return sorted(line.split("#")[0].strip() for line in lines if line.split("#")[0].strip())
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["experiments"]
    assert pins(extra) == pins((ROOT / "requirements.txt").read_text().splitlines())


@pytest.mark.parametrize("override, expected", [
    ("method=nope", "Could not find 'method/nope'"),
    ("task=nope", "Could not find 'task/nope'"),
    ("scale=nope", "Could not find 'scale/nope'"),
    ("train.lr=-1", "train.lr=-1 is invalid"),
    ("logger.mode=loud", "logger.mode='loud'"),
    ("train.test_modes=some", "train.test_modes='some' is invalid"),
])
def test_bad_overrides_fail_fast_with_a_readable_message(tmp_path, override, expected):
    result = train(tmp_path, override, "data.mirror=null", check=False)
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout


def test_a_run_dir_whose_log_cannot_be_written_is_named(tmp_path):
    log = tmp_path / "runs/smoke/default/mrpc/lora/seed0/train.log"
    log.mkdir(parents=True)  # a directory where Hydra's log file goes: unwritable, even by root
    result = train(tmp_path, "task=mrpc", "method=lora", check=False)
    assert result.returncode != 0 and f"could not write the run's log {log}: Is a directory" in result.stderr
    assert "Unable to configure handler" not in result.stderr


def test_missing_data_says_which_file_and_how_to_get_it(tmp_path):
    (tmp_path / "mirror").mkdir()
    result = train(tmp_path, f"data.mirror={tmp_path / 'mirror'}", "task=qnli", check=False)
    assert result.returncode != 0
    assert "QNLI/train.tsv" in result.stderr and "DATA_MIRROR" in result.stderr


def test_a_failed_run_writes_a_record_saying_why(tmp_path):
    (tmp_path / "mirror").mkdir()
    result = train(tmp_path, f"data.mirror={tmp_path / 'mirror'}", "task=qnli", "continue_on_failure=true")
    assert result.returncode == 0
    assert not (tmp_path / "results" / "records").exists()  # a failure publishes nothing
    failed = json.loads((tmp_path / "results/failures/smoke/default/qnli/reslora_bs/seed0.json").read_text())
    assert failed["status"] == "failed" and "QNLI/train.tsv" in failed["error"]


def test_seeded_parts_are_disjoint_and_draw_the_order_datasets_shuffle_draws():
    from datasets import Dataset

    from reslora.lab.tasks import seeded_parts

    parts = seeded_parts(50, 3, {"validation": 8, "test": 10, "train": None})
    assert [len(p) for p in parts.values()] == [8, 10, 32]
    assert sorted(np.concatenate(list(parts.values()))) == list(range(50))
    shuffled = Dataset.from_dict({"i": list(range(50))}).shuffle(seed=3)["i"]
    assert list(np.concatenate(list(parts.values()))) == shuffled
    assert [len(p) for p in seeded_parts(5, 0, {"validation": 8, "train": 4}).values()] == [5, 0]


def test_lr_schedule_is_transformers_linear_except_that_the_first_warmup_step_already_trains():
    import torch
    from transformers import get_scheduler

    from reslora.lab.train import get_lr_factor

    for warmup, total in ((0, 10), (1, 20), (3, 50)):
        theirs = get_scheduler("linear", torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                               num_warmup_steps=warmup, num_training_steps=total).lr_lambdas[0]
        ours = [get_lr_factor(s, warmup, total) for s in range(total + 1)]
        assert ours[warmup:] == [theirs(s) for s in range(warmup, total + 1)] and ours[-1] == 0.0
        assert ours[:warmup] == [theirs(s + 1) for s in range(warmup)]  # transformers' warmup, one step earlier
        assert ours[0] > 0 and (warmup == 0 or theirs(0) == 0.0)
