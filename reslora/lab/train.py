"""The shared training loop, for every task and every method.

A task object supplies data, collate, loss and evaluation; this file does the rest: optimiser and
schedule, gradient accumulation and clipping, periodic validation with model selection, checkpoint and
resume, logging, and the run record. Read it top to bottom.
"""

from __future__ import annotations

import math
import os
import random
import resource
import signal
import time
import traceback
from contextlib import ExitStack, contextmanager
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from filelock import FileLock, Timeout
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..io import atomic_path
from ..merge import delta_norms
from ..model import ResLoraModel, role_name, trainable_state
from .methods import apply_method, eval_modes, evaluated_as
from .records import (PATH_KEYS, RecordError, RunRecord, cell_name, check_path_names, config_hash, differing_keys,
                      environment, failure_path, identity, is_dirty, publish, read_record, record_path,
                      require_provenance, variant_overrides, write_record)
from .tasks import build_task
from .tasks.mirror import FILES_READ, data_differences, files_now
from .wandb_logger import RunLogger, run_id


LOOP_PARTS = ("validation", "checkpoint", "merge")  # timed inside the training loop; the rest of it is train_steps
CALIBRATION_SEED = 0  # the random inputs (text-to-image noise) of the merge_ls calibration batches


def get_lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to the peak, then linear decay to zero (as in LoRA and the authors' scripts). From step
    ``warmup_steps`` on it is ``transformers.get_scheduler("linear")``'s factor; during warmup it is
    (step + 1) / warmup where transformers' is step / warmup, which gives the first step lr 0: an update that does
    nothing (Table 1's runs, 20 steps with warmup 1, would lose 1 of 20). No get_scheduler setting gives this
    schedule, so it stays written out here."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true is an int to Python


def _number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def mixed_precision_modes() -> list[str]:
    """The ``train.mixed_precision`` modes this machine can run: half precision needs a GPU for fp16, and bf16 a GPU
    that has it (or the CPU)."""
    if not torch.cuda.is_available():
        return ["no", "bf16"]
    return ["no", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])


def validate_config(cfg) -> None:
    """Every setting the loop reads, checked once before anything runs: a bad value fails naming its key, the value
    and what is accepted (not as a numpy or torch error later, nor as a run that trains on nothing)."""
    t, d = cfg.train, cfg.data
    precisions = mixed_precision_modes()
    checks = [("train.lr", t.lr, _number(t.lr) and t.lr > 0, "a positive number"),
              ("train.batch_size", t.batch_size, _integer(t.batch_size) and t.batch_size >= 1, "an integer >= 1"),
              ("train.eval_batch_size", t.eval_batch_size, _integer(t.eval_batch_size) and t.eval_batch_size >= 1,
               "an integer >= 1"),
              ("train.grad_accum", t.grad_accum, _integer(t.grad_accum) and t.grad_accum >= 1, "an integer >= 1"),
              ("train.eval_every", t.eval_every, _integer(t.eval_every) and t.eval_every >= 1, "an integer >= 1"),
              ("train.warmup_ratio", t.warmup_ratio, _number(t.warmup_ratio) and 0 <= t.warmup_ratio < 1,
               "a number in [0, 1)"),
              ("train.weight_decay", t.weight_decay, _number(t.weight_decay) and t.weight_decay >= 0, "a number >= 0"),
              ("train.max_grad_norm", t.max_grad_norm, t.max_grad_norm is None or (
                  _number(t.max_grad_norm) and t.max_grad_norm >= 0), "a number > 0, or 0 or null for no clipping"),
              ("train.test_modes", t.test_modes, t.test_modes in ("all", "headline"),
               "'all' (test in every eval mode) or 'headline' (in the first only)"),
              ("train.mixed_precision", t.mixed_precision, t.mixed_precision in precisions,
               f"one of {precisions} on this machine"),
              ("data.max_length", d.max_length, _integer(d.max_length) and d.max_length >= 1, "an integer >= 1")]
    for name, value, ok, accepted in checks:
        if not ok:
            raise ValueError(f"{name}={value!r} is invalid; it must be {accepted}")
    for name, value in (("train.max_steps", t.max_steps), ("train.epochs", t.epochs),
                        ("train.grad_norm_every", t.grad_norm_every), ("data.max_train_samples", d.max_train_samples),
                        ("data.max_test_samples", d.max_test_samples), ("data.val_samples", d.val_samples)):
        if (value is not None or name == "data.val_samples") and (not _integer(value) or value < 1):
            raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= 1" +
                             (" (or null)" if name != "data.val_samples" else ""))
    if not (t.max_steps or t.epochs):
        raise ValueError(f"train.max_steps={t.max_steps!r} and train.epochs={t.epochs!r}: set one of them > 0")


