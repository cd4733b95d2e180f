"""What a Table 1 run costs on this machine: SmolLM2-135M on GSM8K / SVAMP / MathQA, one torch thread.

For each task: token lengths of the training rows (prompt + target) and test prompts, seconds per training
step (LoRA and ResLoRA_bs) and seconds per generated batch, measured, then the cost of a run at the cpu_nlg
scale. Sizes the cpu-scale Table 1 (conf/scale/cpu_nlg.yaml) before any sweep is started.

    DATA_MIRROR=../shared/data python experiments/nlg_cost.py     # -> results/nlg_cost.{json,md}
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from reslora.io import atomic_path, write_json
from reslora.lab.methods import apply_method
from reslora.lab.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]


def config(task: str, method: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=[f"task={task}", f"method={method}", "scale=cpu_nlg", "model=smollm2-135m"])


def measure(task_name: str, steps: int) -> dict:
    out = {}
    for method in ("lora", "reslora_bs"):
        cfg = config(task_name, method)
        task = build_task(cfg)
        model = apply_method(task.load_model(cfg.model), cfg.method, cfg.model, total_steps=steps)
        splits = task.datasets()
        collate = task.collate()
        if method == "lora":
            out["train_tokens"] = statistics.mean(len(r["input_ids"]) for r in splits["train"])
            out["prompt_tokens"] = statistics.mean(len(r["input_ids"]) for r in splits["test"])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        times = []
        for i in range(steps + 1):
            batch = collate([splits["train"][(i * cfg.train.batch_size + j) % len(splits["train"])]
                             for j in range(cfg.train.batch_size)])
            start = time.perf_counter()
            task.loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
        out[f"step_s_{method}"] = statistics.median(times[1:])  # the first step warms up
        if method == "lora":
            rows = [splits["test"][i] for i in range(cfg.train.eval_batch_size)]
            loader = [collate(rows)]
            start = time.perf_counter()
            task.evaluate(model, loader, _NoAccelerator())
            out["generate_batch_s"] = time.perf_counter() - start
            out["eval_batch_size"] = cfg.train.eval_batch_size
            out["max_new_tokens"] = cfg.task.max_new_tokens
            out["batch_size"] = cfg.train.batch_size
            out["data_sizes"] = {k: len(v) for k, v in splits.items()}
            out["max_steps"] = cfg.train.max_steps
    n_eval = out["data_sizes"]["validation"] * (out["max_steps"] // config(task_name, "lora").train.eval_every)
    n_eval += out["data_sizes"]["test"]
    out["run_estimate_s"] = (out["max_steps"] * out["step_s_reslora_bs"]
                             + n_eval / out["eval_batch_size"] * out["generate_batch_s"])
    return out


class _NoAccelerator:
    @staticmethod
    def gather_for_metrics(x):
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="gsm8k,svamp,mathqa")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "nlg_cost")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for task in args.tasks.split(","):
        results[task] = measure(task, args.steps)
        print(task, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in results[task].items()})
    write_json(args.out.with_suffix(".json"), {"tasks": results, "load_average": os.getloadavg()})
    lines = ["# What a Table 1 run costs (SmolLM2-135M, one thread)", "",
             f"Built by `python experiments/nlg_cost.py` (load average at the end: "
             f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}). Step = forward + backward + AdamW on one batch "
             "(median of the measured steps); generation = one greedy batch of test prompts up to max_new_tokens.",
             "", "| task | train tokens (mean) | prompt tokens (mean) | batch | s/step LoRA | s/step ResLoRA_bs | "
             "eval batch | max new tokens | s/generated batch | est. s/run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task, r in results.items():
        lines.append(f"| {task} | {r['train_tokens']:.0f} | {r['prompt_tokens']:.0f} | {r['batch_size']} | "
                     f"{r['step_s_lora']:.2f} | {r['step_s_reslora_bs']:.2f} | {r['eval_batch_size']} | "
                     f"{r['max_new_tokens']} | {r['generate_batch_s']:.1f} | {r['run_estimate_s']:.0f} |")
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
