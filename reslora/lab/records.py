"""Run records: one JSON per run, the only input of tables and figures.

How a record is made and published:
- A run's *identity* is its composed config without the keys that steer a run but do not change what it
  computes (``RUN_CONTROL_KEYS``). Its hash names the run dir, so two configurations never share a checkpoint.
  Its *shape* (processes and torch threads, ``SHAPE_KEYS``) changes the numbers too: away from one process and one
  thread it is part of the identity and of the cell.
- A *cell* is ``task/method/seed``; a run with overrides beyond the grid keys (``train.lr=1e-3``) is a cell of
  its own, named ``method__<overrides>-<hash>``, so a sweep over any key keeps one record per configuration. An
  override that leaves its key at its default names no variant, unless the experiment sweeps that key
  (``override_defaults``); values are normalised (``1e-3`` and ``0.001`` are one cell).
- Only a run that finished ``ok`` publishes ``results/records/<scale>/<tag>/<task>/<cell>/seed<N>.json``,
  atomically. A failed, killed or refused run leaves its record in the run dir and a copy under
  ``results/failures/``; it never touches a published record.
- Every record carries its provenance: git commit, dirty flag, and a fingerprint of the code and configs (a run
  outside a git checkout, which could not say which code made it, is refused unless ``allow_no_git=true``).
  Table builders refuse records from a dirty tree unless told otherwise; ``make check-records`` checks all.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import TypedDict

from ..io import write_json

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "wandb", "numpy", "diffusers")
# Keys that steer a run without changing what it computes: not part of its identity (dotted for nested keys).
RUN_CONTROL_KEYS = ("debug", "logger", "skip_done", "continue_on_failure", "allow_no_git", "runs_dir", "results_dir",
                    "data.mirror", "data.cache_dir", "data.allow_unlisted", "train.save_adapter", "report")
# The run's shape: processes (``num_processes``, set by the launcher: it multiplies the effective batch) and torch
# threads (they change the order of floating-point sums). Part of the identity and the cell when not 1; at 1 left
# out, so that a one-process, one-thread run keeps the identity it had before the shape was recorded.
SHAPE_KEYS = ("num_processes", "threads")
# Overrides that name the cell itself (its row, column and seed) or only steer the run: not a variant of a cell.
GRID_KEYS = ("task", "method", "seed", "scale", "experiment", "tag")
CODE_ROOT = Path(__file__).resolve().parents[2]  # a checkout's root, when the package runs from one
# Tracked paths that make up the code of a run: the dirty flag and the fingerprint cover them (not results/,
# which a sweep writes to as it goes).
CODE_PATHS = ("reslora", "experiments", "conf", "Makefile", "pyproject.toml", "requirements.txt",
              "requirements-nodeps.txt")


class RunRecord(TypedDict, total=False):
    """The run record: one JSON object per run (``results/records/...``), the only input of tables and figures.
    Written once, when the run ends (``reslora.lab.train.run``). A run that did not finish has its identity,
    provenance and times, with ``status`` "failed", ``error`` and ``traceback``."""

    status: str                 # "ok" (published) or "failed"
    error: str                  # failed runs: the exception; traceback: its traceback
    traceback: str
    task: str
    method: str                 # the method's config name (the table row)
    cell: str                   # method, or method__overrides-hash for a variant cell
    seed: int
    scale: str
    tag: str                    # the experiment (table2, lr_sweep, ...)
    overrides: list[str]        # the command line's overrides; variant_overrides: those that name the cell
    variant_overrides: list[str]
    choices: dict               # the config group options Hydra picked (check-records composes them again)
    config: dict                # the composed config, resolved
    versions: dict              # package versions
    git: dict                   # commit, dirty, fingerprint (+ diff when dirty): provenance()
    python: str
    machine: str
    cpu: str
    cpus: int
    is_main_process: bool
    num_processes: int          # processes of the launch (also config.num_processes: part of the run's shape)
    effective_batch: int        # examples per optimiser step: batch_size x grad_accum x num_processes
    assets: dict                # text-to-image: base and judges used, and sha256 {asset: hash} (reslora.lab.assets)
    data_sizes: dict            # examples per split
    data_files: dict            # mirror files read: verified, sha256, example count from the manifest
    split_note: str             # where the splits came from, when the mirror decided them
    trainable_params: int
    total_params: int
    total_steps: int
    headline_mode: str          # the eval mode the tables report (ResLoRA: merged)
    headline_metric: str
    train_loss: list            # [step, loss] per optimiser step
    eval: list                  # {step, validation: metrics} per validation
    grad_norms: list            # {step, layers: {name: [|grad A|, |grad B|]}}
    best: dict                  # {step, validation}: the checkpoint selected on validation
    chain_lengths: dict         # ResLoRA: lengths of the chains per role
    block_norms: dict           # ResLoRA: per block, |s B A| ("own") and |W* - W| ("merged")
    final: dict                 # {mode: {split: metrics}} of the selected model on the test split(s)
    predictions: dict           # {mode: {split: {id, prediction, label | correct}}}: per test item
    headline: float             # final[headline_mode]["test"][headline_metric]
    adapter: str                # train.save_adapter: where the adapter and its PEFT export were saved
    adapter_peft: str
    time_s: dict                # seconds by part: model_load, data, train_steps, validation, checkpoint, merge,
                                # test/<mode>, writing, other
    train_loop_s: float
    wall_time_s: float          # of this process; a resumed run's killed processes: time_before_resume_s
    resumed_at_step: int        # a run resumed from its checkpoint: that step
    time_before_resume_s: dict  # seconds by part that the killed processes spent up to their last checkpoint
    peak_memory_mb: float


class RecordError(ValueError):
    """A record that cannot be used: unreadable, not ok, or from an uncommitted tree."""


# ---- identity: what a run computes -------------------------------------------------------------------------
def identity(config: dict) -> dict:
    """``config`` without the run-control keys, and with only the shape keys away from 1 (``run_shape``)."""
    out = {k: v for k, v in config.items() if k not in RUN_CONTROL_KEYS and k not in SHAPE_KEYS}
    out.update(run_shape(config))
    for key in RUN_CONTROL_KEYS:
        head, _, tail = key.partition(".")
        if tail and isinstance(out.get(head), dict):
            out[head] = {k: v for k, v in out[head].items() if k != tail}
    return out


def config_hash(config: dict, length: int = 8) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:length]


def differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, as 'key: a -> b'."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        name = f"{prefix}{key}"
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_keys(va, vb, name + ".")
        elif va != vb:
            out.append(f"{name}: {va!r} -> {vb!r}")
    return out


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


MISSING = object()


def value_at(config: dict, key: str):
    """The value of the dotted ``key`` in a nested dict; ``MISSING`` when it has none."""
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def variant_overrides(overrides, config: dict | None = None, defaults: dict | None = None) -> list[str]:
    """The command-line overrides that make a run a variant of its cell: neither grid nor run-control keys; with
    ``config`` (the composed one), each written as ``normalised_override`` does. ``defaults`` ({key: value}, from
    ``override_defaults``): an override that leaves its key at that value changes nothing and names no variant."""
    def steers(key: str) -> bool:  # method=... names the row; method.pre_num=0 makes a variant of it
        return (key in GRID_KEYS or key in SHAPE_KEYS or key.startswith(("hydra.", "hydra/"))
                or any(key == k or key.startswith(k + ".") for k in RUN_CONTROL_KEYS))

    def changes(override: str) -> bool:  # compared as JSON: true and 1 are two configurations, not one
        key = override_key(override)
        return key not in (defaults or {}) or json.dumps(value_at(config, key), sort_keys=True, default=str) != \
            json.dumps(defaults[key], sort_keys=True, default=str)
    variants = [o for o in overrides if not steers(override_key(o)) and (config is None or changes(o))]
    return sorted(normalised_override(o, config) if config is not None else o for o in variants)


def override_defaults(overrides, swept, compose) -> dict:
    """{key: the value it has without them} for the variant overrides that are not an axis of the experiment's sweep
    (``swept``: the keys of its ``hydra.sweeper.params``); ``compose(overrides)``: the config those overrides compose,
    as a dict. With them ``variant_overrides`` drops an override that sets its key to its default, so that
    ``train.lr=<the scale's rate>`` is the scale's own cell. A swept key names its cell at every value, its default
    included: a sweep's cells (and the table that reads them) are named by it."""
    free = [o for o in variant_overrides(overrides) if override_key(o) not in swept]
    if not free:
        return {}
    config = compose([o for o in overrides if o not in free])
    return {override_key(o): value for o in free if (value := value_at(config, override_key(o))) is not MISSING}