def adapter_grad_norms(model) -> dict[str, list[float]]:
    """[||grad A||, ||grad B||] per adapted layer (ours: ``lora_A``; PEFT: ``lora_A.default.weight``), keyed by
    the layer's name in the base model."""
    norms: dict[str, list[float]] = {}
    inner = model.base_model if isinstance(model, ResLoraModel) else model.base_model.model
    for name, param in inner.named_parameters():
        parts = name.split(".")
        for which, key in enumerate(("lora_A", "lora_B")):
            if key in parts and param.grad is not None:
                layer = ".".join(parts[:parts.index(key)])
                norms.setdefault(layer, [0.0, 0.0])[which] = float(param.grad.norm())
    return norms


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def method_state(model) -> dict:
    """What an adapter keeps outside its tensors and the optimiser, for the checkpoint: AdaLoRA's rank allocator
    (the importance averages that decide which ranks the next steps keep) and the rank pattern it last chose."""
    tuner = model.base_model
    if not hasattr(tuner, "rankallocator"):
        return {}
    allocator = tuner.rankallocator
    return {"adalora": {"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt,
                        "exp_avg_unc": allocator.exp_avg_unc,
                        "rank_pattern": tuner.peft_config[tuner.trainable_adapter_name].rank_pattern}}


def load_method_state(model, state: dict) -> None:
    """Restore what ``method_state`` saved."""
    if "adalora" in state:
        tuner, saved = model.base_model, state["adalora"]
        allocator = tuner.rankallocator
        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (
            dict(saved["ipt"]), dict(saved["exp_avg_ipt"]), dict(saved["exp_avg_unc"]))
        tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = saved["rank_pattern"]


CHECKPOINT_KEYS = ("config", "model", "optimizer", "scheduler", "progress", "rng")


def read_checkpoint(path: Path, accelerator) -> dict | None:
    """The checkpoint at ``path``, or None when it is damaged (unreadable, truncated, or lacking part of what a resume
    restores): then it is moved aside to ``<name>.damaged`` and the run starts afresh, saying so; never a resume from
    part of a state. Every process of the launch reads it and comes to the same answer."""
    try:
        saved = torch.load(path, weights_only=False)
        problem = (None if isinstance(saved, dict) and all(k in saved for k in CHECKPOINT_KEYS)
                   and isinstance(saved["progress"], dict) and "step" in saved["progress"]
                   else f"it holds a {type(saved).__name__} without all of {list(CHECKPOINT_KEYS)} and progress.step")
    except Exception as error:  # a truncated or foreign file
        problem = f"{type(error).__name__}: {error}"
    if problem is None:
        return saved
    set_aside(path, problem, accelerator, "damaged")
    return None


