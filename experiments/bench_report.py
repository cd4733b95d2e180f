"""The bench's contestants, targets and report: what `experiments/bench.py` measures is compared and written
up here (results/bench.md), apart from the measuring itself."""

from __future__ import annotations

from dataclasses import dataclass


REFERENCE_PEFT = "peft_lora"
REFERENCE_OURS = "lora"
CONTROL = "lora_control"
BASE = "base"
BASE_CONTROL = "base_control"


@dataclass(frozen=True)
class Contestant:
    key: str
    label: str
    variant: str | None  # None: HF PEFT LoRA
    pre_num: int = 0
    merge_mode: str = "plain"


CONTESTANTS = [
    Contestant(REFERENCE_PEFT, "HF PEFT LoRA", None),
    Contestant(REFERENCE_OURS, "lora (ours)", "lora"),
    Contestant(CONTROL, "lora again (noise control)", "lora"),
    Contestant("is", "is", "is", 1, "merge_bi"),
    Contestant("bs1", "bs, pre_num 1", "bs", 1, "merge_bi"),
    Contestant("bs4", "bs, pre_num 4", "bs", 4, "merge_bi"),
    Contestant("bs_all", "bs, pre_num all", "bs", -1, "merge_bi"),
    Contestant("ms1", "ms, pre_num 1", "ms", 1, "merge_bi"),
    Contestant("ms4", "ms, pre_num 4", "ms", 4, "merge_bi"),
    Contestant("ms_all", "ms, pre_num all", "ms", -1, "merge_bi"),
]
LABELS = {c.key: c.label for c in CONTESTANTS} | {BASE: "base model (untouched)",
                                                  BASE_CONTROL: "copy of the base model (noise control)"}

# The targets: (what, contestant, reference, limit).
TARGETS = [
    ("step_time", REFERENCE_OURS, REFERENCE_PEFT, 1.00),
    ("step_time", "is", REFERENCE_OURS, 1.08),
    ("step_time", "ms4", REFERENCE_OURS, 1.08),
    ("step_time", "bs4", REFERENCE_OURS, 1.12),
    *[("peak_memory", c.key, REFERENCE_OURS, 1.10) for c in CONTESTANTS if c.variant not in (None, "lora")],
    *[("inference_time", c.key, BASE, 1.02) for c in CONTESTANTS if c.key != CONTROL],
]


MIN_ROUNDS_FOR_INTERVAL = 4


def check_targets(results: dict) -> list[dict]:
    checks = []
    for wkey, w in results.items():
        for what, key, ref, limit in TARGETS:
            if what == "step_time":
                stats = w["train"][key]["vs_peft_lora" if ref == REFERENCE_PEFT else "vs_lora"]
            elif what == "peak_memory":
                ratio = w["train"][key]["peak_vs_lora"]
                stats = {"median": ratio, "q1": ratio, "q3": ratio, "ci": None, "exact": True}
            else:
                stats = w["inference"][key]["vs_base"]
            met = stats["median"] <= limit
            if met:
                verdict = "met"
            elif stats.get("exact"):
                verdict = "missed"
            elif stats["ci"] is None:
                verdict = "missed, too few rounds to tell cost from noise"
            elif stats["ci"][0] <= limit:
                verdict = "not resolved: the limit is inside the 95% interval of the median"
            else:
                verdict = "missed"
            checks.append({"workload": wkey, "what": what, "contestant": key, "reference": ref,
                           "ratio": stats["median"], "q1": stats["q1"], "q3": stats["q3"], "ci": stats["ci"],
                           "limit": limit, "met": met, "verdict": verdict})
    return checks


# ---- report ------------------------------------------------------------------------------------------------
def fmt_ratio(stats: dict) -> str:
    return f"{stats['median']:.3f} ({stats['q1']:.3f}–{stats['q3']:.3f})"


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def fmt_ci(stats: dict) -> str:
    if stats.get("what") == "peak_memory":
        return "exact"
    return "–".join(f"{x:.3f}" for x in stats["ci"]) if stats.get("ci") else "n/a"