def normalised_override(override: str, config: dict) -> str:
    """``key=value`` with a number or boolean written as the composed config holds it, so that one configuration
    is one cell however it was typed (``train.lr=1e-3`` and a sweep's ``train.lr=0.001`` both name
    ``train.lr=0.001``); any other value (a string, a list, a key the config lacks) as typed."""
    key, value = override.split("=", 1)[0], value_at(config, override_key(override))
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"{key}={value!r}"
    return override


# The config keys whose values name directories of a run dir and of its record.
PATH_KEYS = ("scale.name", "tag", "task.name", "method.name", "seed")
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,=+-]*")


def check_path_names(names: dict) -> None:
    """Refuse a value that becomes a directory name of the run dir or the record (tag, scale, task, method) unless
    it is a plain name, and a seed that is not an integer >= 0: ``tag=../cpu/table2`` must not replace another
    scale's record, nor ``tag=../../x`` write outside results/."""
    for key, value in names.items():
        if key == "seed":
            if type(value) is not int or value < 0:
                raise ValueError(f"seed={value!r} is invalid; it must be an integer >= 0")
        elif not isinstance(value, str) or not PLAIN_NAME.fullmatch(value) or ".." in value:
            raise ValueError(f"{key}={value!r} is invalid: it names a directory of the run and its record, so it "
                             "must be a plain name (letters, digits and _ . , = + -, starting with a letter or digit, "
                             "no '..')")


