"""A run that went wrong is never ok, and bad input fails clearly: non-finite losses and metrics, signals that
library code swallows, failures before training (a refused launch, a logger that cannot start, an unwritable
results dir), invalid settings, damaged checkpoints, and mirror files that are not what the task reads."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from reslora.io import write_json
from reslora.lab import train as loop
from reslora.lab.records import cell_name, config_hash, identity
from reslora.lab.tasks.glue import read_mirror_split
from reslora.lab.tasks.mirror import FILES_READ, data_differences, files_now
from test_platform import CONF, needs_data, train


def composed(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["scale=smoke", "task=mrpc", "method=lora", "logger.mode=disabled",
                                            f"runs_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}",
                                            *overrides])


FAILURE = "failures/smoke/default/mrpc/lora/seed0.json"


# ---- a run that went wrong is never ok ----------------------------------------------------------------------------
def test_a_non_finite_loss_or_metric_fails_naming_where():
    with pytest.raises(FloatingPointError, match=r"step 7: \{'train loss': nan\} is not finite"):
        loop.check_finite({"train loss": math.nan}, "step 7")
    with pytest.raises(FloatingPointError, match="validation at step 2: {'pearson': inf}"):
        loop.check_finite({"pearson": math.inf, "spearman": 0.5}, "validation at step 2")
    loop.check_finite({"accuracy": 0.5, "samples_png": "..."}, "test")


def test_records_are_strict_json(tmp_path):
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json(tmp_path / "r.json", {"headline": math.nan})
    assert not (tmp_path / "r.json").exists()


@needs_data
def test_a_diverged_run_fails_naming_the_step_and_publishes_nothing(tmp_path):
    result = train(tmp_path, "task=mrpc", "method=lora", "train.lr=1e4", "train.max_steps=6", "train.eval_every=3",
                   check=False)
    assert result.returncode != 0 and "is not finite" in result.stderr and "step" in result.stderr
    assert not (tmp_path / "results" / "records").exists()
    failure = json.loads(next((tmp_path / "results/failures").rglob("seed0.json")).read_text())
    assert failure["status"] == "failed" and "FloatingPointError" in failure["error"]


def test_a_signal_swallowed_by_library_code_still_stops_the_run():
    class SignalsWhileHashed:  # datasets pickles a transform to fingerprint it, under a bare `except:`
        def __call__(self, batch):
            return batch

        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            return (SignalsWhileHashed, ())

    previous = signal.signal(signal.SIGTERM, loop._raise_on_signal)
    loop.SIGNALLED.clear()
    try:
        datasets.Dataset.from_dict({"x": [1, 2]}).map(SignalsWhileHashed(), batched=True)  # goes on: swallowed
        with pytest.raises(SystemExit, match="stopped by signal SIGTERM"):
            loop.raise_if_signalled()
    finally:
        signal.signal(signal.SIGTERM, previous)
        loop.SIGNALLED.clear()


def test_a_refused_launch_leaves_a_failure_record_and_the_run_dir_alone(tmp_path):
    cfg = composed(tmp_path, "continue_on_failure=true")
    config = OmegaConf.to_container(cfg, resolve=True)
    run_dir = (tmp_path / "runs/smoke/default/mrpc" / cell_name("lora", [], config) / "seed0" /
               f"config-{config_hash(identity(config))}")
    run_dir.mkdir(parents=True)
    with FileLock(str(run_dir / "run.lock")):
        outcome = loop.run(cfg)
    assert outcome["status"] == "refused" and "in use by another process" in outcome["error"]
    assert json.loads((tmp_path / "results" / FAILURE).read_text())["status"] == "refused"
    assert not (run_dir / "record.json").exists()


def test_signal_handlers_are_installed_inside_the_run_so_a_failure_to_install_them_is_recorded(tmp_path):
    """A run in a thread (joblib's threading backend) cannot install signal handlers: that is a failed run with its
    failure record, not an exception before the run's try block."""
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(loop.run(composed(tmp_path, "continue_on_failure=true"))))
    worker.start()
    worker.join()
    assert outcome["status"] == "failed" and "signal only works in main thread" in outcome["error"]
    assert json.loads((tmp_path / "results" / FAILURE).read_text())["status"] == "failed"