def reading(report: dict) -> list[str]:
    lines = []
    for wkey, w in report["workloads"].items():
        c, b = w["train"][CONTROL]["vs_lora"], w["inference"][BASE_CONTROL]["vs_base"]
        lines.append(f"- {wkey}, noise controls: our lora against a second copy of itself reads {c['median']:.3f} "
                     f"(95% interval {fmt_ci(c)}), a copy of the base model against the base {b['median']:.3f} "
                     f"({fmt_ci(b)}). Ideally both are 1: their distance from 1 and their intervals are the "
                     "resolution of this run.")
        ops = {k: t["aten_ops"] for k, t in w["train"].items()}
        others = ", ".join(f"{LABELS[k]} {ops[k] - ops[REFERENCE_OURS]:+,d}" for k in ops
                           if k not in (REFERENCE_OURS, CONTROL))
        lines.append(f"- {wkey}, aten operators per training step (deterministic, from the profiled step): our lora "
                     f"{ops[REFERENCE_OURS]:,d}; the others against it: {others}.")
        inf = w["inference"]
        merged = [k for k in inf if k not in (BASE, BASE_CONTROL)]
        same = [k for k in merged if inf[k]["same_structure_as_base"] and inf[k]["aten_ops"] == inf[BASE]["aten_ops"]]
        differ = [LABELS[k] for k in merged if k not in same]
        lines.append(f"- {wkey}, merged models: {len(same)} of {len(merged)} have the base model's modules, tensor "
                     f"shapes, dtypes and strides and run the same {inf[BASE]['aten_ops']:,d} aten operators per "
                     "forward" + (f"; these differ: {', '.join(differ)}" if differ else
                                  ", so any measured difference in their forward time is noise") + ".")
    unmet = [t for t in report["targets"] if not t["met"]]
    if not unmet:
        lines.append("- Every target is met in this run.")
    for t in unmet:
        lines.append(f"- Not met: {t['workload']} {t['what'].replace('_', ' ')} of {LABELS[t['contestant']]} vs "
                     f"{LABELS[t['reference']]}: median {t['ratio']:.3f} > {t['limit']:.2f} (95% interval "
                     f"{fmt_ci(t)}): {t['verdict']}.")
    lines += [
        "- What the variants add to a training step, per target layer: `is` one add over the layer input "
        "(x_n + x_{n-1}), whose gradient also flows to x_{n-1}, and one norm for the merge statistics; `ms` up to "
        "pre_num adds over the rank-r intermediate (tokens x r) and two norms; `bs` the concatenation of the "
        "(m+1) A and B and a rank-(m+1)r product instead of rank r. The statistics are written on the device "
        "without a host sync.",
    ]
    return lines


MERGE_MODES = ("merge_bi", "plain")  # the modes experiments/merge_memory.py measures


def merge_memory_lines(report: dict) -> list[str]:
    """The method and table of ``make merge-memory`` (results/merge_memory.json)."""
    gib = 2 ** 30
    lines = ["Built by `make merge-memory` (`experiments/merge_memory.py`). Peak of the running sum of CPU "
             "allocations minus frees during one evaluation (merge, then one forward of 1 x 128 tokens, eval mode, "
             "no grad), above what was live before it; measured with torch.profiler as `bench.py` measures a "
             "training step. Adapters: r=4 on q_proj and v_proj, pre_num 1. Merged copy: `merge_and_unload`; "
             "in place: `with model.merged(mode):`, as the training loop evaluates.",
             f"Machine: {report['machine']['cpu']}, torch {report['machine']['torch']}.", "",
             "| model | variant | model size | target weights | forward alone | mode | merged copy | in place | "
             "in place − forward |", "|---" * 9 + "|"]
    for r in report["rows"]:
        for mode in MERGE_MODES:
            lines.append(
                f"| {r['model']} ({r['parameters'] / 1e6:.0f}M) | {r['variant']} | {r['model_bytes'] / gib:.2f} GiB | "
                f"{r['target_bytes'] / gib:.3f} GiB | {r['forward_peak_bytes'] / gib:.3f} GiB | {mode} | "
                f"{r[f'{mode}_copy_peak_bytes'] / gib:.3f} GiB | {r[f'{mode}_in_place_peak_bytes'] / gib:.3f} GiB | "
                f"{(r[f'{mode}_in_place_peak_bytes'] - r['forward_peak_bytes']) / r['target_bytes']:.2f}x targets |")
    return lines