def run_shape(config: dict) -> dict:
    """The shape keys away from 1: those the identity keeps."""
    return {key: config[key] for key in SHAPE_KEYS if config.get(key, 1) != 1}


SLUG_CHARS = 120


def cell_name(method: str, variants: list[str], config: dict) -> str:
    """``method`` for the grid's own configuration; ``method__key=value,...-<hash>`` for a variant (``variants``,
    then ``key=value`` per shape key away from 1: ``run_shape``), the hash over the identity without the seed, so
    every seed of a variant shares the cell. The key=value part is cut at ``SLUG_CHARS`` (the hash keeps the name
    unique), so that a directory name stays under the 255-byte limit."""
    variants = [*variants, *(f"{key}={value}" for key, value in run_shape(config).items())]
    if not variants:
        return method
    slug = ",".join(variants).replace("/", "_").replace(" ", "")[:SLUG_CHARS]
    return f"{method}__{slug}-{config_hash({k: v for k, v in identity(config).items() if k != 'seed'}, 6)}"


# ---- paths ---------------------------------------------------------------------------------------------------
def record_path(results_dir: str | Path, scale: str, tag: str, task: str, cell: str, seed: int) -> Path:
    return Path(results_dir) / "records" / scale / tag / task / cell / f"seed{seed}.json"


def failure_path(results_dir: str | Path, scale: str, tag: str, task: str, cell: str, seed: int) -> Path:
    return Path(results_dir) / "failures" / scale / tag / task / cell / f"seed{seed}.json"