def set_aside(checkpoint: Path, why: str, accelerator, suffix: str = "other") -> None:
    """Move a checkpoint this run will not resume from to ``<name>.<suffix>`` and say why: the run starts afresh.
    Every process calls it; the main one moves the file once all have read it, and the others wait for the move."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        aside = checkpoint.with_name(f"{checkpoint.name}.{suffix}")
        checkpoint.replace(aside)
        print(f"{checkpoint} is not a usable checkpoint ({why}); moved to {aside}, starting this run afresh")
    accelerator.wait_for_everyone()


def computation_differences(made: dict, config: dict, data_files: dict) -> list[str]:
    """How what a record or checkpoint was ``made`` from differs from this run: its identity config, and the data it
    read (``data_differences``: the sha256 of each mirror file, against ``data_files``, the files as they are now).
    Empty: the same configuration on the same data. skip_done and resume both reuse only that."""
    why = []
    differ = differing_keys(identity(made["config"]), identity(config))
    if differ:
        why.append(f"with another config ({'; '.join(differ[:10])})")
    changed = data_differences(made.get("data_files") or {}, data_files)
    if changed:
        why.append(f"from other data ({'; '.join(changed[:4])})")
    return why


def other_computation(saved: dict, config: dict, data_files: dict, code: str | None) -> str | None:
    """How the run that saved a checkpoint differs from this one: ``computation_differences`` (config, data), or its
    code (the fingerprint of the tracked code: a half-finished run is never continued by other code); None when it
    is the same computation."""
    why = computation_differences(saved, config, data_files)
    if saved.get("code") != code:
        why.append(f"by other code (fingerprint {saved.get('code')}, this code's {code})")
    return " and ".join(why) or None


def batch_stream(loader, accelerator, epoch: int, start: int):
    """Endless (epoch, position after this batch, batch), starting ``start`` batches into ``epoch``."""
    while True:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, start) if start else loader
        for i, batch in enumerate(batches, start=start + 1):
            yield epoch, i, batch
        epoch, start = epoch + 1, 0


def run(cfg, overrides=(), choices: dict | None = None, defaults: dict | None = None) -> dict:
    """Train and evaluate one configuration. ``overrides``: the command line's (they name a variant cell);
    ``choices``: the config group options Hydra picked (recorded, so that ``make check-records`` can compose
    the same config again); ``defaults``: the value each override's key has without it (``override_defaults``: an
    override that changes nothing names no variant). The run dir is keyed by the identity hash; only an ok run
    publishes its record."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["num_processes"] = launched_processes()  # the launcher's, not Hydra's: part of the run's shape
    check_path_names({key: OmegaConf.select(cfg, key) for key in PATH_KEYS})  # before any path is made of them
    variants = variant_overrides(overrides, config, defaults)
    cell = cell_name(cfg.method.name, variants, config)
    where = (cfg.results_dir, cfg.scale.name, cfg.tag, cfg.task.name, cell, cfg.seed)
    published, failure = record_path(*where), failure_path(*where)
    run_dir = Path(cfg.runs_dir, cfg.scale.name, cfg.tag, cfg.task.name, cell, f"seed{cfg.seed}",
                   f"config-{config_hash(identity(config))}")
    provenance = environment()
    require_provenance(provenance["git"], cfg.allow_no_git)
    if cfg.skip_done and already_done(published, config, provenance):
        print(f"skip: {published} exists with this config")
        return {"status": "skipped", "record": str(published)}
    lock = FileLock(str(run_dir / "run.lock"))
    logger, outcome, start, times, previous_handlers = None, {}, time.time(), {}, {}
    SIGNALLED.clear()  # before the handlers: a signal that arrives once they are installed stops this run
    try:
        for signum in STOP_SIGNALS:
            previous_handlers[signum] = signal.signal(signum, _raise_on_signal)
        acquire_run_dir(lock, run_dir)
        logger = RunLogger(cfg.logger, name=f"{cfg.task.name}-{cell}-seed{cfg.seed}",
                           group=f"{cfg.scale.name}/{cfg.tag}", config=config, run_dir=run_dir,
                           tags=[cfg.task.name, cfg.method.name, cfg.method.get("variant", cfg.method.kind),
                                 cfg.scale.name, cfg.tag], main_process=is_main_launch())
        validate_config(cfg)
        computed = train_and_evaluate(cfg, config, run_dir, times, logger, provenance["git"].get("fingerprint"))
        for mode, splits in computed["final"].items():
            for split, metrics in splits.items():
                check_finite(metrics, f"{split} ({mode}) after {computed['total_steps']} steps")
        outcome = {"status": "ok", **computed}
        raise_if_signalled()  # a signal swallowed by library code still stops the run: never published as ok
    except BaseException as error:
        outcome = {"status": "refused" if isinstance(error, RunDirInUse) else "failed",
                   "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        if not cfg.continue_on_failure or isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        print(f"run {outcome['status']}, continuing: {outcome['error']}")
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        wall_time = time.time() - start
        times["other"] = wall_time - sum(times.values())  # set-up, wrapping, block norms, logging
        # The record, written once: what the run is (cell, config, provenance) and what it computed (or its error).
        record: RunRecord = {
            "status": outcome.get("status", "failed"), "task": cfg.task.name, "method": cfg.method.name,
            "cell": cell, "seed": cfg.seed, "scale": cfg.scale.name, "tag": cfg.tag, "overrides": list(overrides),
            "variant_overrides": variants, "choices": dict(choices or {}), "config": config, **provenance,
            **outcome, "time_s": times, "wall_time_s": wall_time, "peak_memory_mb": peak_memory_mb()}
        try:
            if record.get("is_main_process", is_main_launch()):
                # a refused run leaves the run dir to the process that holds it
                write_outcome(record, None if record["status"] == "refused" else run_dir, published, failure, logger)
        finally:  # a record that cannot be written still ends the logger's run and frees the run dir
            if logger is not None:
                logger.finish()
            if lock.is_locked:
                lock.release()
    return record


def launched_processes() -> int:
    """How many processes the launch runs (``accelerate launch`` and torchrun set WORLD_SIZE; a plain run: 1)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_launch() -> bool:
    """Whether this is the launch's main process (RANK 0, as ``accelerate launch`` and torchrun set it; a plain run
    is): it holds the run dir's lock, logs to W&B and writes the record. Known before the Accelerator exists."""
    return int(os.environ.get("RANK", 0)) == 0