def markdown(report: dict, merge_memory: dict | None = None) -> str:
    """results/bench.md: the bench's report, and the merged-evaluation memory of ``make merge-memory`` when
    it has been measured."""
    meta = report["meta"]
    lines = [
        "# Cost of training and inference: ResLoRA variants vs HF PEFT LoRA",
        "",
        f"Built by `make bench` (`experiments/bench.py{' --quick' if meta['quick'] else ''}`) on "
        f"{meta['date']}, commit `{meta['git_commit']}`.",
        f"Machine: {meta['cpu']}, {meta['cores']} cores; torch {meta['torch']} with "
        f"**{meta['threads']} thread(s)**, times on {meta['clock']}; transformers {meta['transformers']}, "
        f"peft {meta['peft']}.",
        f"Load average (1, 5, 15 min): {' / '.join(f'{x:.2f}' for x in meta['loadavg_start'])} at the start, "
        f"{' / '.join(f'{x:.2f}' for x in meta['loadavg_end'])} at the end; wall time {meta['wall_s']:.0f} s.",
    ]
    if meta.get("note"):
        lines += ["", f"**Note.** {meta['note']}"]
    for key, why in meta.get("left_out", {}).items():
        lines += ["", f"**Left out: `{key}`.** {why[0].upper() + why[1:]}."]
    lines += [
        "",
        "Method. All contestants live in one process and share the frozen base weights. Timing is paired: a "
        "round runs the reference R (our lora for training, the untouched base model for inference), then "
        "every other contestant in a fresh random order, each followed by R again (R c1 R c2 R ... cN R); a "
        "contestant's ratio in a round is its time over the mean of the two R runs around it. Ratios are the "
        "median over rounds, quartiles in brackets; ratios against PEFT LoRA are taken per round as "
        "(c / lora) / (PEFT / lora). Absolute times are medians over rounds. A second copy of the reference "
        "(the noise control) is timed like the others; its spread is the resolution of the run. "
        "Training step = forward + backward + AdamW step + zero_grad, train mode (dropout on). Peak memory "
        "(CPU has no allocator statistics): one step after warm-up runs under `torch.profiler` with "
        "`profile_memory=True`; the peak of the running sum of its allocation events, plus the tensors live "
        "before the step (parameters, buffers, optimizer state, counted as if each contestant had its own base "
        "model), is the peak of tensor memory (what `torch.cuda.max_memory_allocated` measures on a GPU). "
        "Inference: forward of the batch, eval mode, `torch.inference_mode`, each merged model (bs, is, ms: "
        "`merge_bi`; lora: `plain`; PEFT: `merge_and_unload`) against the untouched base model. Merge: time to "
        "build the merged model (ours builds a new plain model and leaves the trained one intact; PEFT is timed "
        "as deepcopy + `merge_and_unload` to do the same).",
        "",
        "## Targets",
        "",
        "Ratio: median over rounds (quartiles); interval: 95% interval of the median. Met: median <= limit; "
        "where it is not, whether the interval still reaches below the limit (not resolved by this run) or not.",
        "",
        "| workload | what | contestant | vs | ratio (quartiles) | interval | limit | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        met = "yes" if t["met"] else ("**no**" if t["verdict"] == "missed" else f"**no** ({t['verdict'].split(':')[0]})")
        lines.append(f"| {t['workload']} | {t['what'].replace('_', ' ')} | {LABELS[t['contestant']]} | "
                     f"{LABELS[t['reference']]} | {fmt_ratio(t | {'median': t['ratio']})} | {fmt_ci(t)} | "
                     f"{t['limit']:.2f} | {met} |")
    for wkey, w in report["workloads"].items():
        depth = f", {w['layers']} layers" if w["layers"] else ""
        lines += [
            "",
            f"## {w['title']}",
            "",
            f"Batch {w['batch_size']} x {w['seq_len']} tokens{depth}; targets {w['targets']}, r={w['r']}, "
            f"alpha={w['lora_alpha']}, dropout {w['lora_dropout']}"
            f"{', head trained: ' + str(w['modules_to_save']) if w['modules_to_save'] else ''}; "
            f"{w['rounds']} timed training rounds and {w['infer_rounds']} inference rounds after "
            f"{w['warmup']} warm-up rounds.",
            "",
            "### Ratios",
            "",
            "| contestant | step time vs PEFT LoRA | step time vs our lora | peak memory vs our lora | "
            "step memory above live vs our lora | merged inference time vs base |",
            "|---|---|---|---|---|---|",
        ]
        for k, t in w["train"].items():
            lines.append(f"| {LABELS[k]} | {fmt_ratio(t['vs_peft_lora'])} | {fmt_ratio(t['vs_lora'])} | "
                         f"{t['peak_vs_lora']:.3f} | {t['step_peak_vs_lora']:.3f} | "
                         f"{fmt_ratio(w['inference'][k]['vs_base'])} |")
        lines.append(f"| {LABELS[BASE_CONTROL]} | | | | | {fmt_ratio(w['inference'][BASE_CONTROL]['vs_base'])} |")
        lines += [
            "",
            "### Absolute figures",
            "",
            "| contestant | trainable params | step (s) | aten ops per step | peak memory (MiB) | "
            "live before step (MiB) | step peak above live (MiB) | merge mode | merge (s) | merged forward (s) "
            "| tokens/s | aten ops per forward |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k in (BASE, BASE_CONTROL):
            i = w["inference"][k]
            lines.append(f"| {LABELS[k]} | | | | | | | | | {i['forward_s']:.4f} | {i['tokens_per_s']:.0f} | "
                         f"{i['aten_ops']:,d} |")
        for k, t in w["train"].items():
            m, i = w["merge"][k], w["inference"][k]
            lines.append(f"| {LABELS[k]} | {t['trainable_params']:,d} | {t['step_s']:.4f} | {t['aten_ops']:,d} | "
                         f"{mib(t['peak_bytes'])} | {mib(t['live_before_bytes'])} | {mib(t['step_peak_bytes'])} | "
                         f"{m['mode']} | {m['merge_s']:.3f} | {i['forward_s']:.4f} | {i['tokens_per_s']:.0f} | "
                         f"{i['aten_ops']:,d} |")
    lines += ["", "## Reading this run", "", *reading(report)]
    if merge_memory:
        lines += ["", "## Peak memory of a merged evaluation", "", *merge_memory_lines(merge_memory)]
    return "\n".join(lines) + "\n"