# ---- reading -------------------------------------------------------------------------------------------------
def read_record(path: str | Path) -> RunRecord | None:
    """The record at ``path``; None when there is none; RecordError naming the file when it cannot be parsed."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RecordError(f"{path} is not a readable run record ({error}); restore it with git or delete it "
                          "and rerun its cell") from error
    if not isinstance(record, dict) or "status" not in record or "config" not in record:
        raise RecordError(f"{path} is not a run record (no 'status' or 'config' key)")
    return record


def record_files(results_dir: str | Path, scale: str | None = None, tag: str | None = None) -> list[Path]:
    root = Path(results_dir) / "records"
    pattern = f"{scale or '*'}/{tag or '*'}/*/*/seed*.json"
    return sorted(root.glob(pattern))


KNOWN_STALE = "known_stale.txt"


def known_stale(results_dir: str | Path) -> dict[str, str]:
    """{record path relative to results/records: reason}: the records known to fail ``make check-records``
    (waiting to be rerun), from results/records/known_stale.txt (``path  # reason`` lines)."""
    listing = Path(results_dir) / "records" / KNOWN_STALE
    known = {}
    for line in listing.read_text().splitlines() if listing.is_file() else []:
        path, _, reason = line.partition("#")
        if path.strip():
            known[path.strip()] = reason.strip()
    return known


# ---- a record checked against itself -----------------------------------------------------------------------------
# Keys every published record has: what the tables read, and what the checks below recompute from.
REQUIRED_KEYS = ("task", "method", "cell", "seed", "scale", "tag", "config", "git", "final", "predictions",
                 "headline", "headline_mode", "headline_metric")
# Older STS-B records hold their predictions rounded to 4 decimals (then stored as float32); newer ones the float32
# values, unrounded.
ROUNDED_TO = 1e-4
# Recomputing from unrounded float32 predictions in float64 moves a correlation by < 1e-5 on the committed records.
FLOAT_TOLERANCE = 1e-5


def placement_problems(record: dict, relative: Path) -> list[str]:
    """Where the record lies (``scale/tag/task/cell/seed<N>.json`` under results/records) against what it says it
    is, and what it says against its own config: a record copied or moved to another cell's path is refused."""
    config = record["config"]
    said = {"scale": record["scale"], "tag": record["tag"], "task": record["task"], "cell": record["cell"],
            "seed": f"seed{record['seed']}"}
    at = dict(zip(("scale", "tag", "task", "cell", "seed"), (*relative.parts[:4], relative.stem)))
    problems = [f"its {key} is {said[key]!r} but it lies at {at[key]!r}" for key in said if said[key] != at[key]]
    in_config = {"task": config.get("task", {}).get("name"), "scale": config.get("scale", {}).get("name"),
                 "method": config.get("method", {}).get("name"), "tag": config.get("tag"), "seed": config.get("seed")}
    problems += [f"its {key} is {record[key]!r} but its config's is {value!r}" for key, value in in_config.items()
                 if record[key] != value]
    expected_cell = cell_name(record["method"], record.get("variant_overrides", []), config)
    if record["cell"] != expected_cell:
        problems.append(f"its cell is {record['cell']!r} but its method, overrides and config name {expected_cell!r}")
    return problems


def rounding_tolerance(values) -> float:
    """How far a correlation of ``values`` with anything can be from the one of the values before they were rounded
    to ``ROUNDED_TO`` (0 when they are not all multiples of it). A correlation is the cosine of the angle between
    the centred vectors; rounding moves the vector by at most ``ROUNDED_TO / 2`` per item, which turns it by at
    most ``asin(|error| / |centred vector|)``, and a cosine moves by at most the angle. Spearman: the same bound on
    the ranks, since rounding keeps the order and only ties items (a tie group of t moves by at most
    ``sqrt((t^3 - t) / 12)``)."""
    import numpy as np
    from scipy.stats import rankdata

    values = np.asarray(values, dtype=float)
    if not np.array_equal(np.float32(np.round(values, 4)), np.float32(values)):  # stored as float32 after rounding
        return 0.0

    def angle(vector, error):
        norm = np.linalg.norm(vector - vector.mean())
        return float(np.arcsin(min(1.0, error / norm))) if norm else 2.0

    _, ties = np.unique(values, return_counts=True)
    return max(angle(values, ROUNDED_TO / 2 * np.sqrt(len(values))),
               angle(rankdata(values), float(np.sqrt(np.sum(ties ** 3 - ties) / 12))))


def recomputed_metrics(record: dict, split_items: dict) -> tuple[dict[str, float], float]:
    """The metrics that the task family computes from per-item predictions, recomputed from ``split_items`` (one
    split of one mode), and the tolerance they hold to. GLUE: every metric; reasoning: accuracy; text-to-image:
    the style score and its parts (the denoising loss has no per-item values: it cannot be recomputed)."""
    import numpy as np

    family = record["config"]["task"].get("family")
    if family == "glue":
        from .tasks.glue import GLUE, compute_metrics

        spec = GLUE[record["task"]]
        predictions, labels = np.asarray(split_items["prediction"]), np.asarray(split_items["label"])
        if spec.num_labels > 1:
            return compute_metrics(spec.metrics, predictions.astype(int), labels.astype(int)), FLOAT_TOLERANCE
        return compute_metrics(spec.metrics, predictions, labels), FLOAT_TOLERANCE + rounding_tolerance(predictions)
    if family == "reasoning":
        return {"accuracy": float(np.mean(split_items["correct"]))}, FLOAT_TOLERANCE
    if family == "text2image":
        return ({metric: float(np.mean(split_items[key])) for metric, key in
                 (("style_score", "correct"), ("content_score", "content"), ("styled_share", "styled"))},
                FLOAT_TOLERANCE)
    raise RecordError(f"task family {family!r} has no per-item metrics to recompute")


def metric_problems(record: dict) -> list[str]:
    """The record's headline and final metrics against what its own per-item predictions give (``recomputed_metrics``;
    tolerance ``FLOAT_TOLERANCE``, plus ``rounding_tolerance`` for the 4-decimal STS-B predictions of older records);
    every metric finite; the headline is final[headline_mode]["test"][headline_metric]."""
    import math

    problems = []
    final, predictions = record["final"], record["predictions"]
    try:
        stated = final[record["headline_mode"]]["test"][record["headline_metric"]]
    except (KeyError, TypeError):
        return [f"final has no {record['headline_mode']}/test/{record['headline_metric']} for its headline"]
    if record["headline"] != stated:
        problems.append(f"headline {record['headline']!r} is not its final {record['headline_mode']}/test/"
                        f"{record['headline_metric']} {stated!r}")
    sizes = record.get("data_sizes") or {}
    for mode, splits in final.items():
        for split, metrics in splits.items():
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            problems += [f"final {mode}/{split}/{k} is {v!r}, not a finite number" for k, v in numbers.items()
                         if not math.isfinite(v)]
            if "denoise_loss" in numbers and numbers.get("neg_denoise_loss") != -numbers["denoise_loss"]:
                problems.append(f"final {mode}/{split}: neg_denoise_loss is not -denoise_loss")
            items = (predictions.get(mode) or {}).get(split)
            if items is None:
                if set(numbers) - {"denoise_loss", "neg_denoise_loss"}:  # a metric with per-item values lacks them
                    problems.append(f"no predictions for {mode}/{split}, so its metrics cannot be checked")
                continue
            counts = {key: len(values) for key, values in items.items()}
            if len(set(counts.values())) != 1 or len(set(map(str, items.get("id", [])))) != counts.get("id"):
                problems.append(f"predictions {mode}/{split} are not one entry per distinct id ({counts})")
                continue
            per_example = record["config"]["task"].get("family") != "text2image"  # text-to-image: per sample drawn
            if per_example and split in sizes and counts["id"] != sizes[split]:
                problems.append(f"predictions {mode}/{split} hold {counts['id']} items where the split has "
                                f"{sizes[split]}")
            recomputed, tolerance = recomputed_metrics(record, items)
            for key, value in recomputed.items():
                if key not in numbers:
                    problems.append(f"final {mode}/{split} lacks {key}")
                elif not abs(numbers[key] - value) <= tolerance:
                    problems.append(f"final {mode}/{split}/{key} is {numbers[key]!r} but its predictions give "
                                    f"{value!r} (tolerance {tolerance:.2g})")
    return problems


def record_problems(record: dict, path: Path, records_root: Path) -> list[str]:
    """Everything that makes a published record unusable as evidence, apart from provenance and its config against
    HEAD (``make check-records`` checks those): status, required keys, placement, metrics against predictions."""
    if record.get("status") != "ok":
        return [f"status {record.get('status')!r}; a published record must be 'ok'"]
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        return [f"lacks the key(s) {missing} that every published record has"]
    return placement_problems(record, Path(path).relative_to(records_root)) + metric_problems(record)


def duplicate_problems(records: dict[Path, dict]) -> dict[Path, str]:
    """Records that are the same computation as another one (equal identity config): the same seed counted twice,
    e.g. one configuration published under two cells."""
    first: dict[str, Path] = {}
    problems = {}
    for path, record in records.items():
        key = config_hash(identity(record["config"]), 16)
        if key in first:
            problems[path] = f"the same configuration (seed included) as {first[key]}: one seed counted twice"
        else:
            first[key] = path
    return problems


def load_records(results_dir: str | Path, scale: str, tag: str, allow_dirty: bool | None = None,
                 variants: bool = False) -> list[RunRecord]:
    """Every published record of ``scale``/``tag`` (with ``variants``, also the cells made by extra overrides).
    Stops with RecordError, naming the files, at a record that cannot be read, is not ok, fails its own checks
    (``record_problems``: keys, placement, metrics recomputed from its predictions), repeats another's
    configuration (``duplicate_problems``), or was made from a
    tree with uncommitted changes, unless ``allow_dirty``, or the record is listed in known_stale.txt (waiting
    to be rerun), or it is a smoke-scale record (never evidence); records let through dirty get ``dirty: True``
    for the tables to list."""
    if allow_dirty is None:
        allow_dirty = scale.startswith("smoke")
    listed = known_stale(results_dir)
    loaded = {}
    for path in record_files(results_dir, scale, tag):
        if "__" in path.parent.name and not variants:
            continue
        record = read_record(path)
        problems = record_problems(record, path, Path(results_dir) / "records")
        if problems:
            raise RecordError(f"{path}: " + "; ".join(problems))
        loaded[path] = record
    duplicates = duplicate_problems(loaded)
    if duplicates:
        raise RecordError("; ".join(f"{path}: {problem}" for path, problem in duplicates.items()))
    records, dirty = [], []
    for path, record in loaded.items():
        if is_dirty(record):
            record["dirty"] = True
            if str(path.relative_to(Path(results_dir) / "records")) not in listed:
                dirty.append(str(path))
        records.append(record)
    if dirty and not allow_dirty:
        raise RecordError(f"{len(dirty)} record(s) under {results_dir}/records/{scale}/{tag} were made from a tree "
                          f"with uncommitted changes (not evidence; rerun them from a commit, or pass --allow-dirty "
                          f"to build anyway with them listed): " + ", ".join(dirty[:5]) + (" ..." if len(dirty) > 5 else ""))
    return records


def load_failures(results_dir: str | Path, scale: str, tag: str) -> list[dict]:
    root = Path(results_dir) / "failures" / scale / tag
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/*/seed*.json"))]


def is_dirty(record: dict) -> bool:
    """Made from a tree with uncommitted changes, or with no git information at all."""
    git = record.get("git") or {}
    return git.get("dirty") is not False or not git.get("commit")


# ---- writing -------------------------------------------------------------------------------------------------
def publish(record: RunRecord, path: Path) -> None:
    """Write an ok record to its published path, atomically; anything else is refused."""
    if record.get("status") != "ok":
        raise ValueError(f"only an ok run publishes a record; this one is {record.get('status')!r}")
    write_json(path, record)


def write_record(record: dict, *paths: Path) -> None:
    for path in paths:
        write_json(path, record)


# ---- provenance -------------------------------------------------------------------------------------------------
def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"versions": versions, "git": provenance(), "python": platform.python_version(),
            "machine": platform.machine(), "cpu": cpu_model(), "cpus": os.cpu_count()}


def cpuinfo(field: str) -> str | None:
    """The first processor's ``field`` in /proc/cpuinfo (Linux), or None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what platform reports."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The processor's instruction-set flags (Linux: /proc/cpuinfo), or None where they cannot be read."""
    flags = cpuinfo("flags")
    return None if flags is None else set(flags.split())


def require_provenance(git: dict, allowed: bool) -> None:
    """Refuse a run whose record could not say which code made it, unless ``allowed`` (``allow_no_git=true``)."""
    if not git.get("commit") and not allowed:
        raise RuntimeError(
            f"{CODE_ROOT} is not a git checkout (or git is not installed), so a run's record could not say which "
            "code made it. Run from a clone of the repository (git clone, then make setup), or pass allow_no_git=true "
            "to run anyway: the record then has git.commit null and the table builders treat it as made from "
            "uncommitted code")


def provenance(root: str | Path | None = None) -> dict:
    """Git commit, dirty flag (uncommitted changes to the tracked code, ``CODE_PATHS``), and ``fingerprint``: a
    hash of the content of those tracked files as they are on disk, so a record says which code ran even when
    the tree was dirty (then ``diff``: a hash of ``git diff HEAD`` over them)."""
    root = Path(root or CODE_ROOT).resolve()

    def git(*args) -> str | None:
        try:
            result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, cwd=root)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # A package installed into a venv inside a checkout is under a work tree too, but not its code.
    if commit is None or Path((git("rev-parse", "--show-toplevel") or "").strip()).resolve() != root:
        return {"commit": None, "dirty": None, "fingerprint": None}
    dirty = bool((git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS) or "").strip())
    files = sorted((git("ls-files", "-z", "--", *CODE_PATHS) or "").split("\0"))
    digest = hashlib.sha256()
    for name in filter(None, files):
        path = root / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<deleted>") + b"\0")
    out = {"commit": commit.strip(), "dirty": dirty, "fingerprint": digest.hexdigest()[:16]}
    if dirty:
        out["diff"] = hashlib.sha256((git("diff", "HEAD", "--", *CODE_PATHS) or "").encode()).hexdigest()[:16]
    return out