class RunDirInUse(RuntimeError):
    """Another process runs the same configuration (it holds the run dir's lock)."""


def acquire_run_dir(lock: FileLock, run_dir: Path) -> None:
    """One launch per run dir (its main process holds the lock for all of a distributed launch's processes)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        if is_main_launch():
            lock.acquire(timeout=0)
    except Timeout:
        raise RunDirInUse(f"{run_dir} is in use by another process running the same configuration ({lock.lock_file} "
                          "is held); wait for it to finish, or stop it") from None


def already_done(published: Path, config: dict, provenance: dict) -> bool:
    """Whether the published record of this cell is this computation: the same config, the same data (the sha256 of
    the mirror files it read, as they are now), made from a committed tree (any commit: ``make reproduce-*`` keeps
    the committed records) or by exactly this code (the same fingerprint). Else it is rerun, saying why (a clean
    rerun also replaces a record made from uncommitted code)."""
    try:
        existing = read_record(published)
    except RecordError as error:
        print(f"rerun: {error}")
        return False
    if existing is None:
        return False
    made_from = existing.get("data_files") or {}
    why = computation_differences(existing, config, files_now(made_from, config["data"]["mirror"],
                                                               config["data"]["cache_dir"]))
    if is_dirty(existing):
        made_by, this = (existing.get("git") or {}).get("fingerprint"), provenance["git"].get("fingerprint")
        if not is_dirty(provenance) or made_by != this:
            why.append(f"from a tree with uncommitted changes (code fingerprint {made_by}; this code's {this})")
    if why:
        print(f"rerun: {published} was made " + " and ".join(why))
    return not why


def write_outcome(record: RunRecord, run_dir: Path | None, published: Path, failure: Path,
                  logger: RunLogger | None) -> None:
    """The run dir's copy of the record; then an ok record is published (and any earlier failure of the cell
    removed), any other goes to results/failures/. The console's last line says which and where. A record that
    cannot be written (a full disk, a read-only directory) stops with an OSError naming each path it could not
    write."""
    destination = published if record["status"] == "ok" else failure
    unwritten = []
    for path in ([run_dir / "record.json"] if run_dir else []) + [destination]:
        try:
            with timed(record["time_s"], "writing"):  # the run-dir copy's write time; the published copy includes it
                (publish if path == published else write_record)(record, path)
        except OSError as error:
            unwritten.append(f"{path} ({error.strerror or error})")
    if unwritten:
        raise OSError(f"the {record['status']} run's record could not be written to " + ", ".join(unwritten) +
                      "; free space or fix the permissions there, and rerun")
    if record["status"] == "ok":
        failure.unlink(missing_ok=True)
    if logger is not None and run_dir is not None:
        logger.artifact(run_dir / "record.json", f"record-{run_id(run_dir)}")
    print(summary_line(record, destination))


def summary_line(record: dict, path: Path) -> str:
    """What a run ends with on the console, whatever the logger: its headline and where its record is."""
    cell = f"{record['task']}/{record['cell']}/seed{record['seed']}"
    if record["status"] != "ok":
        return f"[reslora] {cell} {record['status']}: {record.get('error', '')}; record {path}"
    return (f"[reslora] {cell} ok: test {record['headline_metric']} {record['headline']:.4f} "
            f"({record['headline_mode']}), {record['wall_time_s']:.0f} s; record {path}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNALLED: list[int] = []  # the stop signals this run received


def _raise_on_signal(signum, frame):
    """Stop the run (KeyboardInterrupt for Ctrl-C, SystemExit for SIGTERM), and remember the signal: library code
    that catches every exception (``datasets`` hashes a transform under a bare ``except``) may swallow the raise,
    and ``raise_if_signalled`` then stops the run at its next check."""
    SIGNALLED.append(signum)
    raise_if_signalled()


def raise_if_signalled() -> None:
    if SIGNALLED:
        message = (f"stopped by signal {signal.Signals(SIGNALLED[0]).name}; rerun the same command to resume from the "
                   "last checkpoint")
        raise KeyboardInterrupt(message) if SIGNALLED[0] == signal.SIGINT else SystemExit(message)


def check_finite(values: dict, where: str) -> None:
    """A diverged run fails, naming where: a NaN or infinite loss or metric is never published as ok."""
    bad = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"{where}: {bad} is not finite; the run diverged or its predictions collapsed "
                                 "(a lower train.lr or train.max_grad_norm may help)")


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@contextmanager
def timed(times: dict, part: str):
    """Add the block's wall time to ``times[part]``: where a run's time goes (the record's ``time_s``)."""
    start = time.time()
    try:
        yield
    finally:
        times[part] = times.get(part, 0.0) + time.time() - start


def split_predictions(final: dict) -> tuple[dict, dict]:
    """{mode: {split: metrics with 'items'}} -> (the metrics, {mode: {split: items}}): the record keeps the
    per-item predictions apart from the metrics."""
    metrics = {mode: {split: {k: v for k, v in m.items() if k != "items"} for split, m in splits.items()}
               for mode, splits in final.items()}
    items = {mode: {split: m["items"] for split, m in splits.items() if "items" in m} for mode, splits in final.items()}
    return metrics, items


def evaluate_base(cfg, task, model, splits, accelerator, logger: RunLogger, times: dict) -> RunRecord:
    """The reference row (method kind ``none``, e.g. zero-shot): the base model as it is, without training, on
    the validation split (its evaluation at step 0: what a choice made from this row, such as Fig. 3's sampler,
    reads), then on the test split(s) (timed as 'validation' and 'test/unmerged')."""
    model.requires_grad_(False)
    loaders = {name: DataLoader(ds, batch_size=cfg.train.eval_batch_size, collate_fn=task.collate())
               for name, ds in splits.items() if name == "validation" or name.startswith("test")}
    model, *prepared = accelerator.prepare(model, *loaders.values())
    prepared = dict(zip(loaders, prepared))
    with timed(times, "validation"):
        validation = task.evaluate(model, prepared.pop("validation"), accelerator) if "validation" in prepared else {}
    with timed(times, "test/unmerged"):
        final, predictions = split_predictions(
            {"unmerged": {name: task.evaluate(model, loader, accelerator) for name, loader in prepared.items()}})
    headline = final["unmerged"]["test"][task.headline]
    logger.summary({"headline": headline})
    evaluation = [{"step": 0, "validation": {k: v for k, v in validation.items() if k != "items"}}] if validation else []
    return {"trainable_params": 0, "total_params": sum(p.numel() for p in model.parameters()), "total_steps": 0,
            "headline_mode": "unmerged", "headline_metric": task.headline, "train_loss": [], "eval": evaluation,
            "grad_norms": [], "train_loop_s": 0.0, "final": final, "predictions": predictions, "headline": headline}


def train_and_evaluate(cfg, config: dict, run_dir: Path, times: dict, logger: RunLogger,
                       code: str | None = None) -> RunRecord:
    """Train, select on validation, test: what the run computed (the record's fields after its identity and
    provenance). ``times``: seconds by part, filled as the run goes (the record's ``time_s``); ``code``: the code's
    fingerprint (a checkpoint saved by other code is not resumed)."""
    t = cfg.train
    torch.set_num_threads(cfg.threads)
    # The console shows the run's own progress: no per-dataset Map bars, no load report of the expected new head.
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    # cpu=True without CUDA: processes started by `accelerate launch --multi_gpu` then join over gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=t.grad_accum,
                              mixed_precision=t.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    if accelerator.num_processes != config["num_processes"]:  # the run's identity and cell were named by it
        raise RuntimeError(f"the launch set WORLD_SIZE={config['num_processes']} but accelerate runs "
                           f"{accelerator.num_processes} processes")

    # Data and model. The adapter's initialisation depends on the seed only, not on data loading.
    task = build_task(cfg)
    set_seed(cfg.seed)
    with timed(times, "model_load"):
        base = task.load_model(cfg.model)
    with timed(times, "data"):
        FILES_READ.clear()  # a multirun worker process runs many jobs: record this run's files only
        splits = task.datasets()
    raise_if_signalled()  # one that arrived while datasets hashed a transform (it catches every exception)
    setup: RunRecord = {
        "is_main_process": accelerator.is_main_process, "num_processes": accelerator.num_processes,
        "effective_batch": t.batch_size * t.grad_accum * accelerator.num_processes,  # examples per optimiser step
        **({"assets": task.assets()} if hasattr(task, "assets") else {}),  # what text2image built its judge from
        "data_sizes": {name: len(ds) for name, ds in splits.items()},
        "data_files": dict(FILES_READ),  # mirror files read, with their manifest's sha256 and example count
        **({"split_note": task.split_note} if getattr(task, "split_note", None) else {})}  # when the mirror split
    if cfg.method.kind == "none":
        return {**setup, **evaluate_base(cfg, task, base, splits, accelerator, logger, times)}
    steps_per_epoch = math.ceil(len(splits["train"]) / setup["effective_batch"])
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    set_seed(cfg.seed)
    model = apply_method(base, cfg.method, cfg.model, total_steps)
    modes = eval_modes(cfg.method)
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())

    # Optimiser: AdamW on the trainable tensors, linear warmup and decay.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    warmup = int(t.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: get_lr_factor(s, warmup, total_steps))
    collate = task.collate()
    train_loader = DataLoader(splits["train"], batch_size=t.batch_size, shuffle=True, collate_fn=collate)
    eval_loaders = {name: DataLoader(ds, batch_size=t.eval_batch_size, collate_fn=collate)
                    for name, ds in splits.items() if name != "train"}
    model, optimizer, train_loader, *loaders = accelerator.prepare(model, optimizer, train_loader,
                                                                   *eval_loaders.values())
    eval_loaders = dict(zip(eval_loaders, loaders))
    unwrapped = accelerator.unwrap_model(model)

    def calibration_batches():
        """The first training examples, in order, as model inputs, for the least-squares merge: training data
        only; a fixed seed for tasks whose inputs are random (the merge is the same at every evaluation)."""
        loader = DataLoader(splits["train"], batch_size=t.batch_size, collate_fn=collate)
        generator = torch.Generator().manual_seed(CALIBRATION_SEED)
        for i, batch in enumerate(loader):
            if i == t.calibration_batches:
                return
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            yield task.model_inputs(batch, generator)

    def evaluate(mode: str, split: str) -> dict[str, float]:
        """Metrics of ``split`` in eval ``mode``; its time goes to 'merge' (merged weights, merge_ls fit) and to
        'validation' or 'test/<mode>'."""
        part = "validation" if split == "validation" else f"test/{mode}"
        with ExitStack() as stack:
            with timed(times, "merge"):
                evaluated = stack.enter_context(evaluated_as(unwrapped, mode, calibration_batches))
            with timed(times, part):
                metrics = task.evaluate(evaluated, eval_loaders[split], accelerator)
        model.train()
        return metrics

    # Resume: the last checkpoint of this run dir, if any, restores everything the loop depends on.
    checkpoint = run_dir / "checkpoint.pt"
    progress = {"step": 0, "epoch": 0, "position": 0, "train_loss": [], "eval": [], "grad_norms": [], "best": None}
    pending_rng = None
    saved = read_checkpoint(checkpoint, accelerator) if checkpoint.is_file() else None
    other = saved and other_computation(saved, config, setup["data_files"], code)
    if other:  # a half-finished run is only ever continued by the same computation
        set_aside(checkpoint, f"it was made {other}", accelerator)
        saved = None
    if saved is not None:
        unwrapped.load_state_dict(saved["model"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        load_method_state(unwrapped, saved.get("method_state", {}))
        progress, pending_rng = saved["progress"], saved["rng"]
        print(f"resumed from {checkpoint} at step {progress['step']}")
    resumed_at_step, earlier_s = progress["step"], dict(progress.get("spent_s", {}))  # the killed processes' time

    def train_steps_s() -> float:
        """This process's time in the loop so far, less the parts timed inside it."""
        return time.time() - loop_start - sum(times.get(part, 0.0) for part in LOOP_PARTS)

    def spent_s() -> dict:
        """Seconds by part so far, this process's and the killed ones' (up to their last checkpoint)."""
        own = {**times, "train_steps": train_steps_s()}
        return {part: earlier_s.get(part, 0.0) + own.get(part, 0.0) for part in {*earlier_s, *own}}

    def save_checkpoint():
        progress["spent_s"] = spent_s()  # a resumed run's record adds it: time_before_resume_s
        if accelerator.is_main_process:
            with atomic_path(checkpoint) as tmp:
                torch.save({"config": config, "code": code, "data_files": setup["data_files"],
                            "model": trainable_state(unwrapped),
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "method_state": method_state(unwrapped), "progress": progress, "rng": rng_state()}, tmp)
        accelerator.wait_for_everyone()

    # The loop: one optimiser step = grad_accum micro-batches; validate every eval_every steps.
    model.train()
    loop_start = time.time()
    # Creating a data iterator draws its seed from torch's RNG. Mid-epoch, the checkpointed run made that draw before
    # its checkpoint: the RNG is restored after the resumed run's first batch. At an epoch's end it makes the draw
    # after: the resumed run starts the next epoch from the restored RNG.
    epoch, position = progress["epoch"], progress["position"]
    if position == len(train_loader):
        epoch, position = epoch + 1, 0
    if pending_rng is not None and position == 0:
        set_rng_state(pending_rng)
        pending_rng = None
    stream = batch_stream(train_loader, accelerator, epoch, position)
    bar = tqdm(total=total_steps, initial=progress["step"], disable=not accelerator.is_local_main_process,
               desc=f"{cfg.task.name}/{cfg.method.name}/seed{cfg.seed}", dynamic_ncols=True)
    step_loss, step_examples, tick = torch.zeros(()), 0, time.time()
    while progress["step"] < total_steps:
        progress["epoch"], progress["position"], batch = next(stream)
        if pending_rng is not None:  # mid-epoch: after the data iterator exists (above)
            set_rng_state(pending_rng)
            pending_rng = None
        with accelerator.accumulate(model):
            loss = task.loss(model, batch)
            accelerator.backward(loss)
            step_ahead = progress["step"] + 1
            if accelerator.sync_gradients and t.grad_norm_every and step_ahead % t.grad_norm_every == 0:
                progress["grad_norms"].append({"step": step_ahead, "layers": adapter_grad_norms(unwrapped)})
                logger.log({f"grad_norm/{which}/{layer}": norms[i] for layer, norms in progress["grad_norms"][-1][
                    "layers"].items() for i, which in enumerate(("A", "B"))}, step_ahead)
            if accelerator.sync_gradients and t.max_grad_norm:
                accelerator.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
                if hasattr(unwrapped.base_model, "update_and_allocate"):  # AdaLoRA's rank allocation
                    unwrapped.base_model.update_and_allocate(progress["step"])
            optimizer.zero_grad()
        step_loss += loss.detach().float().cpu() / t.grad_accum
        step_examples += len(batch["labels"]) * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue

        progress["step"] += 1
        step = progress["step"]
        mean_loss = accelerator.reduce(step_loss.to(accelerator.device), "mean").item()
        check_finite({"train loss": mean_loss}, f"step {step}")
        raise_if_signalled()
        progress["train_loss"].append([step, mean_loss])
        rate = step_examples / (time.time() - tick)
        logger.log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0], "train/examples_per_s": rate}, step)
        bar.set_postfix(loss=f"{mean_loss:.4f}", ex_s=f"{rate:.1f}")
        bar.update()
        step_loss, step_examples, tick = torch.zeros(()), 0, time.time()

        if step % t.eval_every == 0 or step == total_steps:
            metrics = evaluate(modes[0], "validation")
            metrics.pop("items", None)  # per-item predictions are kept for the test splits only
            check_finite(metrics, f"validation at step {step}")
            progress["eval"].append({"step": step, "validation": metrics})
            logger.log({f"validation/{k}": v for k, v in metrics.items()}, step)
            if progress["best"] is None or metrics[task.headline] > progress["best"]["validation"][task.headline]:
                progress["best"] = {"step": step, "validation": metrics, "state": trainable_state(unwrapped)}
            with timed(times, "checkpoint"):
                save_checkpoint()
            if step == cfg.debug.kill_at_step:  # tests: a kill right after a checkpoint, as a crash would
                os.kill(os.getpid(), getattr(signal, f"SIG{cfg.debug.kill_signal}"))
    bar.close()
    train_loop_s = time.time() - loop_start  # this process's share, after any resume
    times["train_steps"] = train_steps_s()

    # Final evaluation: the model selected on validation, on the test split(s), in every eval mode.
    best = progress["best"]
    unwrapped.load_state_dict(best["state"], strict=False)
    adapted: RunRecord = {}  # ResLoRA: chains per role (after any split at the first forward), merged block norms
    if isinstance(unwrapped, ResLoraModel):
        adapted["chain_lengths"] = {}
        for chain in unwrapped.chains:
            adapted["chain_lengths"].setdefault(role_name(chain.names[0]), []).append(len(chain.layers))
        adapted["block_norms"] = delta_norms(unwrapped, "plain" if modes[0] == "unmerged" else modes[0])
        logger.summary({f"block_norm/{name}": norms["merged"] for name, norms in adapted["block_norms"].items()})
    final, predictions = split_predictions(
        {mode: {split: evaluate(mode, split) for split in eval_loaders if split != "validation"}
         for mode in (modes if t.test_modes == "all" else modes[:1])})
    headline = final[modes[0]]["test"][task.headline]
    if t.save_adapter and accelerator.is_main_process:  # the selected model's adapter (and its PEFT LoRA export)
        unwrapped.save_pretrained(run_dir / "adapter")
        adapted["adapter"] = str(run_dir / "adapter")
        if isinstance(unwrapped, ResLoraModel):
            unwrapped.export_peft_adapter(run_dir / "adapter_peft", "plain" if modes[0] == "unmerged" else modes[0])
            adapted["adapter_peft"] = str(run_dir / "adapter_peft")
    logger.log({f"test/{mode}/{k}": v for mode, m in final.items() for k, v in m["test"].items()}, total_steps)
    logger.summary({"headline": headline, "best/step": best["step"],
                    **{f"best/validation/{k}": v for k, v in best["validation"].items() if isinstance(v, (int, float))}})
    return {**setup, "trainable_params": trainable_params, "total_params": total_params, "total_steps": total_steps,
            "headline_mode": modes[0], "headline_metric": task.headline, "train_loss": progress["train_loss"],
            "eval": progress["eval"], "grad_norms": progress["grad_norms"],
            "best": {"step": best["step"], "validation": best["validation"]}, **adapted, "final": final,
            "predictions": predictions, "headline": headline, "train_loop_s": train_loop_s,
            **({"resumed_at_step": resumed_at_step, "time_before_resume_s": earlier_s} if resumed_at_step else {})}