@needs_data
def test_a_signal_right_after_the_handlers_are_installed_stops_the_run(tmp_path, monkeypatch):
    """SIGNALLED is cleared before the handlers are installed, never after: a signal in between is kept."""
    install = signal.signal

    def install_then_signalled(signum, handler):
        previous = install(signum, handler)
        if handler is loop._raise_on_signal and signum == signal.SIGTERM:
            loop.SIGNALLED.append(signum)  # as if SIGTERM arrived just now
        return previous
    monkeypatch.setattr(loop.signal, "signal", install_then_signalled)
    loop.SIGNALLED.append(signal.SIGINT)  # left over from an earlier run of this process: cleared
    try:
        with pytest.raises(SystemExit, match="stopped by signal SIGTERM"):
            loop.run(composed(tmp_path))
    finally:
        loop.SIGNALLED.clear()
    assert json.loads((tmp_path / "results" / FAILURE).read_text())["status"] == "failed"


def test_a_record_that_cannot_be_written_still_ends_the_logger_and_frees_the_run_dir(tmp_path, monkeypatch):
    finished = []
    monkeypatch.setattr(loop.RunLogger, "finish", lambda self: finished.append(True))

    def unwritable(*args):
        raise OSError("could not write the record")
    monkeypatch.setattr(loop, "write_outcome", unwritable)
    with pytest.raises(OSError, match="could not write the record"):
        loop.run(composed(tmp_path, "continue_on_failure=true", "train.max_steps=true"))
    assert finished == [True]
    [lock] = (tmp_path / "runs").rglob("run.lock")
    FileLock(str(lock)).acquire(timeout=0)  # free: another run of the configuration may start


def test_a_logger_that_cannot_start_fails_the_run_with_a_failure_record(tmp_path):
    outcome = loop.run(composed(tmp_path, "continue_on_failure=true", "logger.mode=bogus"))
    assert outcome["status"] == "failed" and "logger.mode='bogus'" in outcome["error"]
    assert "logger.mode='bogus'" in json.loads((tmp_path / "results" / FAILURE).read_text())["error"]


def test_a_record_that_cannot_be_written_names_the_path(tmp_path):
    (tmp_path / "blocked").write_text("a file where the results dir should be")
    cfg = composed(tmp_path, "continue_on_failure=true", "logger.mode=bogus", f"results_dir={tmp_path / 'blocked'}")
    with pytest.raises(OSError, match=f"could not be written to {tmp_path / 'blocked' / FAILURE}"):
        loop.run(cfg)
    assert json.loads(next((tmp_path / "runs").rglob("record.json")).read_text())["status"] == "failed"


# ---- bad settings ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, named", [
    ("train.max_steps=true", "train.max_steps=True is invalid; it must be an integer >= 1"),
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1 is invalid; it must be a number > 0, or 0 or null"),
    ("data.max_train_samples=0", "data.max_train_samples=0 is invalid; it must be an integer >= 1 (or null)"),
    ("data.max_test_samples=0", "data.max_test_samples=0 is invalid; it must be an integer >= 1 (or null)"),
    ("data.max_length=0", "data.max_length=0 is invalid; it must be an integer >= 1"),
    ("train.lr=abc", "train.lr='abc' is invalid; it must be a positive number"),
    ("train.lr=nan", "train.lr=nan is invalid; it must be a positive number"),
    ("train.batch_size=1.5", "train.batch_size=1.5 is invalid; it must be an integer >= 1"),
    ("train.mixed_precision=fp8", "train.mixed_precision='fp8' is invalid; it must be one of ['no',")])
def test_invalid_settings_fail_naming_the_key_the_value_and_what_is_accepted(tmp_path, override, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        loop.validate_config(composed(tmp_path, override))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU")
def test_half_precision_that_the_cpu_cannot_do_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"train.mixed_precision='fp16' is invalid; it must be one of \['no', 'bf16'\]"):
        loop.validate_config(composed(tmp_path, "train.mixed_precision=fp16"))


@pytest.mark.parametrize("content", [{}, [1, 2], {"config": {}, "model": {}, "optimizer": {}, "scheduler": {},
                                                   "rng": {}}, "truncated"])
def test_a_damaged_checkpoint_is_named_and_set_aside(tmp_path, capsys, content):
    path = tmp_path / "checkpoint.pt"
    torch.save({"progress": {"step": 1}} if content == "truncated" else content, path)
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:20])
    assert loop.read_checkpoint(path, one_process()) is None
    out = capsys.readouterr().out
    assert f"{path} is not a usable checkpoint" in out and "starting this run afresh" in out
    assert not path.exists() and path.with_name("checkpoint.pt.damaged").is_file()


def one_process(main: bool = True, waits: list | None = None):
    """An Accelerator's face for a process of a launch: is it the main one, and its barrier."""
    return SimpleNamespace(is_main_process=main, wait_for_everyone=lambda: (waits if waits is not None else []).append(
        main))


