"""Peak memory of one merged evaluation: a merged copy (``merge_and_unload``) against merging in place
(``model.merged``), on SmolLM2-135M (all layers) and a larger random LLaMA. Writes results/merge_memory.{json,md}.

    python experiments/merge_memory.py            # make merge-memory

Measured as bench.py measures a training step's memory: the evaluation (merge + one forward of batch 1 x 128,
eval mode, no grad) runs under torch.profiler with memory profiling, and the peak of the running sum of its
CPU allocations minus frees is what the evaluation adds above what was live before it. A full copy adds the
whole model; in place adds the merged target weights (W* of every adapted layer) and the forward's activations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import machine, profile_run, tensor_bytes, write_report  # noqa: E402
from bench_report import MERGE_MODES, merge_memory_lines  # noqa: E402

from reslora import ResLoraConfig, get_reslora_model  # noqa: E402
from reslora.io import write_json  # noqa: E402


def larger_llama() -> torch.nn.Module:
    """A random LLaMA of about 0.9B parameters (2048 wide, 16 layers), float32: large enough that a copy shows."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def smollm2(cache_dir: str) -> torch.nn.Module:
    from reslora.lab.hub_models import load_smollm2

    return load_smollm2(cache_dir)[0].eval()


def measure(name: str, base: torch.nn.Module, variant: str) -> dict:
    model = get_reslora_model(base, ResLoraConfig(variant=variant, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  pre_num=1))
    ids = torch.randint(100, base.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():  # statistics for the input-based merge, as after training
        model(input_ids=ids)
    model.eval()
    targets = tensor_bytes(layer.base_layer.weight for layer in model.named_reslora_layers().values())
    row = {"model": name, "variant": variant, "parameters": sum(p.numel() for p in base.parameters()),
           "model_bytes": tensor_bytes([*base.parameters(), *base.buffers()]), "target_bytes": targets}

    def copied(mode):
        with torch.no_grad():
            model.merge_and_unload(mode)(input_ids=ids, use_cache=False)

    def in_place(mode):
        with torch.no_grad(), model.merged(mode):
            model(input_ids=ids, use_cache=False)

    def forward_only():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    row["forward_peak_bytes"] = profile_run(forward_only)[0]
    for mode in MERGE_MODES:
        row[f"{mode}_copy_peak_bytes"] = profile_run(lambda: copied(mode))[0]
        row[f"{mode}_in_place_peak_bytes"] = profile_run(lambda: in_place(mode))[0]
    return row


def markdown(report: dict) -> str:
    return "\n".join(["# Peak memory of a merged evaluation", "", *merge_memory_lines(report)]) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument("--skip-large", action="store_true", help="SmolLM2 only (a quick check)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure("SmolLM2-135M", smollm2(args.cache_dir), v) for v in ("is", "bs")]
    if not args.skip_large:
        rows.append(measure("random LLaMA", larger_llama(), "is"))
    report = {"machine": machine(), "rows": rows}
    write_json(args.out / "merge_memory.json", report)
    (args.out / "merge_memory.md").write_text(markdown(report))
    if (args.out / "bench.json").is_file():  # bench.md shows these figures too
        write_report(args.out)
    print(markdown(report))


if __name__ == "__main__":
    main()