def test_only_the_main_process_moves_a_damaged_checkpoint_after_every_process_has_read_it(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({}, path)
    waits = []
    assert loop.read_checkpoint(path, one_process(main=False, waits=waits)) is None  # rank 1 reads it, leaves it
    assert path.is_file() and waits == [False, False]  # and waits for the main process's move, before and after
    assert loop.read_checkpoint(path, one_process(main=True, waits=waits)) is None  # rank 0 then moves it
    assert not path.exists() and path.with_name("checkpoint.pt.damaged").is_file() and waits[2:] == [True, True]


# ---- mirror files --------------------------------------------------------------------------------------------------
def mirror_with(tmp_path: Path, folder: str, name: str, content: bytes, listed: bool = True) -> Path:
    """A mirror holding one GLUE file, listed in its manifest with its own sha256 (so only reading can refuse it)."""
    mirror = tmp_path / "mirror"
    (mirror / "glue_data" / folder).mkdir(parents=True, exist_ok=True)
    (mirror / "glue_data" / folder / name).write_bytes(content)
    entry = {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
    (mirror / "manifest.json").write_text(json.dumps({f"glue_data/{folder}/{name}": entry} if listed else {}))
    return mirror


MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"


@pytest.mark.parametrize("task, folder, content, named", [
    ("mrpc", "MRPC", (MRPC_HEADER + "1\t1\t2\ta\tb\n").encode("utf-16"), r"dev.tsv, line 1: not UTF-8"),
    ("mrpc", "MRPC", b"", r"dev.tsv is empty"),
    ("mrpc", "MRPC", MRPC_HEADER.encode(), r"dev.tsv holds no examples \(a header only\)"),
    ("mrpc", "MRPC", (MRPC_HEADER + "1\t1\t2\ta\tb\n2\t3\t4\tc\td\n").encode(),
     r"dev.tsv, line 3: label '2' is not one of the accepted values \(\['0', '1'\]\)"),
    ("stsb", "STS-B", (STSB_HEADER + "0\tg\tf\ty\t0\ts\ts\ta\tb\t2.5\n1\tg\tf\ty\t1\ts\ts\tc\td\tnan\n").encode(),
     r"dev.tsv, line 3: label 'nan' is not one of the accepted values \(a finite number\)")])
def test_a_mirror_file_the_task_cannot_read_is_refused_naming_file_and_line(tmp_path, task, folder, content, named):
    mirror = mirror_with(tmp_path, folder, "dev.tsv", content)
    with pytest.raises(ValueError, match=named):
        read_mirror_split(task, mirror, "dev.tsv", tmp_path / "cache")


def test_a_mirror_file_without_a_manifest_entry_is_refused_unless_allowed(tmp_path):
    content = (MRPC_HEADER + "1\t1\t2\ta\tb\n").encode()
    mirror = mirror_with(tmp_path, "MRPC", "dev.tsv", content, listed=False)
    with pytest.raises(ValueError, match=r"dev.tsv is not listed in .*manifest.json, so it cannot be verified"):
        read_mirror_split("mrpc", mirror, "dev.tsv", tmp_path / "cache")
    (mirror / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"\(the mirror has no manifest\).*data.allow_unlisted=true"):
        read_mirror_split("mrpc", mirror, "dev.tsv", tmp_path / "cache")
    assert len(read_mirror_split("mrpc", mirror, "dev.tsv", tmp_path / "cache", allow_unlisted=True)) == 1


def test_an_edit_with_its_mtime_restored_is_not_taken_from_the_hash_cache(tmp_path):
    content = (MRPC_HEADER + "1\t1\t2\ta\tb\n").encode()
    mirror = mirror_with(tmp_path, "MRPC", "dev.tsv", content)
    path = mirror / "glue_data/MRPC/dev.tsv"
    assert len(read_mirror_split("mrpc", mirror, "dev.tsv", tmp_path / "cache")) == 1  # hashed and cached
    stat = path.stat()
    path.write_bytes(content.replace(b"\ta\t", b"\tz\t"))  # same size, other content
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p or tar x leave it
    with pytest.raises(ValueError, match="dev.tsv does not match"):
        read_mirror_split("mrpc", mirror, "dev.tsv", tmp_path / "cache")


# ---- reuse only the same computation -------------------------------------------------------------------------------
def test_data_differences_name_each_file_changed_gone_new_or_read_without_a_hash(tmp_path):
    content = (MRPC_HEADER + "1\t1\t2\ta\tb\n").encode()
    mirror = mirror_with(tmp_path, "MRPC", "dev.tsv", content)
    name, cache = "glue_data/MRPC/dev.tsv", tmp_path / "cache"
    read = {name: {"verified": True, "sha256": hashlib.sha256(content).hexdigest()}}
    assert data_differences(read, files_now(read, mirror, cache)) == []
    assert name in json.loads((cache / "mirror_sha256.json").read_text()).popitem()[0]  # hashed through the cache
    (mirror / name).write_bytes(content.replace(b"\ta\t", b"\tz\t"))
    assert data_differences(read, files_now(read, mirror, cache))[0].startswith(f"{name}: sha256 ")
    assert data_differences(read, files_now(read, None, cache)) == [f"{name} is not in the mirror now"]
    assert data_differences({}, read) == [f"{name} was not read then"]
    old = {name: {"verified": False}}  # an older record's unverified read: no sha256 to compare
    assert data_differences(old, read) == [f"{name} was read unverified, without a sha256"]


def test_a_file_read_unverified_is_recorded_by_its_place_in_the_mirror_with_its_sha256(tmp_path):
    content = (MRPC_HEADER + "1\t1\t2\ta\tb\n").encode()
    mirror = mirror_with(tmp_path, "MRPC", "dev.tsv", content, listed=False)
    FILES_READ.clear()
    read_mirror_split("mrpc", mirror, "dev.tsv", tmp_path / "cache", allow_unlisted=True)
    assert FILES_READ == {"glue_data/MRPC/dev.tsv": {"verified": False, "sha256": hashlib.sha256(content).hexdigest()}}
    FILES_READ.clear()


def test_skip_done_and_resume_judge_data_by_one_rule():
    """A record (skip_done) and a checkpoint (resume) made from the same files, read unverified, are the same data
    to both; made from an older unverified read without a sha256, to neither."""
    config = {"seed": 0, "data": {"mirror": "/m"}}
    now = {"glue_data/MRPC/dev.tsv": {"verified": False, "sha256": "a"}}
    for then, same in ((now, True), ({"glue_data/MRPC/dev.tsv": {"verified": False}}, False)):
        made = {"config": config, "data_files": then, "code": "f1"}
        assert (loop.computation_differences(made, config, now) == []) == same
        assert (loop.other_computation(made, config, now, "f1") is None) == same


def test_a_checkpoint_is_resumed_only_by_the_same_config_data_and_code():
    files = {"glue_data/MRPC/dev.tsv": {"verified": True, "sha256": "a"}}
    saved = {"config": {"seed": 0, "train": {"lr": 0.001}}, "data_files": files, "code": "f1"}
    assert loop.other_computation(saved, saved["config"], files, "f1") is None
    assert "train.lr: 0.001 -> 0.002" in loop.other_computation(saved, {"seed": 0, "train": {"lr": 0.002}}, files, "f1")
    other_data = {"glue_data/MRPC/dev.tsv": {"verified": True, "sha256": "b"}}
    assert "from other data" in loop.other_computation(saved, saved["config"], other_data, "f1")
    assert "by other code (fingerprint f1, this code's f2)" in loop.other_computation(saved, saved["config"], files, "f2")


@pytest.mark.slow
@needs_data
def test_skip_done_and_resume_reuse_only_the_same_computation(tmp_path):
    args = ("task=rte", "method=lora", "train.test_modes=headline", "train.max_steps=4", "train.eval_every=2")
    train(tmp_path, *args)
    path = next((tmp_path / "results/records/smoke/default/rte").glob("*/seed0.json"))
    made = json.loads(path.read_text())
    assert "skip:" in train(tmp_path, *args, "skip_done=true").stdout
    path.write_text(json.dumps({**made, "git": {**made["git"], "dirty": True, "fingerprint": "other"}}))
    assert "code fingerprint other" in train(tmp_path, *args, "skip_done=true").stdout
    made = json.loads(path.read_text())
    name = next(iter(made["data_files"]))
    made["data_files"][name]["sha256"] = "0" * 64  # as if made from another mirror's file
    path.write_text(json.dumps(made))
    assert f"from other data ({name}: sha256 000000000000" in train(tmp_path, *args, "skip_done=true").stdout
    # a checkpoint saved by other code is set aside, and the run starts afresh
    killed = train(tmp_path, *args, "seed=1", "debug.kill_at_step=2", check=False)
    assert killed.returncode != 0
    checkpoint = next((tmp_path / "runs").glob("smoke/default/rte/*/seed1/config-*/checkpoint.pt"))
    saved = torch.load(checkpoint, weights_only=False)
    torch.save({**saved, "code": "other"}, checkpoint)
    rerun = train(tmp_path, *args, "seed=1")
    assert "by other code (fingerprint other" in rerun.stdout and "resumed from" not in rerun.stdout
